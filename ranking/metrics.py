"""Split-level evaluation metrics for a multi-task ranker: AUC, gAUC, logloss, NE, calibration, RMSE, R², NDCG@k.

Every metric is computed once over a whole split (rows gathered by :class:`SplitMetrics`), never as a
mean of per-batch values: AUC, gAUC and NDCG are not decomposable over batches. Definitions follow the
evaluation protocol of ``prep_kuairand.evaluate`` where they overlap (AUC, gAUC with its coverage,
clipped logloss).

Shape letters: N rows of a split (after masking), U users, G request groups.

Undefined values are ``nan``, never an exception, so one degenerate task does not stop an evaluation:
AUC of a split holding one class, gAUC when no user has both classes, NE when the base rate is 0 or 1,
calibration without positive labels, R² of constant labels, anything over zero rows.

Example:
    >>> import torch
    >>> acc = SplitMetrics([("click", "binary"), ("watch_time", "regression")])
    >>> acc.update(
    ...     preds={"click": torch.tensor([0.9, 0.2, 0.6, 0.4]), "watch_time": torch.tensor([1.0, 2.0, 3.0, 0.0])},
    ...     labels={"click": torch.tensor([1.0, 0.0, 0.0, 1.0]), "watch_time": torch.tensor([1.0, 2.0, 2.0, 0.0])},
    ...     masks={"click": torch.ones(4, dtype=torch.bool), "watch_time": torch.tensor([True, True, True, False])},
    ...     users=torch.tensor([7, 7, 8, 8]),
    ... )
    >>> out = acc.compute()
    >>> out["click/auc"], out["click/gauc"], out["click/gauc_users"], out["watch_time/rmse"]
    (0.75, 0.5, 2.0, 0.5773502691896257)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor
from torchmetrics.functional.regression import mean_squared_error, r2_score

TaskType = Literal["binary", "regression"]
ArrayLike = npt.ArrayLike | Tensor  # 1-D: numpy array, list or tensor (any device)

EPS = 1e-7  # probability clip for logloss / NE, as in the reference protocol


class GroupedMetric(NamedTuple):
    """A metric averaged over groups (users for gAUC, requests for NDCG) and how much of the split it covers."""

    value: float  # nan when no group qualifies
    groups: int  # groups that qualified (both classes for gAUC, a positive gain for NDCG)
    row_share: float  # share of the split's rows lying in those groups, in [0, 1]


# ---------------------------------------------------------------------------------------------------------------
# Input handling


def _to_numpy(x: ArrayLike, name: str, dtype: type[np.generic] = np.float64) -> np.ndarray:
    """Detach a tensor (any device) or take an array, check it is 1-D, cast to ``dtype``."""
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {tuple(arr.shape)}")
    return arr.astype(dtype, copy=False)


def _check_finite(x: np.ndarray, name: str) -> None:
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(x)).sum())} non-finite values (nan/inf)")


def _binary_inputs(y: ArrayLike, p: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(N,) labels in {0, 1} and (N,) finite predictions, both float64."""
    y_np, p_np = _to_numpy(y, "labels"), _to_numpy(p, "preds")
    if y_np.shape != p_np.shape:
        raise ValueError(f"labels and preds must have the same shape, got {y_np.shape} and {p_np.shape}")
    bad = (y_np != 0) & (y_np != 1)
    if bad.any():
        raise ValueError(f"binary labels must be 0 or 1, got {np.unique(y_np[bad])[:5].tolist()}")
    _check_finite(p_np, "preds")
    return y_np, p_np


