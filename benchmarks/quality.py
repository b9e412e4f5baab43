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
    .venv/bin/python benchmarks/quality.py --report --work W      # benchmarks/results/quality.md
"""

from __future__ import annotations

import argparse
import importlib.util
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


def train(dataset: str, work: Path, seeds: list[int], options: list[str], threads: int) -> None:
    """Every option x seed of one dataset through its protocol; rows appended to ``<work>/<dataset>.jsonl``."""
    STUDY.train_grid(dataset, work, seeds, {name: OPTIONS[name] for name in options}, "option", None, threads)


def table(dataset: str, rows: list[dict[str, Any]]) -> str:
    """Test metrics at the best validation epoch, mean ± sd over seeds; Δ and verdict against baseline."""
    tasks = TASKS[dataset]
    metrics = ("auc", "gauc") if dataset == "kuairand" else ("auc",)
    head = ["option", "seeds", *[f"{t} {m}" for t in tasks for m in metrics], "verdict vs baseline", "wall s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = {name: [r for r in rows if r["option"] == name] for name in OPTIONS}
    base = by["baseline"]
    for name, runs in by.items():
        if not runs:
            continue
        cells = [name, str(len(runs))]
        wins = losses = 0
        for t in tasks:
            for m in metrics:
                vals = [STUDY._metric(r, t, m) for r in runs]
                cell = STUDY._stat(vals)
                if base and name != "baseline":
                    d, sign = STUDY.verdict(vals, [STUDY._metric(r, t, m) for r in base])
                    wins, losses = wins + (sign > 0), losses + (sign < 0)
                    cell += f" ({d:+.4f})"
                cells.append(cell)
        n = len(tasks) * len(metrics)
        cells.append("-" if name == "baseline" or not base else f"wins {wins}, loses {losses} of {n}")
        cells.append(f"{statistics.median(r['wall_s'] for r in runs):.0f}")
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
             "- verdict: metrics where the mean differs from the baseline's by more than twice the larger seed sd;",
             "- wall s / run: whole runs, some with other jobs on the 2 cores: not a cost comparison;",
             f"- options: `{json.dumps(OPTIONS)}`", ""]
    for dataset in ("kuairand", "census"):
        rows = STUDY.done_rows(work / f"{dataset}.jsonl")
        if rows:
            seeds = sorted({r["seed"] for r in rows})
            parts += [f"## {dataset} (seeds {', '.join(map(str, seeds))})", "", table(dataset, rows), ""]
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
    if args.report:
        report(args.work, args.out)


if __name__ == "__main__":
    main()
