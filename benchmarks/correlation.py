"""The MMoE paper's synthetic task-correlation study (Ma et al., KDD 2018, §3.2 and Fig. 4/5).

Two regression tasks whose relatedness is set by ``p``, the cosine (Pearson correlation) of the
task weight vectors::

    u1, u2 orthogonal unit vectors in R^d         w1 = c·u1,   w2 = c·(p·u1 + sqrt(1 − p²)·u2)
    x ~ N(0, I_d)                                 y_i = w_iᵀx + Σ_{j=1..m} sin(α_j·w_iᵀx + β_j) + ε_i

shared_bottom, omoe and mmoe from ``ranking.artifact.build_model`` (dense-only inputs, no sparse
features) learn both tasks at once; the figure is each model's test MSE (mean of the two tasks) per
``p``, over seeds. The paper's finding: the lower the correlation the worse multi-task models do,
and MMoE degrades least.

Constants the paper leaves out, and what this script uses (``StudyConfig``):

- d = 100 (the paper's input dimension), c = 1, m = 10;
- α_j, β_j ~ N(0, 1), drawn ONCE from ``torch.Generator().manual_seed(2018)`` and shared by both
  tasks and every seed (the paper calls them "given parameters"); u1, u2 (QR of a Gaussian d×2
  matrix), x and ε are redrawn per seed;
- ε ~ N(0, 0.01) read as variance 0.01 (std 0.1), independent per task;
- 10,000 training rows, 5,000 test rows per seed; the same x, u1, u2, ε for every p and model of a
  seed (paired comparison), only w2 changes with p;
- architectures as the paper describes its synthetic runs: 8 experts of one 16-unit ReLU layer
  (omoe, mmoe; softmax gates on the raw input), a 113-unit one-layer shared bottom, one 8-unit ReLU
  tower per task; parameters 13,255 / 14,026 / 14,834 (shared_bottom / omoe / mmoe);
- training: a plain PyTorch loop (not the Lightning module: this is a model study and the data
  lives in memory), loss = MSE(y1) + MSE(y2), Adam lr 3e-3, batch 256, 30 epochs (1,170 steps),
  no weight decay, no early stopping, one thread; the test MSE is measured after every epoch.

The models have no sparse features (``sparse=()``): ``RankingModel`` then feeds the dense
inputs alone to its bottom layer.

    .venv/bin/python benchmarks/correlation.py            # full study, about 4 min on 1 core
    .venv/bin/python benchmarks/correlation.py --smoke    # seconds
    .venv/bin/python benchmarks/correlation.py --scale 0.3 --sines 5   # keras-mmoe's c and m
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass

import torch
from torchrec import KeyedJaggedTensor

from ranking.artifact import build_model
from ranking.config import ModelConfig, TaskHead
from ranking.gate_health import GateStats
from ranking.models import RankingModel

TASKS = ("y1", "y2")


@dataclass(frozen=True)
class StudyConfig:
    """Every constant of the study (see the module docstring for why each value)."""

    dim: int = 100  # d
    scale: float = 1.0  # c
    sines: int = 10  # m
    sine_seed: int = 2018  # α, β ~ N(0, 1) from this seed, fixed across runs
    noise_std: float = 0.1  # ε ~ N(0, 0.1²)
    train_rows: int = 10_000
    test_rows: int = 5_000
    correlations: tuple[float, ...] = (0.5, 0.9, 1.0)
    models: tuple[str, ...] = ("shared_bottom", "omoe", "mmoe")
    seeds: int = 10
    epochs: int = 30
    batch_size: int = 256
    lr: float = 3e-3
    num_experts: int = 8
    expert_units: int = 16
    bottom_units: int = 113  # shared_bottom's one layer: about the MoE models' parameter count
    tower_units: int = 8


@dataclass(frozen=True)
class SeedData:
    """One seed's draw: inputs, the two directions and the noise, shared by every p and model."""

    x_train: torch.Tensor  # (N, d)
    x_test: torch.Tensor  # (M, d)
    u: torch.Tensor  # (2, d) orthonormal rows u1, u2
    noise_train: torch.Tensor  # (N, 2)
    noise_test: torch.Tensor  # (M, 2)


@dataclass(frozen=True)
class RunResult:
    """One trained model: its test MSE after every epoch and, for gated models, gate health."""

    curve: list[float]  # (epochs,) test MSE, mean of the two tasks
    max_gate_weight: list[float] | None  # (T,) mean top gate weight on the test set
    polarized: int | None  # tasks whose gate is polarized (gate_health definition)

    @property
    def final(self) -> float:
        return self.curve[-1]


def no_sparse(rows: int) -> KeyedJaggedTensor:
    """A KeyedJaggedTensor with no features for a batch of ``rows`` rows."""
    return KeyedJaggedTensor(keys=[], values=torch.zeros(0), lengths=torch.zeros(0, dtype=torch.int32), stride=rows)


