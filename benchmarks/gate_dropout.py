"""Gate dropout against gate polarization (Zhao et al., RecSys 2019), on census-income.

Zhao et al. saw MMoE's softmax gates collapse onto one expert per task ("gate polarization") and
countered it with gate dropout: in training, each expert's gate weight is zeroed with probability
10% and the rest renormalised. This script trains the same MMoE on the census-income task pair
(income, never_married; ``features/specs/census.yaml``) from each seed twice, with
``gate_dropout=0`` and ``gate_dropout=0.1``, and counts polarized gates with the project's
definition (``ranking.gate_health``: a task's gate is polarized when its rows give, on average,
more than 0.9 of their weight to one expert), measured on the validation split after the last
epoch (gate dropout is off in evaluation). Test AUCs show what the regulariser costs.

Setting (``Setting``): the project's default MMoE (shared bottom 256, 4 experts of 128→64, towers
of 32, softmax gates on the bottom's output), trained with the project's Lightning module
(``ranking.train.fit``, fixed loss weights) for 3 epochs, batch 1024, Adam lr 1e-2.
The learning rate is 5× the project default (2e-3): at 2e-3 the gates approach but rarely cross
the 0.9 line within 5 epochs (probe: mean top weights 0.70–0.88), and this study needs a regime
where polarization happens. One thread; no MLflow, no checkpoints.

    .venv/bin/python benchmarks/gate_dropout.py                  # 10 seeds x 2 arms, about 5 min
    .venv/bin/python benchmarks/gate_dropout.py --smoke          # seconds
    .venv/bin/python benchmarks/gate_dropout.py --features DIR   # reuse a census features folder
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from features.build import build
from features.datasets import scan_dataset
from features.spec import load_spec
from ranking.config import GateConfig, ModelConfig
from ranking.gate_health import GateHealth
from ranking.train import FitConfig, OptimConfig, fit, load_features

CENSUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "census_income_kdd"


@dataclass(frozen=True)
class Setting:
    """What every run shares; only ``gate_dropout`` and the seed change."""

    num_experts: int = 4
    epochs: int = 3
    batch_size: int = 1024
    lr: float = 1e-2
    seeds: int = 10
    dropouts: tuple[float, ...] = (0.0, 0.1)
    limit_train_batches: int | float = 1.0


@dataclass(frozen=True)
class Run:
    """One trained model: gate health on the validation split and task metrics on the test split."""

    seed: int
    gate_dropout: float
    health: GateHealth
    test: dict[str, float]  # "test/<task>/auc" ...
    seconds: float


def census_features(out: Path, raw: Path = CENSUS) -> Path:
    """Build the census-income features folder (as ``ranker features build --dataset census``)."""
    build(scan_dataset("census", raw), load_spec("census"), out)
    return out


def train_once(features: Path, setting: Setting, seed: int, gate_dropout: float) -> Run:
    """Train one MMoE through ``ranking.train.fit`` and measure gates (validation) and test metrics."""
    start = time.perf_counter()
    config = ModelConfig.from_fitted(load_features(features), model="mmoe", num_experts=setting.num_experts,
                                     gate=GateConfig(dropout=gate_dropout))
    result = fit(features, config, FitConfig(epochs=setting.epochs, batch_size=setting.batch_size,
                                             optim=OptimConfig(lr=setting.lr), seed=seed, accelerator="cpu",
                                             limit_train_batches=setting.limit_train_batches))
    health = result.module.last_gate_health
    if health is None:
        raise ValueError("no gate health after training: did validation run?")
    test = {k.removeprefix("final/"): v for k, v in result.metrics.items() if k.startswith("final/test/")}
    return Run(seed, gate_dropout, health, test, time.perf_counter() - start)


def describe(values: list[float]) -> str:
    """``mean ± std (min–max)``, 4 decimals."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f} ({min(values):.4f}–{max(values):.4f})"


def report(setting: Setting, runs: list[Run]) -> str:
    """Per-seed table, polarization totals and test metrics per arm, as Markdown."""
    tasks = runs[0].health.tasks
    by = {(r.seed, r.gate_dropout): r for r in runs}
    seeds = sorted({r.seed for r in runs})
    metric_keys = sorted(k for k in runs[0].test if k.endswith("/auc"))
    names = " / ".join(tasks)
    header = " | ".join(f"gate_dropout={p:g}: top weight | AUC" for p in setting.dropouts)
    lines = [f"Per seed: mean top gate weight per task ({names}; * = polarized, > 0.9) and test AUCs ({names})",
             "", f"| seed | {header} |", "|---|" + "---|---|" * len(setting.dropouts)]
    for s in seeds:
        cells: list[str] = []
        for p in setting.dropouts:
            r = by[s, p]
            flags = zip(r.health.max_weight, r.health.polarized, strict=True)
            cells.append(" / ".join(f"{w:.3f}{'*' if pol else ''}" for w, pol in flags))
            cells.append(" / ".join(f"{r.test[k]:.4f}" for k in metric_keys))
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "Totals over seeds", "", "| gate_dropout | polarized gates | polarized, per task "
              f"({', '.join(tasks)}) | runs with ≥ 1 polarized gate | mean top weight | entropy (nats) | "
              + " | ".join(metric_keys) + " |", "|---|---|---|---|---|---|" + "---|" * len(metric_keys)]
    for p in setting.dropouts:
        arm = [r for r in runs if r.gate_dropout == p]
        per_task = [sum(r.health.polarized[t] for r in arm) for t in range(len(tasks))]
        total = sum(per_task)
        any_pol = sum(any(r.health.polarized) for r in arm)
        tops = [w for r in arm for w in r.health.max_weight]
        ent = [e for r in arm for e in r.health.entropy]
        cells = [describe([r.test[k] for r in arm]) for k in metric_keys]
        lines.append(f"| {p:g} | {total} of {len(tops)} | {', '.join(map(str, per_task))} | {any_pol} of {len(arm)} "
                     f"| {describe(tops)} | {describe(ent)} | " + " | ".join(cells) + " |")
    if len(setting.dropouts) == 2:
        lo, hi = setting.dropouts
        lines += ["", f"Paired by seed, gate_dropout={hi:g} minus gate_dropout={lo:g}: mean ± std (min–max)", ""]
        lines += [f"- {k}: {describe([by[s, hi].test[k] - by[s, lo].test[k] for s in seeds])}" for k in metric_keys]
    lines.append(f"\nmean seconds per run: {statistics.mean(r.seconds for r in runs):.1f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=Path, default=None, help="a census features folder (built if omitted)")
    ap.add_argument("--raw", type=Path, default=CENSUS, help="the census-income KDD files")
    ap.add_argument("--seeds", type=int, default=Setting.seeds)
    ap.add_argument("--epochs", type=int, default=Setting.epochs)
    ap.add_argument("--lr", type=float, default=Setting.lr)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="1 seed, 1 epoch of 3 batches: checks that it runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="lightning")  # hints about workers and loggers, not findings
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    setting = Setting(seeds=args.seeds, epochs=args.epochs, lr=args.lr)
    if args.smoke:
        setting = dataclasses.replace(setting, seeds=1, epochs=1, limit_train_batches=3)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gate-dropout-") as tmp:
        features = args.features or census_features(Path(tmp) / "census", args.raw)
        runs = [train_once(features, setting, seed, p) for seed in range(setting.seeds) for p in setting.dropouts]
    print(f"setting: {setting}")
    print(report(setting, runs))
    print(f"wall time: {time.perf_counter() - start:.1f} s ({torch.get_num_threads()} thread(s))")


if __name__ == "__main__":
    main()
