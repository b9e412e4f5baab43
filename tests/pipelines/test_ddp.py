"""Distributed training: the per-rank sampler, and the GPU path (bf16-mixed, sharded tables) where CUDA is.

Two processes on CPU (gloo) through the public CLI, with DDP and with sharded tables, run in
``test_multinode.py``: its one-node runs of 1 x 2 devices are the references its two-node runs must equal.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ranking.train.data import EpochBatchSampler

RANKER = str(Path(sys.executable).parent / "ranker")


def test_ranks_see_disjoint_shards_that_cover_the_epoch() -> None:
    shards = [EpochBatchSampler(103, 10, shuffle=True, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    rows = [[i for b in s for i in b] for s in shards]
    assert len(rows[0]) == len(rows[1]) == 52  # padded by wrapping so both ranks take the same steps
    assert set(rows[0]) | set(rows[1]) == set(range(103))
    assert len(shards[0]) == 6
    shards[0].set_epoch(1)
    assert [i for b in shards[0] for i in b] != rows[0]  # a new permutation each epoch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sharded_training_on_gpu_in_bf16(small_features: Path, tmp_path: Path) -> None:
    """The GPU path: accelerator auto, bf16-mixed, TorchRec planner's choice of sharding, fused Adam."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    config = tmp_path / "gpu.yaml"
    config.write_text("strategy: torchrec\nembedding_optimizer: adam\nembedding_lr: 0.002\n")
    devices = str(min(torch.cuda.device_count(), 2))
    r = subprocess.run(
        [RANKER, "train", "--features", str(small_features), "--out", str(tmp_path / "run"), "--config", str(config),
         "--devices", devices, "--epochs", "2", "--batch-size", "256"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bf16" in r.stderr or "bf16" in r.stdout
    assert (tmp_path / "run" / "sharding_plan.txt").read_text().strip()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["final/val/click/auc"] > 0.65, metrics
