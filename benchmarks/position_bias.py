"""Position debiasing on synthetic data, judged against the generator's true relevance.

Three ways to treat display position when learning clicks (YouTube, Zhao et al. 2019, §4):
  (a) ignore it;  (b) feed it as an ordinary input feature (served with position 0);
  (c) the shallow position-bias tower, added to the engagement logits in training only.
Each variant trains the same MMoE on the same biased log; the click predictions of the validation
day are ranked per request and scored by NDCG@10 against the true relevance the generator used
(the click probability had the item been examined), which a debiased model should recover.

With the default generator the logging policy orders by noisy relevance alone, so in expectation
position is a monotone function of relevance and ignoring it costs little in ranking terms; with
``--promotion`` the policy also lifts promoted categories whatever their relevance, the confounder
under which a click model that ignores position learns the promotion as if it were relevance.

    .venv/bin/python benchmarks/position_bias.py [--seeds 3] [--epochs 2] [--promotion 0,2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import polars as pl
import torch

from features.build import build
from features.fitted import FittedTransform, sparse_col
from features.spec import load_spec, parse_spec
from features.synthetic import SynthConfig, write_log
from pipelines.train import train
from pipelines.train_config import TrainConfig
from ranking.artifact import load_artifact
from ranking.batch import FeatureTable
from ranking.metrics import ndcg_at_k


def true_ndcg(artifact: Path, features: Path, serve_position_id: int | None) -> float:
    """NDCG@10 of the served click probability against true relevance on the validation split."""
    model, cfg, _, _ = load_artifact(artifact)
    frame = pl.read_parquet(features / "val.parquet")
    if serve_position_id is not None:  # variant (b): at serving the position is unknown -> the top slot
        frame = frame.with_columns(pl.lit(serve_position_id, pl.Int64).alias(sparse_col("position_in")))
    table = FeatureTable(frame, cfg, {"request": "request_id", "true_relevance": "true_relevance"})
    b = table.all()
    with torch.inference_mode():
        click = torch.sigmoid(model(b.sparse, b.dense, None).logits["click"])
    return ndcg_at_k(click, b.extra["true_relevance"], b.extra["request"], 10).value


def run_setting(work: Path, synth: SynthConfig, seeds: int, epochs: int) -> dict[str, list[float]]:
    """Build both feature sets of one generator setting and train every variant for every seed."""
    write_log(synth, work / "log")
    spec = load_spec("synthetic")
    build(work / "log", spec, work / "f_plain")
    as_input = spec.model_dump(mode="json")
    as_input["sparse"].append({"name": "position_in", "source": "context", "column": "position", "embedding_dim": 4})
    build(work / "log", parse_spec(as_input), work / "f_input")
    top_id = FittedTransform.load(work / "f_input" / "transform.json").vocabs["position_in"].values.index(0) + 1

    variants = {
        "(a) no position handling": ("f_plain", {"position_buckets": 0}, None),
        "(b) position as an input feature": ("f_input", {"position_buckets": 0}, top_id),
        "(c) shallow position-bias tower": ("f_plain", {}, None),
    }
    uri = f"sqlite:///{work / 'mlflow.db'}"
    results: dict[str, list[float]] = {}
    for name, (feats, overrides, serve_pos) in variants.items():
        for seed in range(seeds):
            cfg = TrainConfig(
                features=work / feats,
                out=work / f"run_{feats}_{len(overrides)}_{seed}",
                tracking_uri=uri,
                epochs=epochs,
                seed=seed,
                register_as=None,
                experiment="position-bias",
                progress_bar=False,
                model_overrides=overrides,
            )
            results.setdefault(name, []).append(true_ndcg(train(cfg).artifact, work / feats, serve_pos))
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--promotion", default="0,2", help="logging-policy promotions to compare (comma list)")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="posbias-"))
    for promotion in (float(x) for x in args.promotion.split(",")):
        synth = SynthConfig(policy_promotion=promotion)
        results = run_setting(work / f"promotion_{promotion:g}", synth, args.seeds, args.epochs)
        print(f"synthetic data: {synth}")
        print(f"{'variant':<36} {'true NDCG@10 mean':>18} {'std':>8}  per seed")
        for name, vals in results.items():
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            print(f"{name:<36} {statistics.mean(vals):>18.4f} {std:>8.4f}  {', '.join(f'{v:.4f}' for v in vals)}")
        print(flush=True)


if __name__ == "__main__":
    main()
