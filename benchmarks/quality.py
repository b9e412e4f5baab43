"""The quality ablation: which model options lift test AUC above the peers, measured on real data.

Each option is a set of model-config overrides on top of the dataset's bundled recipe
(``pipelines/configs/train/<dataset>.yaml``, what plain ``ranker train`` uses), trained through the
dataset's benchmark protocol (``benchmarks/kuairand.py``: the peers' KuaiRand-Pure split, test AUC
and gAUC per task at the best validation epoch, checked against the protocol's own ``evaluate``;
``benchmarks/census.py``: MMoE paper group 1). Selection is on validation only; the test split is
read once per run, after the best validation epoch is fixed. Rows are appended to
``<work>/<dataset>.jsonl`` as runs finish, so an interrupted ablation continues.

Options so far:

- ``baseline``: the recipe as shipped;
- ``tower_bn``: batch-normalised towers (``tower_norm: batch``), the shape of the peer row
  (torch-rechub SharedBottom) that beats us on KuaiRand click and long-view AUC;
- ``swish``: Swish experts (``expert_activation: silu``) against dead ReLU units (HoME);
- ``tower_bn+swish``: both;
- ``bottom_256``: a 256-wide shared bottom under the experts (census's recipe has one already, so
  there it changes nothing and is not run);
- ``dropout_0.1``: dropout 0.1 in the bottom, experts and towers.

    .venv/bin/python benchmarks/quality.py --train --dataset kuairand --work W [--options baseline,tower_bn]
    .venv/bin/python benchmarks/quality.py --train --dataset census --work W --seeds 2022,2023,2024,2025,2026
    .venv/bin/python benchmarks/quality.py --peers --dataset kuairand --work W   # the peers, same machine
    .venv/bin/python benchmarks/quality.py --cost --dataset kuairand --work W    # training cost per option
    .venv/bin/python benchmarks/quality.py --report --work W      # benchmarks/results/quality.md
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
OPTIONS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "tower_bn": {"tower_norm": "batch"},
    "swish": {"expert_activation": "silu"},
    "tower_bn+swish": {"tower_norm": "batch", "expert_activation": "silu"},
    "bottom_256": {"bottom_dims": (256,)},  # a shared bottom under the experts (KuaiRand's recipe has none)
    "dropout_0.1": {"dropout": 0.1},
    "expert_bn": {"expert_norm": "batch"},
    "home_experts": {"expert_norm": "batch", "expert_activation": "silu"},  # HoME's normalised Swish experts
    "feature_gate": {"feature_gate_dim": 64},
    "cross_full": {"cross_layers": 2},
    "cross_low_rank": {"cross_layers": 3, "cross_rank": 64},
    "cosine": {"train.lr_schedule": "cosine"},  # keys train.*: training settings over the recipe
    # second round: the first round's winners together
    "cross_full+cosine": {"cross_layers": 2, "train.lr_schedule": "cosine"},
    "feature_gate+cross_full": {"feature_gate_dim": 64, "cross_layers": 2},
    "feature_gate+cross_low_rank": {"feature_gate_dim": 64, "cross_layers": 3, "cross_rank": 64},
    # the optimiser on KuaiRand's winner: the embedding lr chosen on validation on 2026-11-30, dense L2
    "cross_full+embedding_lr_3e-3": {"cross_layers": 2, "train.embedding_lr": 3e-3},
    "cross_full+weight_decay_1e-4": {"cross_layers": 2, "train.weight_decay": 1e-4},
}
# The first round's options (report: benchmarks/results/quality_first_options.md, rows not kept).
FIRST_ROUND = ("tower_bn", "swish", "tower_bn+swish", "bottom_256", "dropout_0.1")
TASKS = {"kuairand": ("is_click", "long_view", "is_like"), "census": ("income", "never_married")}


def _routing() -> ModuleType:
    """``benchmarks/routing.py``, whose protocol runner (``train_grid``) and verdict this ablation shares."""
    spec = importlib.util.spec_from_file_location("quality_routing", HERE / "routing.py")
    if spec is None or spec.loader is None:
        raise ValueError(f"benchmarks/routing.py not found in {str(HERE)!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


STUDY = _routing()


# What the recipes held before this ablation changed them: every option starts from there, so that
# ``baseline`` stays the recipe the ablation measured against.
BEFORE: dict[str, dict[str, Any]] = {"kuairand": {"cross_layers": 0}, "census": {"feature_gate_dim": 0}}


def train(dataset: str, work: Path, seeds: list[int], options: list[str], threads: int) -> None:
    """Every option x seed of one dataset through its protocol; rows appended to ``<work>/<dataset>.jsonl``."""
    grid = {name: {**BEFORE[dataset], **OPTIONS[name]} for name in options}
    STUDY.train_grid(dataset, work, seeds, grid, "option", None, threads)


def train_cost(dataset: str, work: Path, options: list[str], steps: int = 40, threads: int = 1) -> None:
    """Training cost of each option: ``steps`` timed steps (``training_step``, backward, the module's
    Adam) on batches of the recipe's size from the training split, at ``threads`` torch threads,
    after 5 untimed ones; the median of 3 such rounds, as ms per step and s per epoch of the split.
    Rows go to ``<work>/<dataset>_cost.jsonl``, replacing earlier ones of the same option."""
    import os
    import time

    import torch

    from pipelines.train_config import load_recipe, recipe_path
    from ranking.artifact import build_model
    from ranking.config import ModelConfig
    from ranking.train import FitConfig, OptimConfig, RankingDataModule, RankingModule, load_features

    torch.set_num_threads(threads)
    features = work / dataset / "features"
    fields, shape = load_recipe(recipe_path(dataset), "mmoe")  # type: ignore[arg-type]  # bundled datasets
    out = work / f"{dataset}_cost.jsonl"
    kept = [r for r in STUDY.done_rows(out) if r["option"] not in options]
    for name in options:
        opts = OPTIONS[name]
        model = {k: v for k, v in opts.items() if not k.startswith("train.")}
        training = {k.removeprefix("train."): v for k, v in opts.items() if k.startswith("train.")}
        lr = training.get("lr", fields["lr"])
        optim = OptimConfig(lr=lr, embedding_lr=training.get("embedding_lr", fields.get("embedding_lr")))
        cfg = ModelConfig.from_fitted(load_features(features), **{**shape, **BEFORE[dataset], **model})
        torch.manual_seed(0)
        module = RankingModule(build_model(cfg), cfg, FitConfig(optim=optim))
        module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # no Trainer to log to
        opt = module.optimizer()
        data = RankingDataModule(features, cfg, batch_size=fields["batch_size"], seed=0)
        data.setup()
        batches = list(itertools.islice(iter(data.train_dataloader()), steps + 5))
        rounds = []
        for _ in range(3):
            for i, batch in enumerate(batches):
                if i == 5:
                    t = time.perf_counter()
                module.on_train_batch_start(batch, i)
                loss = module.training_step(batch, i)
                opt.zero_grad()
                loss.backward()
                opt.step()
            rounds.append((time.perf_counter() - t) / steps)
        step_s = statistics.median(rounds)
        rows = len(data.tables["train"])
        kept.append({"option": name, "ms_per_step": 1e3 * step_s, "batch_size": fields["batch_size"],
                     "s_per_epoch": step_s * rows / fields["batch_size"], "threads": threads,
                     "params": sum(p.numel() for p in module.model.parameters()), "load1": os.getloadavg()[0]})
        if dataset == "kuairand":  # the serving network's forward on real requests
            kept[-1].update(serving_cost(module.model, cfg, work / "serving" / name))
        print(json.dumps(kept[-1]), flush=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in kept))


def serving_cost(model: Any, cfg: Any, folder: Path, seconds: float = 1.0) -> dict[str, float]:
    """µs per candidate of the serving network's forward (``FusedScorer.score``, eager) on KuaiRand test
    requests of 100 candidates and of 1, after checking its scores against the reference path."""
    import time

    import numpy as np

    from features.fitted import FittedTransform
    from ranking.artifact import export_artifact
    from ranking.inference import InferenceModel

    features = folder.parents[1] / "kuairand" / "features"
    fitted = FittedTransform.load(features / "transform.json")
    data = STUDY._benchmark("kuairand").SHARED / "data" / "kuairand_pure_subset"
    reqs = STUDY.test_requests(data, fitted.spec, 100, 1)
    one = [(reqs[0][0], reqs[0][1], {c: v[:1] for c, v in reqs[0][2].items()})]
    served = InferenceModel(export_artifact(model.eval(), cfg, fitted, folder))
    for g, w in zip(served.score_requests(reqs), served.reference_score_requests(reqs), strict=True):
        if max(float(np.abs(g[t] - w[t]).max()) for t in served.tasks) > 1e-4:
            raise ValueError(f"{folder.name}: served scores differ from the reference path")
    out: dict[str, float] = {}
    for n, batch in ((100, reqs), (1, one)):
        enc = served.plan.encode(batch)
        best = float("inf")
        for _ in range(3):
            times: list[float] = []
            end = time.perf_counter() + seconds / 3
            while time.perf_counter() < end or len(times) < 3:
                t0 = time.perf_counter()
                served.scorer.score(enc)
                times.append(time.perf_counter() - t0)
            best = min(best, 1e6 * float(np.median(times)) / n)
        out[f"serve_us_{n}"] = best
    return out


def run_peers(dataset: str, work: Path, seeds: list[int]) -> None:
    """The peer libraries on this machine, their own drivers (``shared/peers``), into ``<work>/peers``:
    KuaiRand every seed, census the driver's one seed (2022). Each driver builds its environment when
    it is missing."""
    bench = STUDY._benchmark(dataset)
    if dataset == "kuairand":
        bench.run_peers(seeds, work / "peers")
    else:
        bench.run_peers(work / "peers", 10)


def peer_rows(dataset: str, work: Path) -> list[dict[str, Any]]:
    """The peer runs in ``<work>/peers`` as rows of this ablation (``option`` = library and model)."""
    peers = work / "peers"
    if dataset == "kuairand":
        files = sorted((peers / "results_kuairand").glob("*_s*.json"))
        got = [json.loads(f.read_text()) for f in files]
        return [{"option": f"{r['library'].split()[0]} {r['model']}", "seed": r["args"]["seed"],
                 "test": r["test_at_best"], "best_epoch": r["best_val_epoch"],
                 "val_mean_auc": [r["val_at_best"]["mean_auc"]],
                 "wall_s": r["train_time_s"] + r["eval_time_s"]} for r in got]
    names = STUDY._benchmark("census").PEER_TASKS
    files = [f for f in sorted((peers / "results").glob("*.json")) if not f.stem.endswith("_tp")]
    got = [json.loads(f.read_text()) for f in files]
    return [{"option": f"{r['library'].split()[0]} {r['model']}", "seed": 2022, "best_epoch": r["best_val_epoch"],
             "test": {t: r["test_auc_at_best_val_epoch"][names[t]] for t in TASKS["census"]},
             "wall_s": r["train_time_s"] + r["eval_time_s"]} for r in got]


def _val_mean(row: dict[str, Any]) -> float | None:
    """The validation mean AUC a run was selected by (its best epoch's), None where the row has none."""
    if "val_mean_auc" in row:  # KuaiRand: per epoch
        return max(row["val_mean_auc"])
    if isinstance(row.get("val"), dict):  # census: per task at the best epoch
        return statistics.mean(row["val"].values())
    return None


def winner(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(option, why): the highest mean validation AUC; a combination (a name with ``+``) must beat the
    best single option by more than its own seed sd, or that single option wins (its extra parts buy
    nothing the seeds can tell)."""
    means: dict[str, tuple[float, float]] = {}
    for name in OPTIONS:
        val = [v for r in rows if r["option"] == name and (v := _val_mean(r)) is not None]
        if val:
            means[name] = (statistics.mean(val), statistics.stdev(val) if len(val) > 1 else 0.0)
    best = max(means, key=lambda n: means[n][0])
    singles = [n for n in means if "+" not in n]
    if "+" in best and singles:
        single = max(singles, key=lambda n: means[n][0])
        if means[best][0] - means[single][0] <= means[best][1]:
            return single, (f"{best} has the highest validation mean AUC ({means[best][0]:.5f}), but within its "
                            f"seed sd ({means[best][1]:.5f}) of {single} ({means[single][0]:.5f})")
    return best, f"the highest validation mean AUC ({means[best][0]:.5f} ± {means[best][1]:.5f})"


def table(dataset: str, rows: list[dict[str, Any]], peers: list[dict[str, Any]] | None = None,
          cost: dict[str, dict[str, Any]] | None = None) -> str:
    """Test metrics at the best validation epoch, mean ± sd over seeds; Δ and verdict against baseline,
    then the peers' rows (same machine) with Δ of the best of ours against them."""
    tasks = TASKS[dataset]
    metrics = ("auc", "gauc") if dataset == "kuairand" else ("auc",)
    head = ["option", "seeds", "val mean AUC (selects)", *[f"{t} {m}" for t in tasks for m in metrics],
            "verdict vs baseline", "wall s / run",
            "train s / epoch (ms / step)", *(["serving µs / cand @100, @1"] if dataset == "kuairand" else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = {name: [r for r in rows if r["option"] == name] for name in OPTIONS}
    for r in peers or []:
        by.setdefault(f"peer: {r['option']}", []).append(r)
    base = by["baseline"]
    for name, runs in by.items():
        if not runs:
            continue
        val = [v for v in map(_val_mean, runs) if v is not None]
        cells = [name, str(len(runs)), STUDY._stat(val) if val else ""]
        wins = losses = 0
        for t in tasks:
            for m in metrics:
                vals = [STUDY._metric(r, t, m) for r in runs]
                cell = STUDY._stat(vals)
                if base and name != "baseline" and not name.startswith("peer: "):
                    d, sign = STUDY.verdict(vals, [STUDY._metric(r, t, m) for r in base])
                    wins, losses = wins + (sign > 0), losses + (sign < 0)
                    cell += f" ({d:+.4f})"
                cells.append(cell)
        n = len(tasks) * len(metrics)
        plain = name == "baseline" or not base or name.startswith("peer: ")
        cells.append("-" if plain else f"wins {wins}, loses {losses} of {n}")
        cells.append(f"{statistics.median(r['wall_s'] for r in runs):.0f}")
        c = (cost or {}).get(name)
        cells.append(f"{c['s_per_epoch']:.1f} ({c['ms_per_step']:.1f})" if c else "")
        if dataset == "kuairand":
            cells.append(f"{c['serve_us_100']:.1f}, {c['serve_us_1']:.0f}" if c and "serve_us_1" in c else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(work: Path, out: Path) -> None:
    import datetime as dt
    import os
    import platform

    parts = ["# Quality ablation", "",
             "Model options on top of the bundled recipes (`benchmarks/quality.py`; see its docstring for",
             "the protocol). Written by", "",
             "    .venv/bin/python benchmarks/quality.py --train --dataset kuairand --work W",
             "    .venv/bin/python benchmarks/quality.py --train --dataset census --work W",
             "    .venv/bin/python benchmarks/quality.py --report --work W", "",
             f"- written {dt.date.today()}, {platform.machine()}, {os.cpu_count()} cores; "
             "test metrics at the best validation epoch, mean ± sd over seeds;",
             "- val mean AUC: the mean validation AUC of the selected epoch, mean ± sd over seeds: the winner is "
             "the option with the highest (validation only; test is read once per run, after selection);",
             "- verdict: metrics where the mean differs from the baseline's by more than twice the larger seed sd;",
             "- wall s / run: whole runs, some with other jobs on the 2 cores: not a cost comparison;",
             "- train s / epoch: `--cost`, training steps alone (forward, backward, Adam) at 1 thread on the idle "
             "box, median of 3 rounds of 40 steps, times the training split's steps: the cost comparison;",
             "- serving µs / cand: `--cost`, the serving network's eager forward (`FusedScorer.score`) on one KuaiRand "
             "test request of 100 candidates and on 1 candidate, 1 thread, the fastest of 3 medians;",
             f"- options: `{json.dumps(OPTIONS)}`", ""]
    for dataset in ("kuairand", "census"):
        rows = STUDY.done_rows(work / f"{dataset}.jsonl")
        if rows:
            seeds = sorted({r["seed"] for r in rows})
            peers = peer_rows(dataset, work)
            cost = {r["option"]: r for r in STUDY.done_rows(work / f"{dataset}_cost.jsonl")}
            parts += [f"## {dataset} (seeds {', '.join(map(str, seeds))})", "", table(dataset, rows, peers, cost), ""]
            chosen, why = winner(rows)
            parts += [f"**Winner (validation only): {chosen}**: {why}.", ""]
            if not peers and dataset == "census":
                parts += ["peers: not in this run (`--peers --dataset census` runs them; at 10 epochs of their "
                          "per-sample loaders they take about an hour on this box). Their driver is seeded (2022): "
                          "`benchmarks/results/census.md` (2026-11-22) has torch-rechub MMOE 0.9482 / 0.9946, "
                          "SharedBottom 0.9493 / 0.9947, deepctr-torch MMOE 0.9455 / 0.9943, SharedBottom "
                          "0.9463 / 0.9943 (income / never-married test AUC).", ""]
            if peers:
                parts += ["peer rows: the libraries' own drivers (`shared/peers`) on this machine, in `--peers`'s "
                          "run (2 threads each; wall s = their training and scoring passes); census's driver has "
                          "one seed (2022).", ""]
            copied: dict[tuple[str, str], list[int]] = {}
            for r in rows:
                if "copied_from" in r:
                    copied.setdefault((r["option"], r["copied_from"]), []).append(r["seed"])
            for (option, source), got in sorted(copied.items()):
                parts += [f"{option}, seeds {', '.join(map(str, sorted(got)))}: rows of {source}.", ""]
    out.write_text("\n".join(parts) + "\n")
    print("\n".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--cost", action="store_true", help="time each option's training step (train s / epoch)")
    ap.add_argument("--peers", action="store_true",
                    help="run the peer libraries' drivers on this machine (rows beside ours in the report)")
    ap.add_argument("--dataset", choices=("kuairand", "census"), default="kuairand")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--seeds", default="2022,2023,2024", help="comma list (census: >= 5 for the issue's bar)")
    ap.add_argument("--options", default=",".join(OPTIONS), help=f"comma list of {list(OPTIONS)}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "quality.md")
    args = ap.parse_args()
    options = [o.strip() for o in args.options.split(",")]
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise SystemExit(f"error: unknown --options {unknown}; known: {list(OPTIONS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.train:
        train(args.dataset, args.work, [int(s) for s in args.seeds.split(",")], options, args.threads)
    if args.cost:
        train_cost(args.dataset, args.work, options)
    if args.peers:
        run_peers(args.dataset, args.work, [int(s) for s in args.seeds.split(",")])
    if args.report:
        report(args.work, args.out)


if __name__ == "__main__":
    main()