def dense_model(config: ModelConfig) -> RankingModel:
    """``build_model`` for a config with ``sparse=()``.

    Example:
        >>> cfg = ModelConfig(sparse=(), dense=("a", "b"), tasks=(TaskHead("y", "regression", "engagement"),),
        ...                   bottom_dims=(), expert_dims=(4,), tower_dims=(2,), num_experts=2)
        >>> dense_model(cfg)(no_sparse(5), torch.zeros(5, 2)).logits["y"].shape
        torch.Size([5])
    """
    if config.sparse:
        raise ValueError(f"dense_model wants a config without sparse features, got {[s.name for s in config.sparse]}")
    return build_model(config)


def sine_params(cfg: StudyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """α, β: (m,) each, the same for every seed."""
    g = torch.Generator().manual_seed(cfg.sine_seed)
    return torch.randn(cfg.sines, generator=g), torch.randn(cfg.sines, generator=g)


def draw_seed(cfg: StudyConfig, seed: int) -> SeedData:
    """Inputs, orthonormal u1, u2 and label noise of one seed."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(cfg.dim, 2, generator=g))  # (d, 2), orthonormal columns
    n, m = cfg.train_rows, cfg.test_rows
    x = torch.randn(n + m, cfg.dim, generator=g)  # (N + M, d)
    noise = torch.randn(n + m, 2, generator=g) * cfg.noise_std  # (N + M, 2)
    return SeedData(x[:n], x[n:], q.T.contiguous(), noise[:n], noise[n:])


def labels(x: torch.Tensor, noise: torch.Tensor, u: torch.Tensor, p: float, cfg: StudyConfig,
           alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Both tasks' labels, (N, 2), for correlation ``p`` (the paper's generator).

    Example:
        >>> cfg = StudyConfig(dim=4, sines=2)
        >>> u = torch.eye(4)[:2]
        >>> a, b = torch.zeros(2), torch.zeros(2)
        >>> y = labels(torch.eye(4), torch.zeros(4, 2), u, 1.0, cfg, a, b)
        >>> torch.equal(y[:, 0], y[:, 1])  # p = 1: the same task twice (up to noise)
        True
    """
    if not -1.0 <= p <= 1.0:
        raise ValueError(f"correlation p must be in [-1, 1], got {p}")
    w = cfg.scale * torch.stack([u[0], p * u[0] + math.sqrt(1.0 - p * p) * u[1]])  # (2, d)
    z = x @ w.T  # (N, 2)
    waves = torch.sin(alpha * z.unsqueeze(-1) + beta).sum(dim=-1)  # (N, 2, m) -> (N, 2)
    return z + waves + noise


def model_config(kind: str, cfg: StudyConfig) -> ModelConfig:
    """The paper's synthetic-study architecture for ``kind``: no shared bottom under the experts."""
    width = cfg.bottom_units if kind == "shared_bottom" else cfg.expert_units
    return ModelConfig(
        sparse=(),
        dense=tuple(f"x{i}" for i in range(cfg.dim)),
        tasks=tuple(TaskHead(t, "regression", "engagement") for t in TASKS),
        model=kind,  # type: ignore[arg-type]
        bottom_dims=(),
        expert_dims=(width,),
        tower_dims=(cfg.tower_units,),
        num_experts=cfg.num_experts,
    )


def heldout_mse(model: RankingModel, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor | None]:
    """Mean over the two tasks of the test MSE, and the gate weights (B, T, E) if any."""
    model.eval()
    with torch.inference_mode():
        out = model(no_sparse(len(x)), x)
        mse = torch.stack([((out.logits[t] - y[:, i]) ** 2).mean() for i, t in enumerate(TASKS)]).mean()
    model.train()
    return float(mse), out.gates


def train_one(kind: str, x_tr: torch.Tensor, y_tr: torch.Tensor, x_te: torch.Tensor, y_te: torch.Tensor,
              seed: int, cfg: StudyConfig) -> RunResult:
    """Train one model from seed ``seed`` and measure it after every epoch."""
    torch.manual_seed(seed)
    model = dense_model(model_config(kind, cfg))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    order = torch.Generator().manual_seed(seed)
    curve: list[float] = []
    gates = None
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x_tr), generator=order)
        for start in range(0, len(perm), cfg.batch_size):
            rows = perm[start : start + cfg.batch_size]
            x, y = x_tr[rows], y_tr[rows]  # (B, d), (B, 2)
            out = model(no_sparse(len(rows)), x)
            loss = torch.stack([((out.logits[t] - y[:, i]) ** 2).mean() for i, t in enumerate(TASKS)]).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        mse, gates = heldout_mse(model, x_te, y_te)
        curve.append(mse)
    if gates is None:
        return RunResult(curve, None, None)
    stats = GateStats(list(TASKS), gates.shape[-1])
    stats.update(gates)
    health = stats.compute()
    return RunResult(curve, health.max_weight, sum(health.polarized))


