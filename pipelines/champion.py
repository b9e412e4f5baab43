"""Challenger against champion: the same holdout rows, each model through its own fitted transform, and the gates.

Each artifact carries the transform fitted on its own training window, so the holdout's raw
rows go through the challenger's transform for the challenger and the champion's for the
champion: exactly what serving would do with either model on those impressions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch

from features.spec import FeatureSpec
from features.validate import REASON, with_reason
from pipelines.config import PromotionGates
from ranking.artifact import load_artifact
from ranking.batch import FeatureTable
from ranking.evaluate import evaluate

PREFIX = "holdout"
Kept = dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class HoldoutScore:
    """One model on the holdout: ``holdout/<task>/<metric>`` metrics and per-task predictions for plots."""

    metrics: dict[str, float]
    predictions: dict[str, tuple[torch.Tensor, torch.Tensor]]  # task -> (p, y) where the label is present
    rows: int
    task_types: dict[str, str]


def score_holdout(artifact: str | Path, rows: pl.LazyFrame, checked_by: FeatureSpec | None = None) -> HoldoutScore:
    """Transform the raw holdout ``rows`` with the artifact's own fitted transform and score every metric.

    Rows the artifact's spec rejects (the quarantine rules) are left out, as training left them out.
    ``rows`` that already passed the rules of ``checked_by`` (the run's validate step) are not checked
    again for an artifact of that same spec; an artifact of another spec (a champion from before
    a spec change) still applies its own rules.
    """
    model, config, fitted, _ = load_artifact(artifact)
    good = rows if fitted.spec == checked_by else with_reason(rows, fitted.spec).filter(
        pl.col(REASON).is_null()).drop(REASON)
    frame = fitted.transform(good).collect()
    if frame.height == 0:
        raise ValueError(f"the holdout has no rows that the {fitted.spec.name!r} spec of {str(artifact)!r} accepts")
    keys = fitted.spec.keys
    extra = {"user": keys.user, "request": keys.request, "true_relevance": "true_relevance"}
    table = FeatureTable(frame, config, {k: v for k, v in extra.items() if v is not None and v in frame.columns})
    kept: Kept = {}
    metrics = evaluate(model, table, config, PREFIX, keep=kept)
    predictions = {}
    for task, parts in kept.items():
        p = torch.cat([x[0] for x in parts])
        y = torch.cat([x[1] for x in parts])
        m = torch.cat([x[2] for x in parts])
        predictions[task] = (p[m], y[m])
    return HoldoutScore(metrics, predictions, frame.height, {t.name: t.type for t in config.tasks})


@dataclass(frozen=True)
class GateCheck:
    """One promotion rule, evaluated: passes when ``margin >= 0``."""

    name: str
    task: str
    metric: str
    challenger: float
    champion: float | None
    threshold: float | None  # the value the challenger had to reach
    margin: float  # challenger - threshold (how far above, or below when negative)
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate_metric(task_type: str, gates: PromotionGates) -> str:
    """The holdout metric the gates compare for a task of ``task_type`` (e.g. ``auc``, ``r2``)."""
    return gates.binary_metric if task_type == "binary" else gates.regression_metric


def key_metrics(task_types: dict[str, str], gates: PromotionGates) -> list[str]:
    """``holdout/<task>/<gate metric>`` for every task, the primary task first: what a run list shows.

    Example:
        >>> key_metrics({"click": "binary", "watch": "regression", "like": "binary"}, PromotionGates(primary="like"))
        ['holdout/like/auc', 'holdout/click/auc', 'holdout/watch/r2']
    """
    order = sorted(task_types, key=lambda t: t != gates.primary)  # stable: the spec's order after the primary
    return [f"{PREFIX}/{t}/{gate_metric(task_types[t], gates)}" for t in order]


def check_gates(
    challenger: dict[str, float], champion: dict[str, float] | None, task_types: dict[str, str], gates: PromotionGates
) -> list[GateCheck]:
    """Evaluate the configured gates; an absent champion passes by definition (first model).

    A NaN metric on either side fails its gate: a model the holdout cannot score is not promoted
    on faith.

    Example:
        >>> g = PromotionGates(primary="click", primary_min_gain=0.0, max_drop=0.01)
        >>> checks = check_gates({"holdout/click/auc": 0.71, "holdout/like/auc": 0.60},
        ...                      {"holdout/click/auc": 0.70, "holdout/like/auc": 0.62},
        ...                      {"click": "binary", "like": "binary"}, g)
        >>> [(c.name, c.task, c.passed, round(c.margin, 3)) for c in checks]
        [('primary', 'click', True, 0.01), ('max_drop', 'click', True, 0.02), ('max_drop', 'like', False, -0.01)]
    """
    if gates.primary not in task_types:
        raise ValueError(f"gates.primary {gates.primary!r} is not a task of the model; tasks: {sorted(task_types)}")
    if champion is None:
        return [GateCheck("no_champion", "*", "-", math.nan, None, None, 0.0, True)]
    checks = []
    metric = gate_metric(task_types[gates.primary], gates)
    key = f"{PREFIX}/{gates.primary}/{metric}"
    ch, cp = challenger.get(key, math.nan), champion.get(key, math.nan)
    need = cp + gates.primary_min_gain
    checks.append(GateCheck("primary", gates.primary, metric, ch, cp, need, ch - need, ch >= need))
    for task, kind in task_types.items():
        metric = gate_metric(kind, gates)
        key = f"{PREFIX}/{task}/{metric}"
        ch, cp = challenger.get(key, math.nan), champion.get(key, math.nan)
        need = cp - gates.max_drop
        checks.append(GateCheck("max_drop", task, metric, ch, cp, need, ch - need, ch >= need))
    return checks
