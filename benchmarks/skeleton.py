"""Throughput of the walking skeleton's stages on the default synthetic data, in one run.

Measures: synthetic generation rows/s, feature build (fit + transform + write) rows/s, the batch
loader's samples/s alone, and the training step's samples/s (forward + backward + Adam), so the
loader/step ratio shows whether training waits on data.

    .venv/bin/python benchmarks/skeleton.py [--requests-per-day 3000]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from features.build import build
from features.spec import load_spec
from features.synthetic import config_with, write_log
from ranking.artifact import build_model
from ranking.batch import Batch
from ranking.config import ModelConfig
from ranking.train import MultiTaskLoss, RankingDataModule, load_features


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests-per-day", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = config_with(requests_per_day=args.requests_per_day)
        rows = cfg.days * cfg.requests_per_day * cfg.slate_size
        t = time.perf_counter()
        write_log(cfg, work / "log")
        synth_s = time.perf_counter() - t
        t = time.perf_counter()
        build(work / "log", load_spec("synthetic"), work / "features")
        build_s = time.perf_counter() - t

        fitted = load_features(work / "features")
        mconf = ModelConfig.from_fitted(fitted)
        dm = RankingDataModule(work / "features", mconf, args.batch_size)
        dm.setup()
        loader = dm.train_dataloader()
        batches = []
        t = time.perf_counter()
        for i, b in enumerate(loader):
            batches.append(b)
            if i + 1 == args.steps:
                break
        load_s = time.perf_counter() - t

        model = build_model(mconf).train()
        loss_fn = MultiTaskLoss.for_model(mconf)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)

        def step(b: Batch) -> None:
            opt.zero_grad()
            loss_fn.of_batch(model(b.sparse, b.dense, b.position), b).total.backward()
            opt.step()

        for b in batches[:10]:  # warm-up
            step(b)
        t = time.perf_counter()
        for b in batches:
            step(b)
        step_s = time.perf_counter() - t

    n = args.steps * args.batch_size
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"synthetic generation : {rows / synth_s:12,.0f} rows/s   ({rows:,} rows in {synth_s:.2f}s)")
    print(f"features build       : {rows / build_s:12,.0f} rows/s   ({build_s:.2f}s, fit+transform+write)")
    print(f"batch loader         : {n / load_s:12,.0f} samples/s")
    print(f"training step        : {n / step_s:12,.0f} samples/s   (batch {args.batch_size}, MMoE defaults)")
    print(f"loader / step ratio  : {step_s / load_s:12.1f}x")


if __name__ == "__main__":
    main()
