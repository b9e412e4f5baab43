"""KuaiRand replication: our MMoE and PLE against the peer libraries, under the peers' protocol.

The protocol (``shared/peers/RESULTS-KUAIRAND-2026-11-22.md`` and ``prep_kuairand.py``) fixes the
data, split, features and metrics: the 14-day KuaiRand-Pure subset, train 04-25..05-03, val 05-04,
test 05-05..05-08, 31 sparse tokens x 16 + 5 dense inputs, three binary tasks (is_click,
long_view, is_like). Every epoch is validated; the best epoch is the argmax of the mean of the
three validation AUCs (earliest on ties) and the test split is scored at that epoch: AUC, gAUC
(raw user_id, users with both classes, impression-weighted) and log-loss per task, then mean and
sample std over seeds.

Our runs go through ``pipelines.train.train`` (Lightning, MLflow experiment
``kuairand-replication`` in ``<work>/mlflow.db``) with ``monitor="val/auc_mean"``. Each run's
selected model is then re-scored on val and test by the protocol's own ``prep_kuairand.evaluate``
(imported from ``shared/peers``), which must agree with our ``ranking.metrics`` figures, and the
selected epoch must be the protocol's argmax over the per-epoch validation AUCs logged to MLflow;
the benchmark stops with an error otherwise. The peers' recipe (Adam 1e-3, batch 1024) is kept;
the model and embedding settings are ours and are printed with the results.

``--peers`` runs ``shared/peers/run_kuairand_all.sh`` (torch-rechub and deepctr-torch, MMoE and
SharedBottom) for every seed in the same invocation (``WORK=/tmp/peers``, its venv and prepared
data reused) and prints their rows beside ours.

    .venv/bin/python benchmarks/kuairand.py [--seeds 2022,2023,2024] [--epochs 5] [--models mmoe,ple] [--peers]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import mlflow
import numpy as np
import polars as pl
import torch

from features.build import build
from features.datasets import scan_dataset
from features.spec import load_spec
from pipelines.train import train
from pipelines.train_config import TrainConfig
from ranking.artifact import load_artifact
from ranking.batch import FeatureTable
from ranking.evaluate import EVAL_BATCH

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PEERS = SHARED / "peers"
TASKS = ("is_click", "long_view", "is_like")
EXPERIMENT = "kuairand-replication"

# Architectures: the peers' experts (8 x [128, 64]) and towers ([32]) on the 501-wide input, no
# shared bottom; MMoE with a 2-layer DCN-v2 cross network on its input (the quality ablation's
# winner, benchmarks/results/quality.md). PLE's first level holds the same 8 experts (2 per task +
# 2 shared), a second level refines them.
MODELS: dict[str, dict[str, Any]] = {
    "mmoe": {"num_experts": 8, "expert_dims": (128, 64), "tower_dims": (32,), "bottom_dims": (), "cross_layers": 2},
    "ple": {"num_task_experts": 2, "num_shared_experts": 2, "ple_levels": 2, "expert_dims": (128, 64),
            "tower_dims": (32,), "bottom_dims": ()},
}
RECIPE: dict[str, Any] = {"lr": 1e-3, "batch_size": 1024}


def protocol() -> ModuleType:
    """``shared/peers/prep_kuairand.py``: the protocol's metric code, loaded as is."""
    spec = importlib.util.spec_from_file_location("prep_kuairand", PEERS / "prep_kuairand.py")
    if spec is None or spec.loader is None:
        raise ValueError(f"protocol code not found in {str(PEERS)!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def protocol_scores(artifact: Path, features: Path, split: str, experts_k: int = 0) -> dict[str, Any]:
    """Score one split with the selected model and ``prep_kuairand.evaluate``: task -> auc, gauc, logloss.

    ``experts_k`` > 0: with that many experts per row (``RankingModel.set_top_k``, as ``ranker serve
    --experts-k``).
    """
    model, cfg, _, _ = load_artifact(artifact)
    if experts_k:
        model.set_top_k(experts_k)
    frame = pl.read_parquet(features / f"{split}.parquet")
    table = FeatureTable(frame, cfg)
    b = table.all()
    chunks = []
    with torch.inference_mode():  # in ranking.evaluate's chunks: expert choice routes within each
        for start in range(0, frame.height, EVAL_BATCH):
            c = table.batch(torch.arange(start, min(start + EVAL_BATCH, frame.height)))
            logits = model(c.sparse, c.dense, None).logits
            chunks.append(torch.stack([torch.sigmoid(logits[t]) for t in TASKS], dim=1))
    p = torch.cat(chunks).double().numpy()  # (N, T)
    y = np.stack([b.labels[t].numpy() for t in TASKS], axis=1)  # (N, T)
    uid = frame["user_id"].cast(pl.Int64).to_numpy()  # raw ids: OOV users stay apart
    return protocol().evaluate(y, p, uid, list(TASKS))


def protocol_best_epoch(run_id: str, uri: str) -> tuple[int, list[float]]:
    """(best epoch, 1-based; per-epoch val mean AUC) from the run's logged per-task val AUCs."""
    client = mlflow.tracking.MlflowClient(uri)
    per_task = [
        [m.value for m in sorted(client.get_metric_history(run_id, f"val/{t}/auc"), key=lambda m: m.step)]
        for t in TASKS
    ]
    means = [float(np.mean(v)) for v in zip(*per_task, strict=True)]  # (epochs,)
    return int(np.argmax(means)) + 1, means  # argmax returns the first maximum: earliest on ties


def run_ours(work: Path, features: Path, model: str, seed: int, epochs: int, threads: int,
             overrides: dict[str, Any] | None = None, tag: str = "",
             training: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one model and seed, check selection and metrics against the protocol, return its row.

    ``overrides`` replace fields of the model's ``MODELS`` settings (e.g. ``{"gate": GateConfig(...)}``,
    ``benchmarks/routing.py``), ``training`` fields of ``RECIPE`` (e.g. ``{"lr_schedule": "cosine"}``,
    ``benchmarks/quality.py``); ``tag`` names the run folder beside the model and seed.
    """
    uri = f"sqlite:///{work / 'mlflow.db'}"
    torch.set_num_threads(threads)
    load = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    result = train(TrainConfig(
        features=features, out=work / "runs" / f"{model}{tag}_{seed}", tracking_uri=uri, model=model, epochs=epochs,
        seed=seed, monitor="val/auc_mean", monitor_mode="max", experiment=EXPERIMENT, register_as=None,
        progress_bar=False, model_overrides={**MODELS[model], **(overrides or {})},
        **{**RECIPE, **(training or {})},
    ))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    best, val_means = protocol_best_epoch(result.run_id, uri)
    if result.best_epoch is None or result.best_epoch + 1 != best:  # Lightning counts epochs from 0
        raise ValueError(f"{model} seed {seed}: checkpoint epoch {result.best_epoch} (0-based) is not the "
                         f"protocol's best epoch {best} (val mean AUC per epoch {val_means})")
    test = protocol_scores(result.artifact, features, "test")
    for t in TASKS:
        for metric in ("auc", "gauc", "logloss"):
            ours = result.metrics[f"final/test/{t}/{metric}"]
            if abs(ours - test[t][metric]) > 1e-9:
                raise ValueError(f"{model} seed {seed} test {t} {metric}: ours {ours} != protocol {test[t][metric]}")
    click_users = result.metrics.get("final/test/is_click/gauc_users")
    return {"model": model, "seed": seed, "best_epoch": best, "val_mean_auc": val_means, "test": test,
            "wall_s": wall, "cpu_us_per_sample": 1e6 * cpu / (154_071 * epochs), "load1": load,
            "run_id": result.run_id, "click_gauc_users": click_users, "artifact": str(result.artifact)}


def run_peers(seeds: list[int], work: Path) -> list[dict[str, Any]]:
    """Run the peer driver once per seed (``TAG=_s<seed>``) and read back every result file."""
    env = {**os.environ, "WORK": str(work), "EPOCHS": "5"}
    for seed in seeds:
        subprocess.run([str(PEERS / "run_kuairand_all.sh")], env={**env, "SEED": str(seed), "TAG": f"_s{seed}"},
                       check=True)
    return read_peers(seeds, work)


def read_peers(seeds: list[int], work: Path) -> list[dict[str, Any]]:
    """The peer driver's result files of these seeds (``<work>/results_kuairand/*_s<seed>.json``)."""
    files = sorted((work / "results_kuairand").glob("*_s*.json"))
    return [json.loads(f.read_text()) for f in files if int(f.stem.rsplit("_s", 1)[-1]) in seeds]


def _stat(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f}±{std:.4f}"


def table(rows: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown table: one line per system, test AUC / gAUC per task at the best val epoch, over seeds."""
    head = "| system | seeds | best ep | " + " | ".join(f"{t} AUC | {t} gAUC" for t in TASKS) + " | log-loss c/lv/l |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, runs in rows.items():
        cells = [name, str(len(runs)), ",".join(str(r["best_epoch"]) for r in runs)]
        for t in TASKS:
            cells += [_stat([r["test"][t]["auc"] for r in runs]), _stat([r["test"][t]["gauc"] for r in runs])]
        cells.append("/".join(f"{statistics.mean(r['test'][t]['logloss'] for r in runs):.4f}" for t in TASKS))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="2022,2023,2024", help="comma list; >= 3 for mean ± std")
    ap.add_argument("--epochs", type=int, default=5, help="5 = the peers' recipe")
    ap.add_argument("--models", default="mmoe,ple", help=f"comma list of {sorted(MODELS)}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--peers", action="store_true", help="also run the peer libraries (shared/peers)")
    ap.add_argument("--peers-work", type=Path, default=Path("/tmp/peers"))
    ap.add_argument("--peer-results", action="store_true",
                    help="add the peers' result files already in --peers-work (from an earlier --peers run) "
                         "to the table instead of running them again")
    ap.add_argument("--embedding-lr", type=float, default=None,
                    help="Adam lr of the embedding tables (default: the dense lr, 1e-3)")
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "kuairand_pure_subset")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    models = [m.strip() for m in args.models.split(",")]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown --models {unknown}; available: {sorted(MODELS)}")
    if args.embedding_lr is not None:
        RECIPE["embedding_lr"] = args.embedding_lr
    work = args.work or Path(tempfile.mkdtemp(prefix="kuairand-"))
    features = work / "features"
    build(scan_dataset("kuairand", args.data), load_spec("kuairand"), features)

    ours: dict[str, list[dict[str, Any]]] = {}
    for model in models:
        for seed in seeds:
            row = run_ours(work, features, model, seed, args.epochs, args.threads)
            ours.setdefault(f"ours {model}", []).append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "test"}
                             | {"test": {t: {m: round(row["test"][t][m], 4) for m in ("auc", "gauc")} for t in TASKS}}),
                  flush=True)
    (work / "ours.json").write_text(json.dumps(ours, indent=1))
    print(f"\nours: {args.epochs} epochs, settings {json.dumps(RECIPE)}, models {json.dumps(MODELS)}")
    rows = dict(ours)
    if args.peers or args.peer_results:
        for r in (run_peers(seeds, args.peers_work) if args.peers else read_peers(seeds, args.peers_work)):
            runs = rows.setdefault(f"{r['library'].split()[0]} {r['model']}", [])
            runs.append({"best_epoch": r["best_val_epoch"], "test": r["test_at_best"]})
    print(table(rows))
    for name, runs in ours.items():
        cpu = [r["cpu_us_per_sample"] for r in runs]
        loads = ", ".join(f"{r['load1']:.2f}" for r in runs)
        print(f"{name}: whole-run CPU µs per training sample-epoch {min(cpu):.1f}–{max(cpu):.1f} "
              f"(training + every val pass + final val/test scoring), load1 at start "
              f"{loads}")
    print(f"work dir: {work}")


if __name__ == "__main__":
    main()
