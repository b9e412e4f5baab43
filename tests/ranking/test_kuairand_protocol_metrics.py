"""Our AUC / gAUC / log-loss equal the KuaiRand protocol's own metric code on the same predictions.

The reference is ``prep_kuairand.evaluate`` from ``../shared/peers`` (the peers' metric code, run
as is); the test skips where that folder is absent. The split is made here: raw user ids with gaps
and OOV-like repeats, rare positives (as for ``is_like``) and rounded scores that force ties.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from ranking.metrics import SplitMetrics, auc, gauc, logloss

PEERS = Path(__file__).resolve().parents[2].parent / "shared" / "peers" / "prep_kuairand.py"
LABELS = ["is_click", "long_view", "is_like"]


@pytest.fixture(scope="module")
def protocol() -> ModuleType:
    if not PEERS.is_file():
        pytest.skip(f"protocol code not found at {PEERS}")
    spec = importlib.util.spec_from_file_location("prep_kuairand", PEERS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N,) raw user ids, (N, 3) labels at the three tasks' rates, (N, 3) scores with ties."""
    rng = np.random.default_rng(seed)
    uid = rng.choice(np.arange(0, 27_000, 3), size=900, replace=False)[rng.zipf(1.6, n) % 900]
    y = (rng.random((n, 3)) < np.array([0.44, 0.31, 0.03])).astype(np.float32)
    p = np.clip(0.4 + 0.15 * (y - 0.3) + rng.normal(0, 0.2, (n, 3)), 0.0, 1.0).round(2).astype(np.float32)
    return uid, y, p


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_match_the_protocol(protocol: ModuleType, seed: int) -> None:
    uid, y, p = _split(20_000, seed)
    ref = protocol.evaluate(y, p.astype(np.float64), uid, LABELS)
    for i, task in enumerate(LABELS):
        g = gauc(uid, y[:, i], p[:, i])
        assert auc(y[:, i], p[:, i]) == pytest.approx(ref[task]["auc"], abs=1e-12)
        assert g.value == pytest.approx(ref[task]["gauc"], abs=1e-12)
        assert g.groups == ref[task]["gauc_users"]
        assert g.row_share == pytest.approx(ref[task]["gauc_row_share"], abs=1e-12)
        assert logloss(y[:, i], p[:, i]) == pytest.approx(ref[task]["logloss"], abs=1e-12)


def test_split_metrics_with_dense_user_ranks_match_the_protocol(protocol: ModuleType) -> None:
    """Evaluation groups by dense ranks of the raw user column (``FeatureTable`` extra): same gAUC."""
    uid, y, p = _split(12_000, 2)
    ranks = torch.from_numpy(np.unique(uid.astype(str), return_inverse=True)[1].astype(np.int64))
    acc = SplitMetrics([(t, "binary") for t in LABELS])
    for start in range(0, len(uid), 4096):  # batched, as in ranking.evaluate
        sl = slice(start, start + 4096)
        acc.update(
            preds={t: torch.from_numpy(p[sl, i]) for i, t in enumerate(LABELS)},
            labels={t: torch.from_numpy(y[sl, i]) for i, t in enumerate(LABELS)},
            masks={t: torch.ones(len(y[sl]), dtype=torch.bool) for t in LABELS},
            users=ranks[sl],
        )
    ours = acc.compute()
    ref = protocol.evaluate(y, p.astype(np.float64), uid, LABELS)
    for t in LABELS:
        assert ours[f"{t}/auc"] == pytest.approx(ref[t]["auc"], abs=1e-12)
        assert ours[f"{t}/gauc"] == pytest.approx(ref[t]["gauc"], abs=1e-12)
        assert ours[f"{t}/gauc_users"] == ref[t]["gauc_users"]
