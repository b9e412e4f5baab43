"""The routing study: which gating strategy of ``GateConfig.kind`` to use, measured on real data.

Strategies (MMoE, the same experts and towers, only the routing changes):

- ``softmax``: dense, every expert on every row (the default);
- ``noisy_topk``: k = 2 with trainable noise (Shazeer et al.);
- ``top_p``: p = 0.8, at least 1 expert;
- ``expert_choice``: k = 2, capacity factor 1 (Zhou et al.);
- ``hash``: the expert fixed by a hash of the first single-valued sparse feature (KuaiRand: the
  user id; census: class of worker), no learned router: the baseline;
- ``shared_topk``: 2 shared experts chosen once per row for all tasks, plus 1 private expert
  per task (a task-shared selection, as SMES).

Two phases, each resumable from ``--work``:

1. ``--train`` (per ``--dataset``): every strategy and seed through the dataset's benchmark
   protocol (``benchmarks/kuairand.py``: the peers' KuaiRand-Pure split, test AUC and gAUC per task
   at the best validation epoch, checked against the protocol's own ``evaluate``;
   ``benchmarks/census.py``: MMoE paper group 1, test AUC at the best validation epoch). Rows are
   appended to ``<work>/<dataset>.jsonl`` as runs finish, so an interrupted study continues.
2. ``--report``: routing health of each selected model on the test split (expert load per task and
   its CV, active experts per row, rows no expert serves, specialisation), training samples/s, the
   in-process serving cost per candidate at k = 1..E for experts large enough to matter
   (16 experts of [512, 256]), and the tables in ``benchmarks/results/routing.md``.

    .venv/bin/python benchmarks/routing.py --train --dataset kuairand --work /tmp/routing
    .venv/bin/python benchmarks/routing.py --train --dataset census --work /tmp/routing
    .venv/bin/python benchmarks/routing.py --report --work /tmp/routing
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from ranking.config import GateConfig

HERE = Path(__file__).resolve().parent
STRATEGIES: dict[str, GateConfig] = {
    "softmax": GateConfig(),
    "noisy_topk": GateConfig("noisy_topk", top_k=2),
    "top_p": GateConfig("top_p", top_p=0.8),
    "expert_choice": GateConfig("expert_choice", top_k=2, capacity_factor=1.0),
    "hash": GateConfig("hash"),
    "shared_topk": GateConfig("shared_topk", top_k=2, private_experts=1),
}


def _benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (the benchmarks folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ValueError(f"benchmark {name!r} not found in {str(HERE)!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def done_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def train(dataset: str, work: Path, seeds: list[int], strategies: list[str], epochs: int | None,
          threads: int) -> None:
    """Every strategy x seed of one dataset through its protocol; rows appended to ``<work>/<dataset>.jsonl``."""
    grid = {name: {"gate": STRATEGIES[name]} for name in strategies}
    train_grid(dataset, work, seeds, grid, "strategy", epochs, threads)


def train_grid(dataset: str, work: Path, seeds: list[int], grid: dict[str, dict[str, Any]], key: str,
               epochs: int | None, threads: int) -> None:
    """Each named set of MMoE overrides x seed through the dataset's protocol (``run_ours``), skipping
    the (name, seed) pairs already in ``<work>/<dataset>.jsonl`` and appending a row per run, with the
    name under ``key`` (this study's ``strategy``, the quality ablation's ``option``). Keys
    ``train.<field>`` of a set are training settings (``TrainConfig`` fields over the recipe), the
    others model-config fields."""
    from features.build import build
    from features.datasets import scan_dataset
    from features.spec import load_spec

    bench = _benchmark(dataset)
    data = bench.SHARED / "data" / ("kuairand_pure_subset" if dataset == "kuairand" else "census_income_kdd")
    root = work / dataset
    features = root / "features"
    if not (features / "transform.json").is_file():
        build(scan_dataset(dataset, data), load_spec(dataset), features)
    out = work / f"{dataset}.jsonl"
    have = {(r[key], r["seed"]) for r in done_rows(out)}
    n_epochs = epochs or (5 if dataset == "kuairand" else 10)  # the protocols' epochs
    for name, overrides in grid.items():
        model = {k: v for k, v in overrides.items() if not k.startswith("train.")}
        training = {k.removeprefix("train."): v for k, v in overrides.items() if k.startswith("train.")}
        run_epochs = training.pop("epochs", n_epochs)
        for seed in seeds:
            if (name, seed) in have:
                continue
            if dataset == "kuairand":
                row = bench.run_ours(root, features, "mmoe", seed, run_epochs, threads, model, f"_{name}", training)
            else:
                import torch

                torch.set_num_threads(threads)
                row = bench.run_ours(root, features, "mmoe", seed, run_epochs, model, f"_{name}", training)
            row.update({key: name}, dataset=dataset, epochs=run_epochs,
                       rows_per_epoch=154_071 if dataset == "kuairand" else bench.TRAIN_ROWS,
                       overrides={k: v.__dict__ if isinstance(v, GateConfig) else v for k, v in overrides.items()})
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in ("dataset", key, "seed", "best_epoch", "wall_s")}), flush=True)


def verdict(values: list[float], reference: list[float]) -> tuple[float, int]:
    """(mean difference, +1 win / -1 loss / 0) of ``values`` against ``reference``: a win or loss when
    the means differ by more than twice the larger of the two seed standard deviations."""
    d = statistics.mean(values) - statistics.mean(reference)
    noise = 2 * max(_sd(values), _sd(reference))
    return d, (d > noise) - (d < -noise)


# ------------------------------------------------------------------------- serving cost
LARGE: dict[str, Any] = {"num_experts": 16, "expert_dims": (512, 256)}  # experts large enough for routing to save time
SERVING_K = (1, 2, 3, 4, 6, 8, 12, 16)  # experts per row served from the softmax model (above 8: the dense path)
SERVING_KINDS: dict[str, GateConfig] = {  # the other strategies at their sparsest sensible setting
    "hash": GateConfig("hash"),
    "expert_choice k=1": GateConfig("expert_choice", top_k=1),
    "shared_topk k=1": GateConfig("shared_topk", top_k=1, private_experts=1),
    "shared_topk k=2": GateConfig("shared_topk", top_k=2, private_experts=1),
}


def test_requests(data: Path, spec: Any, n_candidates: int, count: int) -> list[Any]:
    """``count`` raw requests of ``n_candidates`` consecutive KuaiRand test rows each (user and
    context of the first row; rows with a null feature skipped, as the API has no null)."""
    from features.build import split_expr
    from features.datasets import scan_dataset

    raw = scan_dataset("kuairand", data)
    user, context, item = (spec.features_from(s) for s in ("user", "context", "item"))
    rows = raw.filter(split_expr(raw, spec) == "test").select(*user, *context, *item).drop_nulls() \
        .head(n_candidates * count).collect()
    out = []
    for i in range(count):
        part = rows.slice(i * n_candidates, n_candidates)
        first = part.row(0, named=True)
        out.append(({c: first[c] for c in user}, {c: first[c] for c in context},
                    {c: part[c].to_list() for c in item}))
    return out


def serving_cost(work: Path, threads: int, rounds: int, seconds: float, aoti: bool) -> list[dict[str, Any]]:
    """In-process µs per candidate of the KuaiRand model with 16 experts of [512, 256] (untrained
    weights: the cost does not depend on them), softmax-trained and served at k = 1, 2, 3, 4, 6, 8, 12, 16
    (``InferenceModel(experts_k=k)``, what ``ranker serve --experts-k`` does), and the other
    strategies; per batch of 1, 100 and 1,000 candidates (10 requests of 100), the forward alone
    and ``score_requests`` (encode + forward). Configurations are interleaved over ``rounds``;
    each figure is the fastest round's median."""
    import time

    import numpy as np
    import torch

    from features.fitted import FittedTransform
    from ranking.artifact import build_model, export_artifact
    from ranking.config import ModelConfig
    from ranking.inference import InferenceModel

    bench = _benchmark("kuairand")
    torch.set_num_threads(threads)
    fitted = FittedTransform.load(work / "kuairand" / "features" / "transform.json")
    data = bench.SHARED / "data" / "kuairand_pure_subset"
    reqs = test_requests(data, fitted.spec, 100, 10)
    one = [(reqs[0][0], reqs[0][1], {c: v[:1] for c, v in reqs[0][2].items()})]
    batches = {1: one, 100: reqs[:1], 1000: reqs}
    arts = {}
    for name, gate in [("softmax", GateConfig()), *SERVING_KINDS.items()]:
        torch.manual_seed(0)
        cfg = ModelConfig.from_fitted(fitted, **{**bench.MODELS["mmoe"], **LARGE, "gate": gate})
        folder = work / "serving" / name.replace(" ", "_").replace("=", "")
        arts[name] = export_artifact(build_model(cfg), cfg, fitted, folder)
    e = int(LARGE["num_experts"])
    dense = f"softmax (dense, k={e})"
    ks = {f"softmax k={k}" if k < e else dense: k for k in SERVING_K}
    models: dict[str, InferenceModel] = {name: InferenceModel(arts["softmax"], experts_k=k % e)  # 0: as trained
                                         for name, k in ks.items()}
    for name in SERVING_KINDS:
        models[name] = InferenceModel(arts[name])
    if aoti:
        for name in ("softmax k=1", "softmax k=2", "softmax k=4", dense):
            m = InferenceModel(arts["softmax"], experts_k=ks[name] % e)
            if m.compile(work / "serving" / "compiled"):
                models[f"{name}, compiled"] = m
    encoded = {(name, n): (m, m.plan.encode(b), b) for name, m in models.items() for n, b in batches.items()}
    for m, _, raw in encoded.values():  # every path equal to its own reference, and warm
        got, want = m.score_requests(raw), m.reference_score_requests(raw)
        for g, w in zip(got, want, strict=True):
            for t in m.tasks:
                if np.abs(g[t] - w[t]).max() > 1e-4:
                    raise ValueError(f"{m.path.name} k={m.experts_k}: served scores differ from the reference path "
                                     f"on {t} by {np.abs(g[t] - w[t]).max():.2e}")
    best: dict[tuple[str, int, str], float] = {}
    for _ in range(rounds):
        for (name, n), (m, enc, raw) in encoded.items():
            for step, fn in (("forward", lambda m=m, e=enc: m.scorer.score(e)),
                             ("score_requests", lambda m=m, r=raw: m.score_requests(r))):
                fn()
                times = []
                end = time.perf_counter() + seconds
                while time.perf_counter() < end or len(times) < 3:
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                us = 1e6 * float(np.median(times)) / n
                key = (name, n, step)
                best[key] = min(best.get(key, us), us)
    rows = []
    for name in models:
        row: dict[str, Any] = {"config": name, "threads": threads}
        for n in batches:
            for step in ("forward", "score_requests"):
                row[f"{step}_{n}"] = best[(name, n, step)]
                row[f"{step}_{n}_ratio"] = best[(name, n, step)] / best[(dense, n, step)]
        rows.append(row)
    (work / "serving_cost.json").write_text(json.dumps(rows, indent=1))
    return rows