def run_study(cfg: StudyConfig) -> tuple[dict[tuple[str, float], list[RunResult]], dict[float, list[float]]]:
    """Every (model, p, seed); returns the runs and, per p, the measured label correlation per seed."""
    alpha, beta = sine_params(cfg)
    runs: dict[tuple[str, float], list[RunResult]] = {}
    label_corr: dict[float, list[float]] = {}
    for seed in range(cfg.seeds):
        data = draw_seed(cfg, seed)
        for p in cfg.correlations:
            y_tr = labels(data.x_train, data.noise_train, data.u, p, cfg, alpha, beta)  # (N, 2)
            y_te = labels(data.x_test, data.noise_test, data.u, p, cfg, alpha, beta)  # (M, 2)
            label_corr.setdefault(p, []).append(float(torch.corrcoef(y_te.T)[0, 1]))
            for kind in cfg.models:
                runs.setdefault((kind, p), []).append(train_one(kind, data.x_train, y_tr, data.x_test, y_te, seed, cfg))
    return runs, label_corr


def spread(values: list[float]) -> str:
    """``mean ± std (min–max)`` of a list, 4 decimals."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f} ({min(values):.4f}–{max(values):.4f})"


def report(cfg: StudyConfig, runs: dict[tuple[str, float], list[RunResult]],
           label_corr: dict[float, list[float]]) -> str:
    """The study as Markdown tables: final loss, degradation vs p = 1, loss curve, gate health."""
    ps, kinds = cfg.correlations, cfg.models
    lines = ["Measured Pearson correlation of the test labels (mean over seeds): "
             + ", ".join(f"p={p:g}: {statistics.mean(label_corr[p]):.3f}" for p in ps), ""]
    lines += [f"Final test MSE (mean of both tasks) after {cfg.epochs} epochs, {cfg.seeds} seeds: "
              "mean ± std (min–max); median", "",
              "| model | " + " | ".join(f"p = {p:g}" for p in ps) + " |",
              "|---|" + "---|" * len(ps)]
    for kind in kinds:
        cells = [f"{spread([r.final for r in runs[kind, p]])}; {statistics.median(r.final for r in runs[kind, p]):.4f}"
                 for p in ps]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    top = max(ps)
    lines += ["", f"Degradation: final MSE at p minus final MSE at p = {top:g}, paired by seed "
              "(same data, same initialisation seed): mean ± std (min–max)", "",
              "| model | " + " | ".join(f"p = {p:g}" for p in ps if p != top) + " |",
              "|---|" + "---|" * (len(ps) - 1)]
    for kind in kinds:
        cells = [spread([a.final - b.final for a, b in zip(runs[kind, p], runs[kind, top], strict=True)])
                 for p in ps if p != top]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    marks = sorted({1, *range(5, cfg.epochs + 1, 5), cfg.epochs})
    lines += ["", "Test MSE curve (mean over seeds) by epoch", "",
              "| model | p | " + " | ".join(f"ep {e}" for e in marks) + " |",
              "|---|---|" + "---|" * len(marks)]
    for kind in kinds:
        for p in ps:
            cells = [f"{statistics.mean(r.curve[e - 1] for r in runs[kind, p]):.4f}" for e in marks]
            lines.append(f"| {kind} | {p:g} | " + " | ".join(cells) + " |")
    gated = [k for k in kinds if runs[k, ps[0]][0].polarized is not None]
    if gated:
        lines += ["", "Gate health on the test set after training (ranking.gate_health: polarized = mean top "
                  "weight > 0.9)", "", "| model | p | mean top gate weight (min–max over seeds × tasks) "
                  "| polarized gates |", "|---|---|---|---|"]
        for kind in gated:
            for p in ps:
                tops = [w for r in runs[kind, p] for w in (r.max_gate_weight or [])]
                pol = sum(r.polarized or 0 for r in runs[kind, p])
                lines.append(f"| {kind} | {p:g} | {statistics.mean(tops):.3f} ({min(tops):.3f}–{max(tops):.3f}) "
                             f"| {pol} of {len(tops)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=StudyConfig.seeds)
    ap.add_argument("--epochs", type=int, default=StudyConfig.epochs)
    ap.add_argument("--scale", type=float, default=StudyConfig.scale, help="c")
    ap.add_argument("--sines", type=int, default=StudyConfig.sines, help="m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="tiny data, 2 seeds, 2 epochs: checks that it runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = StudyConfig(seeds=args.seeds, epochs=args.epochs, scale=args.scale, sines=args.sines)
    if args.smoke:
        cfg = dataclasses.replace(cfg, train_rows=512, test_rows=256, seeds=2, epochs=2)
    start = time.perf_counter()
    runs, label_corr = run_study(cfg)
    print(f"config: {cfg}")
    print(report(cfg, runs, label_corr))
    print(f"\nwall time: {time.perf_counter() - start:.1f} s ({torch.get_num_threads()} thread(s))")


if __name__ == "__main__":
    main()
