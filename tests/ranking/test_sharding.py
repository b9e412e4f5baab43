"""TorchRec sharding of the embedding tables (``ranking.train.sharding``), on CPU with two gloo processes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ranking.train.sharding import TorchRecStrategy

WORKER = Path(__file__).with_name("dmp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sharded_model_matches_the_unsharded_one(tmp_path: Path) -> None:
    """Table-wise: the sharding type fbgemm's CPU kernels support (row-wise needs CUDA)."""
    r = subprocess.run([sys.executable, str(WORKER), str(_free_port()), "table_wise", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(x["rank"] for x in ranks) == [0, 1]
    for x in ranks:
        assert x["same_forward"], x  # the seeded weights were copied into the shards
        assert x["gathered_equal"] and x["tables_moved"], x
        assert x["sharded"] == [f"embeddings.embedding_bags.t_{n}.weight" for n in ("item", "tags", "user")]
    # each of the three tables lives on exactly one of the two ranks
    assert sorted(x["local_shards"] for x in ranks) == [1, 2]


def test_strategy_rejects_unknown_options() -> None:
    with pytest.raises(ValueError, match="sharding_type must be one of"):
        TorchRecStrategy(sharding_type="diagonal")
    with pytest.raises(ValueError, match="embedding_optimizer must be one of"):
        TorchRecStrategy(embedding_optimizer="lion")
    with pytest.raises(ValueError, match="embedding_lr must be > 0"):
        TorchRecStrategy(embedding_lr=0.0)
