"""Split metrics against independent references: sklearn, and per-user / per-request loops written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, mean_squared_error, ndcg_score, r2_score, roc_auc_score

from ranking.metrics import (
    SplitMetrics,
    auc,
    calibration,
    gauc,
    logloss,
    ndcg_at_k,
    normalized_entropy,
    r2,
    rmse,
)


def _binary_split(n: int, users: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N,) user keys (sparse, negative ones too), (N,) 0/1 labels, (N,) scores rounded to force ties."""
    rng = np.random.default_rng(seed)
    keys = rng.choice(np.arange(-10**9, 10**9, 7919), size=users, replace=False)
    u = keys[rng.integers(0, users, n)]
    y = (rng.random(n) < 0.3).astype(np.float64)
    p = np.round(np.clip(0.3 + 0.2 * (y - 0.3) + rng.normal(0, 0.2, n), 0, 1), 1)  # 11 levels -> many ties
    return u, y, p


def _gauc_loop(u: np.ndarray, y: np.ndarray, p: np.ndarray) -> tuple[float, int, float]:
    """The definition, one user at a time with sklearn's AUC."""
    num = den = 0.0
    count = 0
    for key in np.unique(u):
        sel = u == key
        if 0 < y[sel].sum() < sel.sum():
            num += sel.sum() * roc_auc_score(y[sel], p[sel])
            den += sel.sum()
            count += 1
    return num / den, count, den / len(y)


# ---------------------------------------------------------------------------------------------------------------
# Binary


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_with_ties(seed: int) -> None:
    _, y, p = _binary_split(5000, 50, seed)
    assert len(np.unique(p)) < 20
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert auc(torch.from_numpy(y).float(), torch.from_numpy(p).float()) == pytest.approx(
        roc_auc_score(y, p.astype(np.float32)), abs=1e-6
    )


def test_auc_all_tied_is_half_and_one_class_is_nan() -> None:
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))  # no negative to rank a positive against
    assert math.isnan(auc([0, 0], [0.1, 0.2]))
    assert math.isnan(auc(np.zeros(0), np.zeros(0)))


@pytest.mark.parametrize("seed", [0, 1])
def test_gauc_matches_per_user_loop(seed: int) -> None:
    u, y, p = _binary_split(4000, 120, seed)
    g = gauc(torch.from_numpy(u), y, p)
    value, count, share = _gauc_loop(u, y, p)
    assert g.value == pytest.approx(value, abs=1e-12)
    assert g.groups == count
    assert g.row_share == pytest.approx(share, abs=1e-12)
    assert g.groups < 120 or g.row_share == 1.0  # the fixture leaves some one-class users behind


def test_gauc_leaves_out_one_class_users() -> None:
    u = np.array([1, 1, 1, 2, 2, 3])
    y = np.array([1, 0, 0, 1, 1, 0])
    p = np.array([0.2, 0.9, 0.2, 0.5, 0.6, 0.7])
    g = gauc(u, y, p)
    assert g.value == pytest.approx(roc_auc_score(y[:3], p[:3]))  # only user 1 has both classes
    assert (g.groups, g.row_share) == (1, 0.5)


def test_gauc_without_mixed_users_is_nan() -> None:
    g = gauc([1, 1, 2], [1, 1, 0], [0.1, 0.2, 0.3])
    assert math.isnan(g.value) and g.groups == 0 and g.row_share == 0.0
    assert math.isnan(gauc([], [], []).value)


def test_gauc_does_not_depend_on_row_order() -> None:
    u, y, p = _binary_split(3000, 40, 3)
    perm = np.random.default_rng(0).permutation(len(y))
    assert gauc(u, y, p).value == gauc(u[perm], y[perm], p[perm]).value


def test_logloss_matches_sklearn_and_clips() -> None:
    _, y, p = _binary_split(2000, 10, 4)
    q = np.clip(p, 0.01, 0.99)
    assert logloss(y, q) == pytest.approx(log_loss(y, q), rel=1e-12)
    clipped = logloss([1.0, 0.0], [0.0, 1.0])  # certain and wrong: finite thanks to the clip
    assert clipped == pytest.approx(-math.log(1e-7), rel=1e-9)


def test_base_rate_prediction_has_ne_one_and_calibration_one() -> None:
    y = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0], dtype=np.float64)
    p = np.full_like(y, y.mean())
    assert normalized_entropy(y, p) == pytest.approx(1.0, abs=1e-12)
    assert calibration(y, p) == pytest.approx(1.0, abs=1e-12)
    assert calibration(y, 2 * p) == pytest.approx(2.0)
    assert normalized_entropy(y, np.where(y == 1, 0.9, 0.1)) < 1.0