def serving_table(rows: list[dict[str, Any]]) -> str:
    head = ["serving", *[f"{step} µs/cand @{n} (× dense)" for n in (1, 100, 1000) for step in ("forward",
                                                                                            "score_requests")]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"]] + [f"{r[f'{s}_{n}']:.2f} ({r[f'{s}_{n}_ratio']:.2f})" for n in (1, 100, 1000)
                                 for s in ("forward", "score_requests")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--dataset", choices=("kuairand", "census"), default="kuairand")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--seeds", default="2022,2023,2024", help="comma list; >= 3 for mean ± std")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma list of {list(STRATEGIES)}")
    ap.add_argument("--epochs", type=int, default=None, help="default: the protocol's (KuaiRand 5, census 10)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "routing.md")
    ap.add_argument("--serving", action="store_true",
                    help="measure the serving cost per candidate at k in SERVING_K (needs --train's KuaiRand features)")
    ap.add_argument("--aoti", action="store_true", help="with --serving: also the compiled network at k = 1, 2, 4, 16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.25, help="with --serving: timed seconds per figure and round")
    args = ap.parse_args()
    strategies = [s.strip() for s in args.strategies.split(",")]
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        raise SystemExit(f"error: unknown --strategies {unknown}; known: {list(STRATEGIES)}")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.train:
        train(args.dataset, args.work, [int(s) for s in args.seeds.split(",")], strategies, args.epochs,
              args.threads)
    if args.serving:
        print(serving_table(serving_cost(args.work, args.threads, args.rounds, args.seconds, args.aoti)), flush=True)
    if args.report:
        report(args.work, args.out)


def _stat(values: list[float], digits: int = 4) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


TASKS = {"kuairand": ("is_click", "long_view", "is_like"), "census": ("income", "never_married")}


def quality_table(dataset: str, rows: list[dict[str, Any]]) -> str:
    """Test metrics at the best validation epoch, mean ± std over seeds, one line per strategy."""
    tasks = TASKS[dataset]
    metrics = ("auc", "gauc") if dataset == "kuairand" else ("auc",)
    head = ["strategy", "seeds", *[f"{t} {m}" for t in tasks for m in metrics], "verdict vs softmax",
            "best epoch", "samples/s (whole run)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = {name: [r for r in rows if r["strategy"] == name] for name in STRATEGIES}
    base = {(t, m): statistics.mean(_metric(r, t, m) for r in by["softmax"]) for t in tasks for m in metrics} \
        if by["softmax"] else {}
    for name, runs in by.items():
        if not runs:
            continue
        cells = [name, str(len(runs))]
        wins = losses = 0
        for t in tasks:
            for m in metrics:
                vals = [_metric(r, t, m) for r in runs]
                delta = f" ({statistics.mean(vals) - base[(t, m)]:+.4f})" if base and name != "softmax" else ""
                cells.append(_stat(vals) + delta)
                if base and name != "softmax":
                    _, sign = verdict(vals, [_metric(r, t, m) for r in by["softmax"]])
                    wins, losses = wins + (sign > 0), losses + (sign < 0)
        n = len(tasks) * len(metrics)
        cells.append("-" if name == "softmax" or not base else
                     f"loses {losses}, wins {wins} of {n}" + (": **loses**" if losses > wins else ""))
        cells.append(", ".join(str(r["best_epoch"]) for r in runs))
        rate = [r["rows_per_epoch"] * r["epochs"] / r["wall_s"] for r in runs]
        cells.append(f"{statistics.median(rate):,.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _metric(row: dict[str, Any], task: str, metric: str) -> float:
    got = row["test"][task]
    return float(got[metric] if isinstance(got, dict) else got)


def routing_health(artifact: Path, features: Path) -> dict[str, Any]:
    """Routing health of one trained model on the test split, scored in ``ranking.evaluate``'s chunks."""
    import polars as pl
    import torch

    from ranking.artifact import load_artifact
    from ranking.batch import FeatureTable
    from ranking.evaluate import EVAL_BATCH
    from ranking.gate_health import GateStats

    model, cfg, _, _ = load_artifact(artifact)
    table = FeatureTable(pl.read_parquet(features / "test.parquet"), cfg)
    stats: GateStats | None = None
    with torch.inference_mode():
        for start in range(0, len(table), EVAL_BATCH):
            b = table.batch(torch.arange(start, min(start + EVAL_BATCH, len(table))))
            gates = model(b.sparse, b.dense, None).gates
            if gates is None:
                raise ValueError(f"{str(artifact)!r}: the model returns no gates")
            stats = stats or GateStats.for_model(cfg, gates.shape[-1])
            stats.update(gates, stats.ids_of(b.sparse))
    assert stats is not None
    h = stats.compute(model)
    t = len(h.tasks)
    out: dict[str, Any] = {
        "load_cv": sum(h.load_cv) / t, "importance_cv": sum(h.importance_cv) / t,
        "active_experts": sum(h.active_experts) / t, "dropped": max(h.dropped), "underserved": max(h.underserved),
        "dead_fraction": h.dead_fraction, "entropy": sum(h.entropy) / t, "problems": h.problems(),
        "experts": stats.num_experts,
    }
    if h.task_mi is not None:
        out["mi_task_norm"] = h.task_mi.normalised
        out["specialised_task"] = h.task_mi.specialised
    for g, per_task in h.group_mi.items():
        out[f"mi_{g}_norm"] = sum(d.normalised for d in per_task) / t
        out[f"specialised_{g}"] = sum(d.specialised for d in per_task)  # tasks specialised on g
    return out


def health_rows(dataset: str, work: Path) -> list[dict[str, Any]]:
    """:func:`routing_health` of every trained run of ``dataset``, cached in ``<work>/<dataset>_health.jsonl``."""
    cache = work / f"{dataset}_health.jsonl"
    have = {(r["strategy"], r["seed"]): r for r in done_rows(cache)}
    for row in done_rows(work / f"{dataset}.jsonl"):
        key = (row["strategy"], row["seed"])
        if key in have or "artifact" not in row:
            continue
        got = {"strategy": row["strategy"], "seed": row["seed"],
               **routing_health(Path(row["artifact"]), work / dataset / "features")}
        with cache.open("a") as f:
            f.write(json.dumps(got) + "\n")
        have[key] = got
    return list(have.values())


FINDINGS = {  # GateHealth.problems() lines by kind, for a short summary over seeds
    "collapsed": re.compile(r"^router of task \S+ is collapsed"),
    "near-dead experts": re.compile(r"of experts are near-dead"),
    "dropped rows": re.compile(r"of rows get no expert"),
    "polarized": re.compile(r"is polarized"),
    "identical experts": re.compile(r"^experts are identical"),
}


def _findings(runs: list[dict[str, Any]]) -> str:
    """``GateHealth.problems()`` of the seeds, counted: collapsed routers per (task, seed), else seeds."""
    parts = []
    for name, pattern in FINDINGS.items():
        hits = [sum(bool(pattern.search(p)) for p in r["problems"]) for r in runs]
        if not any(hits):
            continue
        if name == "collapsed":
            parts.append(f"collapsed router in {sum(hits)} (task, seed) pairs")
        else:
            parts.append(f"{name} in {sum(h > 0 for h in hits)} of {len(runs)} seeds")
    return "; ".join(parts) if parts else "none"


def health_table(rows: list[dict[str, Any]]) -> str:
    """Routing health on the test split, mean over seeds (specialisation: MI above chance over the
    entropy of the expert choice; in brackets how many of the seeds' tasks are called specialised)."""
    groups = [g for g in ("task", "category", "segment") if any(f"mi_{g}_norm" in r for r in rows)]
    head = ["strategy", "experts", "active experts / row", "load CV", "importance CV", "dropped (worst task)",
            "under-served", "dead experts", *[f"specialisation: {g}" for g in groups], "findings"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in STRATEGIES:
        runs = [r for r in rows if r["strategy"] == name]
        if not runs:
            continue

        def mean(key: str, rs: list[dict[str, Any]] = runs) -> float:
            return statistics.mean(float(r[key]) for r in rs)

        cells = [name, str(runs[0]["experts"]), f"{mean('active_experts'):.2f}", f"{mean('load_cv'):.3f}",
                 f"{mean('importance_cv'):.3f}", f"{mean('dropped'):.2%}", f"{mean('underserved'):.2%}",
                 f"{mean('dead_fraction'):.0%}"]
        for g in groups:
            flags = sum(int(r[f"specialised_{g}"]) for r in runs)
            cells.append(f"{mean(f'mi_{g}_norm'):.3f} ({flags})")
        cells.append(_findings(runs))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LOWERED_K = (1, 2, 4)  # experts per row served from models of the KuaiRand study (8 experts)


def lowered_k_rows(work: Path) -> list[dict[str, Any]]:
    """Test AUC / gAUC of the KuaiRand softmax and noisy top-k models served with fewer experts per
    row (``--experts-k``), scored with the protocol's ``evaluate``; cached in ``<work>/kuairand_lowered_k.jsonl``."""
    bench = _benchmark("kuairand")
    cache = work / "kuairand_lowered_k.jsonl"
    have = {(r["strategy"], r["seed"], r["k"]) for r in done_rows(cache)}
    for row in done_rows(work / "kuairand.jsonl"):
        if row["strategy"] not in ("softmax", "noisy_topk"):
            continue
        for k in LOWERED_K:
            if (row["strategy"], row["seed"], k) in have:
                continue
            test = bench.protocol_scores(Path(row["artifact"]), work / "kuairand" / "features", "test", k)
            with cache.open("a") as f:
                f.write(json.dumps({"strategy": row["strategy"], "seed": row["seed"], "k": k, "test": test}) + "\n")
    return done_rows(cache)


def lowered_k_table(trained: list[dict[str, Any]], lowered: list[dict[str, Any]]) -> str:
    tasks = TASKS["kuairand"]
    head = ["trained as", "served k", *[f"{t} {m}" for t in tasks for m in ("auc", "gauc")]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in ("softmax", "noisy_topk"):
        full = [r for r in trained if r["strategy"] == name]
        if not full:
            continue
        e = 8 if name == "softmax" else 2
        variants = [(f"{e} (as trained)", full)] + [
            (str(k), [r for r in lowered if r["strategy"] == name and r["k"] == k]) for k in LOWERED_K if k < e]
        base = {(t, m): statistics.mean(_metric(r, t, m) for r in full) for t in tasks for m in ("auc", "gauc")}
        for label, runs in variants:
            if not runs:
                continue
            cells = [name, label]
            for t in tasks:
                for m in ("auc", "gauc"):
                    vals = [_metric(r, t, m) for r in runs]
                    delta = "" if runs is full else f" ({statistics.mean(vals) - base[(t, m)]:+.4f})"
                    cells.append(_stat(vals) + delta)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(work: Path, out: Path) -> None:
    """Phase 2 (see the module docstring): the tables from the rows in ``work``, written to ``out``."""
    import datetime as dt
    import platform

    parts = ["# Routing study", "",
             "Which `gate.kind` to use (see the module docstring of `benchmarks/routing.py` for the strategies and",
             "their settings). Written by", "",
             "    .venv/bin/python benchmarks/routing.py --train --dataset kuairand --work W   # 18 runs",
             "    .venv/bin/python benchmarks/routing.py --train --dataset census --work W     # 18 runs",
             "    .venv/bin/python benchmarks/routing.py --serving --aoti --work W",
             "    .venv/bin/python benchmarks/routing.py --report --work W", "",
             f"- written {dt.date.today()}, {platform.machine()}, {os.cpu_count()} cores, Python "
             f"{platform.python_version()}; seeds 2022, 2023, 2024 per strategy;",
             "- quality: KuaiRand with the peers' protocol (`benchmarks/kuairand.py`: MMoE of 8 experts of [128, 64],",
             "  5 epochs, test AUC and gAUC at the best validation epoch, checked against the protocol's `evaluate`);",
             "  census group 1 (`benchmarks/census.py`, 10 epochs, test AUC at the best validation epoch);",
             "- verdict: metrics where the mean differs from softmax's by more than twice the larger seed",
             "  standard deviation; a strategy that loses more than it wins is marked **loses**;",
             "- samples/s: the whole run (start-up, validation and test included) at 1 torch thread, two",
             "  studies sharing the 2 cores for part of the time: compare within a dataset only, roughly;",
             "- expert choice routes within a group: a training batch, an evaluation chunk of 16,384 rows",
             "  (`ranking.evaluate.EVAL_BATCH`) offline, one request at serving; its rows' weights sum to less",
             "  than 1 by design (only the experts that took a row weigh it), hence 100% under-served;",
             f"- work folder of this run: `{work}` (W above)", ""]
    for dataset in ("kuairand", "census"):
        rows = done_rows(work / f"{dataset}.jsonl")
        if not rows:
            continue
        parts += [f"## {dataset}: test metrics at the best validation epoch (Δ: against softmax)", "",
                  quality_table(dataset, rows), "",
                  f"### {dataset}: routing health on the test split (mean over seeds)", "",
                  health_table(health_rows(dataset, work)), ""]
    trained = done_rows(work / "kuairand.jsonl")
    if trained:
        parts += ["## KuaiRand: fewer experts at serving (`--experts-k`), no retraining (Δ: against as trained)", "",
                  lowered_k_table(trained, lowered_k_rows(work)), ""]
    cost = work / "serving_cost.json"
    if cost.is_file():
        parts += ["## Serving cost per candidate, in process (KuaiRand features, 16 experts of [512, 256])", "",
                  serving_table(json.loads(cost.read_text())), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts) + "\n")
    print("\n".join(parts))


if __name__ == "__main__":
    main()
