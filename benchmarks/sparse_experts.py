"""Sparse expert compute against the dense mixture: µs per candidate, in process, inference mode.

Each expert pool runs on (B, 256) inputs with (B, T=4, E) gate weights that have exactly k
non-zeros per row (the same k experts for every task of a row, each task's weights a softmax over
them), so a share k / E of the (row, expert) pairs is active. Two layouts of each side:

- **stacked**: the serving network's layout (``ranking.fused``), weights laid out once: dense is
  one matmul for every expert's first layer, one ``baddbmm`` per later layer and one ``bmm`` for
  the tasks' mixtures (``MMoEHead``); sparse is :func:`ranking.blocks.sparse_mixture` on the same
  (E, Din, Dout) stacks.
- **Experts**: the training module, :class:`ranking.blocks.Experts` in eval mode: dense is
  ``Experts(x)`` (``run_stacked``, which restacks the parameters every call) then ``mix_experts``;
  sparse is ``Experts.mix(x, w, sparse=True)``; the last column is what ``Experts.mix`` chooses by
  itself (``prefer_sparse``).

With ``--aoti`` the two stacked sides are also exported with a dynamic batch and compiled by
AOTInductor (as ``FusedScorer.compile`` does the serving network): there the sparse side runs
every expert on ``nonzero``'s rows (no per-expert branch can be compiled), with far less fixed
cost per operator than eager.

Pools: 16 experts of [512, 256] (a large-expert model where sparse routing should pay) and the
project default, 4 experts of [128, 64]. Each figure is the fastest of ``--repeats`` timed runs of
enough calls to fill ``--min-ms``, divided by B; every case first checks sparse equals dense.

    .venv/bin/python benchmarks/sparse_experts.py                       # about 30 s on 2 idle cores
    .venv/bin/python benchmarks/sparse_experts.py --aoti --out benchmarks/results/sparse_experts.md
    .venv/bin/python benchmarks/sparse_experts.py --smoke               # seconds
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import cast

import torch
from torch import nn

from ranking.blocks import Experts, prefer_sparse, sparse_mixture
from ranking.gating import mix_experts

D, T = 256, 4


@dataclass(frozen=True)
class Pool:
    """One expert pool of the study."""

    num_experts: int
    dims: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.num_experts} x {list(self.dims)}"


@dataclass(frozen=True)
class Row:
    """One (pool, batch, threads, k) case; times in µs per candidate."""

    pool: str
    batch: int
    threads: int
    k: int
    share: float
    stacked_dense: float
    stacked_sparse: float
    module_dense: float
    module_sparse: float
    picks: str  # what Experts.mix chooses: "sparse" or "dense"
    aoti_dense: float | None = None  # --aoti: the stacked sides compiled ahead of time
    aoti_sparse: float | None = None


class StackedDense:
    """The serving network's dense experts and mixture on weights laid out once (as ``MMoEHead``)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        w0, b0 = layers[0]  # (E, D, D1), (E, 1, D1)
        self.e = w0.shape[0]
        self.first_w = w0.transpose(0, 1).reshape(w0.shape[1], -1).contiguous()  # (D, E * D1)
        self.first_b = b0.reshape(-1).contiguous()  # (E * D1,)
        self.rest = layers[1:]

    def __call__(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = torch.relu(torch.addmm(self.first_b, x, self.first_w)).view(b, self.e, -1).transpose(0, 1)  # (E, B, D1)
        for w, bias in self.rest:
            h = torch.relu(torch.baddbmm(bias, h, w))  # (E, B, Dout)
        return torch.bmm(weights, h.transpose(0, 1))  # (B, T, E) @ (B, E, De) -> (B, T, De)


def experts_dense(experts: Experts, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The training module's dense side: every expert on every row, then the tasks' einsum."""
    return mix_experts(weights, experts(x))


def stack(experts: Experts) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (E, Din, Dout) weights and (E, 1, Dout) biases (``ranking.fused._stack_layers``' layout)."""
    linears = [[m for m in cast(nn.Sequential, e) if isinstance(m, nn.Linear)] for e in experts.children()]
    return [(torch.stack([ls[i].weight.detach().t() for ls in linears]).contiguous(),
             torch.stack([ls[i].bias.detach() for ls in linears]).unsqueeze(1).contiguous())
            for i in range(len(linears[0]))]


def exact_k(b: int, e: int, k: int, g: torch.Generator) -> torch.Tensor:
    """(B, T, E) weights, exactly k non-zeros per row: k random experts, every task softmaxed over them."""
    pick = torch.rand(b, e, generator=g).argsort(dim=1)[:, :k]  # (B, k)
    mask = torch.zeros(b, e, dtype=torch.bool).scatter_(1, pick, True)  # (B, E)
    logits = torch.randn(b, T, e, generator=g).masked_fill(~mask.unsqueeze(1), float("-inf"))
    return torch.softmax(logits, dim=-1)


def best_us(fn: Callable[[], object], repeats: int, min_ms: float) -> float:
    """Fastest of ``repeats`` timed runs (each of enough calls for ``min_ms``), µs per call."""
    fn()
    start = time.perf_counter()
    fn()
    calls = max(1, int(min_ms / 1e3 / max(time.perf_counter() - start, 1e-9)))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


class _Call(nn.Module):
    """A function of (x, weights) as a module's forward, for ``torch.export``."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.fn(x, weights)


def aoti(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], num_experts: int,
         folder: Path) -> Callable[..., torch.Tensor]:
    """``fn`` exported with a dynamic batch and compiled by AOTInductor (as ``FusedScorer.compile``)."""
    from torch._inductor import aoti_compile_and_package, aoti_load_package  # Inductor loads slowly: on use

    g = torch.Generator().manual_seed(0)
    example = (torch.randn(64, D, generator=g), exact_k(64, num_experts, 1, g))
    batch = torch.export.Dim("batch")
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch's own pytree deprecation (2.13)
        program = torch.export.export(_Call(fn), example, dynamic_shapes=({0: batch}, {0: batch}))
        package = aoti_compile_and_package(program, package_path=str(folder / f"{len(list(folder.iterdir()))}.pt2"))
    compiled: Callable[..., torch.Tensor] = aoti_load_package(package)
    return compiled


def measure(pools: list[Pool], batches: list[int], threads: list[int], ks: list[int], repeats: int,
            min_ms: float, compiled: Path | None = None) -> list[Row]:
    rows = []
    for pool in pools:
        torch.manual_seed(0)
        experts = Experts(D, pool.dims, pool.num_experts).eval()
        layers = stack(experts)
        dense = StackedDense(layers)
        packages = None
        if compiled is not None:
            packages = (aoti(dense, pool.num_experts, compiled),
                        aoti(partial(sparse_mixture, layers), pool.num_experts, compiled))
        for b in batches:
            g = torch.Generator().manual_seed(b)
            x = torch.randn(b, D, generator=g)
            for n_threads in threads:
                torch.set_num_threads(n_threads)
                for k in (k for k in ks if k <= pool.num_experts):
                    w = exact_k(b, pool.num_experts, k, g)
                    with torch.inference_mode():
                        torch.testing.assert_close(sparse_mixture(layers, x, w), dense(x, w), atol=1e-4, rtol=1e-4)
                        sides: list[Callable[[], object]] = [
                            partial(dense, x, w),
                            partial(sparse_mixture, layers, x, w),
                            partial(experts_dense, experts, x, w),
                            partial(experts.mix, x, w, sparse=True),
                        ]
                        picks = "sparse" if prefer_sparse(w, experts.row_macs) else "dense"
                        if packages is not None:
                            torch.testing.assert_close(packages[1](x, w), dense(x, w), atol=1e-4, rtol=1e-4)
                            sides += [partial(f, x, w) for f in packages]
                        times = [best_us(f, repeats, min_ms) / b for f in sides]
                    rows.append(Row(pool.name, b, n_threads, k, k / pool.num_experts, times[0], times[1], times[2],
                                    times[3], picks, *times[4:]))
                    print(f"{pool.name} B={b} threads={n_threads} k={k}: "
                          + " ".join(f"{t:.2f}" for t in times) + f" -> {picks}", file=sys.stderr, flush=True)
    return rows


def table(rows: list[Row]) -> str:
    compiled = rows and rows[0].aoti_dense is not None
    head = ("| experts | B | threads | k | active share | stacked dense µs/cand | stacked sparse µs/cand "
            "| dense / sparse | Experts dense µs/cand | Experts sparse µs/cand | dense / sparse | Experts.mix picks |"
            + (" AOTI dense µs/cand | AOTI sparse µs/cand | dense / sparse |" if compiled else "") + "\n"
            + "|---" * (15 if compiled else 12) + "|\n")
    lines = []
    for r in rows:
        line = (f"| {r.pool} | {r.batch} | {r.threads} | {r.k} | {r.share:.2f} | {r.stacked_dense:.2f} "
                f"| {r.stacked_sparse:.2f} | **{r.stacked_dense / r.stacked_sparse:.2f}x** | {r.module_dense:.2f} "
                f"| {r.module_sparse:.2f} | {r.module_dense / r.module_sparse:.2f}x | {r.picks} |")
        if r.aoti_dense is not None and r.aoti_sparse is not None:
            line += f" {r.aoti_dense:.2f} | {r.aoti_sparse:.2f} | **{r.aoti_dense / r.aoti_sparse:.2f}x** |"
        lines.append(line)
    return head + "\n".join(lines)


def machine() -> str:
    """``lscpu`` model name and cores, torch and Python versions."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    field = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lscpu)}
    return (f"{platform.machine()} {field.get('Model name', '?')}, {field.get('CPU(s)', '?')} logical CPUs "
            f"({field.get('Core(s) per socket', '?')} cores per socket, {field.get('Thread(s) per core', '?')} "
            f"thread per core); torch {torch.__version__}, Python {platform.python_version()}")


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the markdown report here")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-ms", type=float, default=20.0, help="each timed run lasts at least this long")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    ap.add_argument("--aoti", action="store_true",
                    help="also the stacked sides exported and compiled by AOTInductor (needs a C++ compiler)")
    ap.add_argument("--smoke", action="store_true", help="small pools and batches, one repeat: seconds")
    args = ap.parse_args()
    pools = [Pool(16, (512, 256)), Pool(4, (128, 64))]
    batches, threads, ks = [100, 1000], args.threads, [1, 2, 4, 8, 16]
    if args.smoke:
        pools, batches, threads, args.repeats, args.min_ms = [Pool(4, (32, 16))], [10], [1], 1, 1.0
    started, load_start = dt.datetime.now(dt.UTC), load()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(pools, batches, threads, ks, args.repeats, args.min_ms, Path(tmp) if args.aoti else None)
    seconds = (dt.datetime.now(dt.UTC) - started).total_seconds()
    command = " ".join([".venv/bin/python benchmarks/sparse_experts.py", *sys.argv[1:]])
    report = "\n".join([
        "# Sparse expert compute vs the dense mixture",
        "",
        f"- command: `{command}` (run under `nice -n -15` beside other jobs; see the load average)",
        f"- date: {started:%Y-%m-%d %H:%M} UTC, {seconds:.0f} s",
        f"- machine: {machine()}",
        f"- load average (1/5/15 min) at start: {load_start}, at end: {load()}",
        f"- inputs: (B, {D}) rows, {T} tasks, inference mode; weights with exactly k non-zeros per row "
        "(the same k experts for every task); each figure the fastest of "
        f"{args.repeats} runs of ≥ {args.min_ms:.0f} ms, µs per candidate (lower is better)",
        "",
        table(rows),
        "",
    ])
    print(report)
    if args.out is not None:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