def test_ne_and_calibration_undefined_cases() -> None:
    assert math.isnan(normalized_entropy([0, 0], [0.1, 0.1]))  # base rate 0: entropy 0
    assert math.isnan(normalized_entropy([1, 1], [0.9, 0.9]))
    assert math.isnan(calibration([0, 0], [0.1, 0.1]))  # no positives


def test_binary_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="0 or 1"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="non-finite"):
        gauc([1, 1], [0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="1-D"):
        logloss(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="same shape"):
        calibration([0, 1], [0.5])


# ---------------------------------------------------------------------------------------------------------------
# Regression


def test_rmse_and_r2_match_sklearn() -> None:
    rng = np.random.default_rng(5)
    y = rng.normal(2.0, 1.0, 1000)
    p = y + rng.normal(0, 0.5, 1000)
    assert rmse(y, p) == pytest.approx(math.sqrt(mean_squared_error(y, p)), rel=1e-12)
    assert r2(torch.from_numpy(y), torch.from_numpy(p)) == pytest.approx(r2_score(y, p), rel=1e-12)


def test_regression_undefined_cases() -> None:
    assert math.isnan(rmse([], []))
    assert math.isnan(r2([1.0], [1.0]))
    assert math.isnan(r2([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]))  # constant labels: SST = 0


# ---------------------------------------------------------------------------------------------------------------
# Ranking


def _ndcg_loop(s: np.ndarray, r: np.ndarray, q: np.ndarray, k: int) -> tuple[float, int]:
    """sklearn's ndcg_score one request at a time, over requests with a positive gain."""
    values = [
        ndcg_score(r[q == g][None], s[q == g][None], k=k)
        for g in np.unique(q)
        if r[q == g].max() > 0 and (q == g).sum() > 1  # sklearn refuses one-document queries
    ]
    return float(np.mean(values)), len(values)


@pytest.mark.parametrize(("k", "seed"), [(1, 0), (3, 1), (10, 2), (50, 3)])
def test_ndcg_matches_sklearn_per_request(k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 3000
    q = rng.integers(0, 200, n) * 13 - 500
    r = rng.integers(0, 4, n).astype(np.float64) * (rng.random(n) < 0.5)  # many all-zero requests
    s = np.round(r + rng.normal(0, 1.5, n), 0)  # integer scores: many ties inside a request
    value, count = _ndcg_loop(s, r, q, k)
    got = ndcg_at_k(torch.from_numpy(s), r, q, k=k)
    assert got.value == pytest.approx(value, abs=1e-12)
    assert got.groups == count
    perm = rng.permutation(n)
    assert ndcg_at_k(s[perm], r[perm], q[perm], k=k).value == pytest.approx(got.value, abs=1e-12)


def test_ndcg_perfect_is_one_and_reversed_is_less() -> None:
    rng = np.random.default_rng(6)
    q = np.repeat(np.arange(50), 8)
    r = rng.random(400) * (rng.random(400) < 0.4)
    assert ndcg_at_k(r, r, q, k=5).value == pytest.approx(1.0, abs=1e-12)
    reversed_ = ndcg_at_k(-r, r, q, k=5)
    assert reversed_.value < 1.0
    assert reversed_.value == pytest.approx(_ndcg_loop(-r, r, q, 5)[0], abs=1e-12)


def test_ndcg_counts_only_requests_with_a_positive_gain() -> None:
    got = ndcg_at_k([1.0, 2.0, 1.0, 2.0], [0.0, 0.0, 1.0, 0.0], [1, 1, 2, 2], k=10)
    assert got.groups == 1 and got.row_share == 0.5
    assert got.value == pytest.approx(1 / math.log2(3))
    assert math.isnan(ndcg_at_k([1.0], [0.0], [1]).value)


def test_ndcg_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at_k([1.0], [1.0], [1], k=0)
    with pytest.raises(ValueError, match=">= 0"):
        ndcg_at_k([1.0], [-1.0], [1])


# ---------------------------------------------------------------------------------------------------------------
# Accumulator


TASKS: list[tuple[str, str]] = [("click", "binary"), ("like", "binary"), ("watch_time", "regression")]


def test_split_metrics_over_batches_equal_the_whole_split() -> None:
    rng = np.random.default_rng(7)
    n = 3000
    u, y_click, p_click = _binary_split(n, 80, 8)
    y_like = (rng.random(n) < 0.1).astype(np.float64)
    p_like = np.clip(0.1 + 0.3 * y_like + rng.normal(0, 0.1, n), 0.01, 0.99)  # inside both logloss clips
    y_wt = rng.normal(size=n)
    p_wt = y_wt + rng.normal(0, 0.3, n)
    m_like = rng.random(n) < 0.7
    m_wt = rng.random(n) < 0.5
    q = np.arange(n) // 10

    acc = SplitMetrics(TASKS)  # type: ignore[arg-type]
    for lo in range(0, n, 256):  # the last batch is short
        sl = slice(lo, lo + 256)

        def t(a: np.ndarray, sl: slice = sl) -> torch.Tensor:
            return torch.from_numpy(a[sl])

        acc.update(
            preds={"click": t(p_click).float(), "like": t(p_like).float(), "watch_time": t(p_wt).float()},
            labels={"click": t(y_click).float(), "like": t(y_like).float(), "watch_time": t(y_wt).float()},
            masks={"click": torch.ones(len(t(q)), dtype=torch.bool), "like": t(m_like), "watch_time": t(m_wt)},
            users=t(u),
        )
    out = acc.compute()

    f32 = lambda a: a.astype(np.float32).astype(np.float64)  # noqa: E731 - the accumulator saw float32 tensors
    assert out["click/auc"] == pytest.approx(roc_auc_score(y_click, f32(p_click)), abs=1e-12)
    assert out["like/auc"] == pytest.approx(roc_auc_score(y_like[m_like], f32(p_like)[m_like]), abs=1e-12)
    assert out["like/logloss"] == pytest.approx(log_loss(y_like[m_like], f32(p_like)[m_like]), rel=1e-9)
    assert out["like/rows"] == m_like.sum()
    value, users, share = _gauc_loop(u[m_like], y_like[m_like], f32(p_like)[m_like])
    assert (out["like/gauc"], out["like/gauc_users"], out["like/gauc_coverage"]) == pytest.approx(
        (value, users, share), abs=1e-12
    )
    assert out["watch_time/rmse"] == pytest.approx(
        math.sqrt(mean_squared_error(f32(y_wt)[m_wt], f32(p_wt)[m_wt])), rel=1e-9
    )
    assert out["watch_time/r2"] == pytest.approx(r2_score(f32(y_wt)[m_wt], f32(p_wt)[m_wt]), rel=1e-9)
    assert set(out) == {
        *(f"{t}/{m}" for t in ("click", "like")
          for m in ("auc", "logloss", "ne", "calibration", "rows", "gauc", "gauc_users", "gauc_coverage")),
        "watch_time/rmse", "watch_time/r2", "watch_time/rows",
    }


def test_split_metrics_empty_mask_and_no_users() -> None:
    acc = SplitMetrics([("click", "binary"), ("watch_time", "regression")])
    acc.update(
        preds={"click": torch.tensor([0.2, 0.7]), "watch_time": torch.tensor([1.0, 2.0])},
        labels={"click": torch.tensor([0.0, 1.0]), "watch_time": torch.tensor([1.0, 2.0])},
        masks={"click": torch.tensor([True, True]), "watch_time": torch.tensor([False, False])},
    )
    out = acc.compute()
    assert out["click/auc"] == 1.0 and "click/gauc" not in out
    assert out["watch_time/rows"] == 0.0
    assert math.isnan(out["watch_time/rmse"]) and math.isnan(out["watch_time/r2"])
    acc.reset()
    out = acc.compute()  # nothing gathered: every value undefined, nothing raised
    assert out["click/rows"] == 0.0 and math.isnan(out["click/auc"]) and math.isnan(out["click/logloss"])


def test_split_metrics_rejects_bad_use() -> None:
    with pytest.raises(ValueError, match="type must be"):
        SplitMetrics([("click", "ranking")])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="reserved"):
        SplitMetrics([("combined", "binary")])
    acc = SplitMetrics([("click", "binary")])
    one = {"click": torch.tensor([1.0])}
    mask = {"click": torch.tensor([True])}
    with pytest.raises(ValueError, match="lacks task 'click'"):
        acc.update(one, {}, mask)
    acc.update(one, one, mask, users=torch.tensor([3]))
    with pytest.raises(ValueError, match="every update"):
        acc.update(one, one, mask)
    with pytest.raises(TypeError, match="requests"):  # NDCG is ndcg_at_k's, not the accumulator's
        acc.update(one, one, mask, users=torch.tensor([3]), requests=torch.tensor([1]))  # type: ignore[call-arg]