def _regression_inputs(y: ArrayLike, p: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y_np, p_np = _to_numpy(y, "labels"), _to_numpy(p, "preds")
    if y_np.shape != p_np.shape:
        raise ValueError(f"labels and preds must have the same shape, got {y_np.shape} and {p_np.shape}")
    _check_finite(y_np, "labels")
    _check_finite(p_np, "preds")
    return y_np, p_np


def _segments(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of equal values in a sorted (N,) array -> (N,) run id per row, (R,) first row of each run."""
    new = np.ones(len(sorted_keys), dtype=bool)
    new[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return np.cumsum(new) - 1, np.flatnonzero(new)


def _runs_within(group_start_row: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tie runs of ``values`` inside groups (rows sorted by group, then value).

    Args:
        group_start_row: (N,) index of the first row of each row's group.
        values: (N,) sorted within each group.

    Returns:
        (N,) run id per row, (R,) run start and (R,) run end (exclusive) as row indices.
    """
    n = len(values)
    new = np.ones(n, dtype=bool)
    new[1:] = (values[1:] != values[:-1]) | (group_start_row[1:] != group_start_row[:-1])
    start = np.flatnonzero(new)
    end = np.append(start[1:], n)
    return np.cumsum(new) - 1, start, end


def _auc_per_group(groups: np.ndarray, y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mann-Whitney AUC of each group holding both classes, from mid-ranks (ties count 1/2), in float64.

    Written by hand rather than with torchmetrics' ``binary_auroc``: that one returns float32 (about 1e-7 off
    sklearn) and has no grouped form; the global AUC is the one-group case of the same code.

    Args:
        groups: (N,) int64 group keys; y: (N,) 0/1; p: (N,) finite scores.

    Returns:
        (U',) AUC and (U',) rows of the U' groups with both classes, in ascending key order.
    """
    n = len(y)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    order = np.lexsort((p, groups))  # by group, then score
    g, p, y = groups[order], p[order], y[order]
    group_id, group_start = _segments(g)  # (N,), (U,)
    start_row = group_start[group_id]  # (N,)
    run_id, run_start, run_end = _runs_within(start_row, p)  # tie runs (R,)
    # 1-based mid-rank within the group: mean of positions run_start+1 .. run_end, minus the group's offset
    mid = (run_start + run_end + 1) / 2.0 - start_row[run_start]  # (R,)
    n_g = np.diff(np.append(group_start, n)).astype(np.float64)  # (U,)
    npos = np.bincount(group_id, weights=y, minlength=len(group_start))  # (U,)
    rank_pos = np.bincount(group_id, weights=y * mid[run_id], minlength=len(group_start))  # (U,)
    nneg = n_g - npos
    ok = (npos > 0) & (nneg > 0)
    value = (rank_pos[ok] - npos[ok] * (npos[ok] + 1) / 2.0) / (npos[ok] * nneg[ok])
    return value, n_g[ok]


# ---------------------------------------------------------------------------------------------------------------
# Binary tasks


def auc(labels: ArrayLike, preds: ArrayLike) -> float:
    """ROC AUC of one split, ties counted 1/2 (equals ``sklearn.metrics.roc_auc_score``).

    Args:
        labels: (N,) 0/1.
        preds: (N,) scores; any monotone scale (probabilities or logits) gives the same value.

    Returns:
        The AUC, or ``nan`` when the split holds one class only (no positive-negative pair to rank).

    Example:
        >>> auc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9])
        0.875
        >>> auc([1, 1], [0.2, 0.3])
        nan
    """
    y, p = _binary_inputs(labels, preds)
    value, _ = _auc_per_group(np.zeros(len(y), dtype=np.int64), y, p)
    return float(value[0]) if len(value) else float("nan")


def gauc(users: ArrayLike, labels: ArrayLike, preds: ArrayLike) -> GroupedMetric:
    """Impression-weighted mean of per-user AUC: ``sum_u n_u * AUC_u / sum_u n_u`` over users with both classes.

    ``n_u`` is the user's number of rows; users holding one class only are left out (their AUC is
    undefined) and reported through the coverage. ``AUC_u`` comes from mid-ranks (Mann-Whitney), so
    ties count 1/2, as in ``prep_kuairand.gauc``. Sums run in ascending user order, so the value is
    reproducible bit for bit.

    Args:
        users: (N,) raw integer user keys.
        labels: (N,) 0/1.
        preds: (N,) scores.

    Returns:
        ``GroupedMetric(value, groups=users counted, row_share=their share of the N rows)``; value is
        ``nan`` when no user has both classes.

    Example:
        >>> g = gauc([1, 1, 2, 2, 3], [1, 0, 0, 1, 1], [0.9, 0.1, 0.8, 0.2, 0.5])
        >>> g.value, g.groups, g.row_share
        (0.5, 2, 0.8)
    """
    y, p = _binary_inputs(labels, preds)
    u = _to_numpy(users, "users", np.int64)
    if u.shape != y.shape:
        raise ValueError(f"users must have the labels' shape {y.shape}, got {u.shape}")
    auc_u, n_u = _auc_per_group(u, y, p)
    if len(auc_u) == 0:
        return GroupedMetric(float("nan"), 0, 0.0)
    return GroupedMetric(float((auc_u * n_u).sum() / n_u.sum()), len(auc_u), float(n_u.sum() / len(y)))


def logloss(labels: ArrayLike, preds: ArrayLike) -> float:
    """Mean binary cross-entropy in float64 with probabilities clipped to ``[1e-7, 1 - 1e-7]``; nan for N = 0.

    Example:
        >>> round(logloss([1, 0], [0.5, 0.5]), 6)
        0.693147
    """
    y, p = _binary_inputs(labels, preds)
    if len(y) == 0:
        return float("nan")
    p = np.clip(p, EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def normalized_entropy(labels: ArrayLike, preds: ArrayLike) -> float:
    """Normalized entropy (He et al. 2014): logloss divided by the entropy of the split's base rate.

    1.0 is what always predicting the base rate scores; lower is better. ``nan`` when the base rate
    is 0 or 1 (the denominator vanishes) or N = 0.

    Example:
        >>> normalized_entropy([1, 0, 0, 0], [0.25, 0.25, 0.25, 0.25])
        1.0
    """
    y, p = _binary_inputs(labels, preds)
    rate = y.mean() if len(y) else 0.0
    if rate <= 0.0 or rate >= 1.0:
        return float("nan")
    base = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    return float(logloss(y, p) / base)


def calibration(labels: ArrayLike, preds: ArrayLike) -> float:
    """Sum of predicted probabilities over sum of labels (1.0 is calibrated on average); nan without positives.

    Example:
        >>> calibration([1, 0, 0, 0], [0.5, 0.5, 0.0, 0.0])
        1.0
    """
    y, p = _binary_inputs(labels, preds)
    pos = y.sum()
    return float(p.sum() / pos) if pos > 0 else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Regression tasks


def rmse(labels: ArrayLike, preds: ArrayLike) -> float:
    """Root mean squared error on the labels' scale; nan for N = 0.

    Example:
        >>> rmse([0.0, 2.0], [1.0, 1.0])
        1.0
    """
    y, p = _regression_inputs(labels, preds)
    if len(y) == 0:
        return float("nan")
    return float(mean_squared_error(torch.from_numpy(p), torch.from_numpy(y), squared=False))


def r2(labels: ArrayLike, preds: ArrayLike) -> float:
    """Coefficient of determination ``1 - SSE / SST``; nan for N < 2 or constant labels (SST = 0).

    Example:
        >>> r2([1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
        0.5
    """
    y, p = _regression_inputs(labels, preds)
    if len(y) < 2 or np.all(y == y[0]):
        return float("nan")
    return float(r2_score(torch.from_numpy(p), torch.from_numpy(y)))


# ---------------------------------------------------------------------------------------------------------------
# Ranking


def ndcg_at_k(scores: ArrayLike, gains: ArrayLike, groups: ArrayLike, k: int = 10) -> GroupedMetric:
    """Mean NDCG@k of ``scores`` within each request group, over groups with at least one positive gain.

    Gains are linear (``DCG = sum_i gain_i / log2(i + 2)`` over the top k, as ``sklearn.metrics.ndcg_score``);
    pass ``2**rel - 1`` for the exponential form. Rows with tied scores share the mean of their gains,
    as sklearn's default ``ignore_ties=False``, so the value does not depend on the row order. Written
    with sorts and segment sums because the per-query loop of ``torchmetrics.retrieval`` is too slow for
    a split of ~10^5 requests.

    Args:
        scores: (N,) ranking score (e.g. the combined score).
        gains: (N,) non-negative relevance.
        groups: (N,) integer request id.
        k: cutoff, >= 1.

    Returns:
        ``GroupedMetric(value, groups=requests counted, row_share=their share of rows)``; value is
        ``nan`` when no request has a positive gain.

    Example:
        >>> ndcg_at_k([3.0, 2.0, 1.0, 0.0], [2.0, 1.0, 0.0, 0.0], [5, 5, 5, 5], k=2).value
        1.0
        >>> round(ndcg_at_k([0.0, 1.0, 2.0, 3.0], [2.0, 1.0, 0.0, 0.0], [5, 5, 5, 5], k=4).value, 4)
        0.5174
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    s = _to_numpy(scores, "scores")
    r = _to_numpy(gains, "gains")
    q = _to_numpy(groups, "groups", np.int64)
    if not s.shape == r.shape == q.shape:
        raise ValueError(f"scores, gains and groups must share one shape, got {s.shape}, {r.shape}, {q.shape}")
    _check_finite(s, "scores")
    _check_finite(r, "gains")
    if (r < 0).any():
        raise ValueError(f"gains must be >= 0, got min {r.min()}")
    n = len(s)
    if n == 0:
        return GroupedMetric(float("nan"), 0, 0.0)
    discount = 1.0 / np.log2(np.arange(k) + 2.0)  # (k,)
    cum_discount = np.concatenate(([0.0], np.cumsum(discount)))  # (k+1,) discount summed over positions < i

    order = np.lexsort((-s, q))  # by request, best score first
    s_sorted, r_sorted, q_sorted = s[order], r[order], q[order]
    group_id, group_start = _segments(q_sorted)  # (N,), (G,)
    start_row = group_start[group_id]  # (N,)
    _, run_start, run_end = _runs_within(start_row, s_sorted)  # tie runs (R,)
    run_gain = np.add.reduceat(r_sorted, run_start) / (run_end - run_start)  # (R,) mean gain of the tie run
    lo = np.minimum(run_start - start_row[run_start], k)  # positions within the request, cut at k
    hi = np.minimum(run_end - start_row[run_start], k)
    dcg = np.bincount(group_id[run_start], weights=run_gain * (cum_discount[hi] - cum_discount[lo]),
                      minlength=len(group_start))  # (G,)

    # ideal order: same request blocks (requests sort first), gains descending inside each
    ideal = r[np.lexsort((-r, q))]
    pos = np.arange(n) - start_row  # (N,) position within the request
    weight = np.where(pos < k, discount[np.minimum(pos, k - 1)], 0.0)
    idcg = np.bincount(group_id, weights=ideal * weight, minlength=len(group_start))  # (G,)

    ok = idcg > 0
    if not ok.any():
        return GroupedMetric(float("nan"), 0, 0.0)
    sizes = np.diff(np.append(group_start, n))
    return GroupedMetric(float(np.mean(dcg[ok] / idcg[ok])), int(ok.sum()), float(sizes[ok].sum() / n))


# ---------------------------------------------------------------------------------------------------------------
# Accumulator


RANKING_KEY = "combined"  # ranking.evaluate's prefix of the ranking metrics: no task may be called so


class SplitMetrics:
    """Gathers a split's predictions batch by batch (on CPU) and computes every task's metrics over all of it.

    Args:
        tasks: ``(name, type)`` pairs, type ``"binary"`` (preds are probabilities) or ``"regression"``;
            e.g. ``[(t.name, t.type) for t in config.tasks]``.

    ``compute()`` returns ``<task>/<metric>`` keys (callers prefix the split, ``val/click/auc``):

    * binary: ``auc``, ``logloss``, ``ne``, ``calibration``, ``rows``, and with users given
      ``gauc``, ``gauc_users`` (users counted), ``gauc_coverage`` (their share of the task's rows);
    * regression: ``rmse``, ``r2``, ``rows``.

    Ranking metrics of whole requests (NDCG) are :func:`ndcg_at_k`'s (``ranking.evaluate`` calls it).

    ``rows`` counts unmasked rows. Undefined values are ``nan`` (see the module docstring).

    Example:
        >>> import torch
        >>> acc = SplitMetrics([("click", "binary")])
        >>> y = torch.tensor([1.0, 0.0, 0.0, 1.0])
        >>> acc.update({"click": torch.tensor([0.8, 0.3, 0.6, 0.1])}, {"click": y},
        ...            {"click": torch.tensor([True, True, True, False])})
        >>> out = acc.compute()
        >>> out["click/auc"], out["click/rows"]
        (1.0, 3.0)
    """

    def __init__(self, tasks: Sequence[tuple[str, TaskType]]) -> None:
        names = [name for name, _ in tasks]
        if not names:
            raise ValueError("SplitMetrics needs at least one task")
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        if RANKING_KEY in names:
            raise ValueError(f"task name {RANKING_KEY!r} is reserved for the ranking metrics")
        for name, kind in tasks:
            if kind not in ("binary", "regression"):
                raise ValueError(f"task {name!r}: type must be 'binary' or 'regression', got {kind!r}")
        self.tasks: dict[str, TaskType] = dict(tasks)
        self.reset()

    def reset(self) -> None:
        """Forget every gathered row."""
        self._preds: dict[str, list[Tensor]] = {t: [] for t in self.tasks}
        self._labels: dict[str, list[Tensor]] = {t: [] for t in self.tasks}
        self._users: dict[str, list[Tensor]] = {t: [] for t in self.tasks}
        self._with_users: bool | None = None

    def update(
        self,
        preds: dict[str, Tensor],
        labels: dict[str, Tensor],
        masks: dict[str, Tensor],
        users: Tensor | None = None,
    ) -> None:
        """Add one batch; rows whose task mask is False are left out of that task.

        Args:
            preds, labels, masks: task -> (B,) tensors (probabilities for binary tasks), one per task.
            users: (B,) int64 raw user keys, for gAUC; give it on every batch or on none.
        """
        # validate the whole batch before gathering any of it, so a rejected batch leaves no trace
        if self._with_users is not None and self._with_users != (users is not None):
            raise ValueError("users must be given on every update or on none (gAUC needs every row's user)")
        for name in self.tasks:
            for what, d in (("preds", preds), ("labels", labels), ("masks", masks)):
                if name not in d:
                    raise ValueError(f"{what} lacks task {name!r}; got {sorted(d)}")
            shapes = [tuple(d[name].shape) for d in (preds, labels, masks)]
            if len(shapes[0]) != 1 or len(set(shapes)) != 1:
                raise ValueError(f"task {name!r}: preds, labels, masks must be (B,) of one shape, got {shapes}")
            if users is not None and tuple(users.shape) != shapes[0]:
                raise ValueError(f"users must be (B,) = {shapes[0]}, got {tuple(users.shape)}")

        self._with_users = users is not None
        for name in self.tasks:
            m = masks[name].detach().bool()
            self._preds[name].append(preds[name].detach()[m].double().cpu())
            self._labels[name].append(labels[name].detach()[m].double().cpu())
            if users is not None:
                self._users[name].append(users.detach()[m].long().cpu())

    def compute(self) -> dict[str, float]:
        """Every metric over all rows gathered since the last ``reset``; see the class docstring for keys."""
        out: dict[str, float] = {}
        for name, kind in self.tasks.items():
            p = torch.cat(self._preds[name]).numpy() if self._preds[name] else np.zeros(0)
            y = torch.cat(self._labels[name]).numpy() if self._labels[name] else np.zeros(0)
            out[f"{name}/rows"] = float(len(y))
            if kind == "regression":
                out[f"{name}/rmse"] = rmse(y, p)
                out[f"{name}/r2"] = r2(y, p)
                continue
            out[f"{name}/auc"] = auc(y, p)
            out[f"{name}/logloss"] = logloss(y, p)
            out[f"{name}/ne"] = normalized_entropy(y, p)
            out[f"{name}/calibration"] = calibration(y, p)
            if self._with_users:
                g = gauc(torch.cat(self._users[name]).numpy(), y, p)
                out[f"{name}/gauc"] = g.value
                out[f"{name}/gauc_users"] = float(g.groups)
                out[f"{name}/gauc_coverage"] = g.row_share
        return out
