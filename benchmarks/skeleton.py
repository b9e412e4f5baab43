"""Throughput of the walking skeleton's stages on the default synthetic data, in one run.

Measures: synthetic generation rows/s, feature build (fit + transform + write) rows/s, the batch
loader's samples/s alone, the training step's samples/s (``RankingModule``'s own step and optimiser:
forward + loss + backward + Adam), so the loader/step ratio shows whether training waits on data, and
one epoch through ``ranking.train.fit`` (Lightning's loop around the same step, no validation).

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
from ranking.train import FitConfig, RankingDataModule, RankingModule, fit, load_features


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

        training = FitConfig(batch_size=args.batch_size, epochs=1, validate=False, final_eval=False,
                             accelerator="cpu", limit_train_batches=args.steps)
        module = RankingModule(build_model(mconf), mconf, training).train()
        opt = module.optimizer()

        def step(i: int, b: Batch) -> None:
            opt.zero_grad()
            module.training_step(b, i).backward()
            opt.step()

        for i, b in enumerate(batches[:10]):  # warm-up
            step(i, b)
        t = time.perf_counter()
        for i, b in enumerate(batches):
            step(i, b)
        step_s = time.perf_counter() - t

        t = time.perf_counter()
        fit(work / "features", mconf, training)  # the same steps in Lightning's loop (its start-up included)
        fit_s = time.perf_counter() - t

    n = args.steps * args.batch_size
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"synthetic generation : {rows / synth_s:12,.0f} rows/s   ({rows:,} rows in {synth_s:.2f}s)")
    print(f"features build       : {rows / build_s:12,.0f} rows/s   ({build_s:.2f}s, fit+transform+write)")
    print(f"batch loader         : {n / load_s:12,.0f} samples/s")
    print(f"training step        : {n / step_s:12,.0f} samples/s   (batch {args.batch_size}, MMoE defaults)")
    print(f"loader / step ratio  : {step_s / load_s:12.1f}x")
    print(f"fit, one epoch       : {n / fit_s:12,.0f} samples/s   ({args.steps} steps through ranking.train.fit, "
          f"{fit_s:.2f}s with the Trainer's start-up)")


if __name__ == "__main__":
    main()
