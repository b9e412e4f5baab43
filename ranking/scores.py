"""The served score, defined once: per-task scores from logits, and the combined score that ranks.

    score_t  = sigmoid(logit_t)            for a binary task (a probability)
             = logit_t                     for a regression task (a prediction on the label's scale)
    combined = sum_t w_t * sign_t * score_t,   sign_t = +1 if higher is better else -1

``w_t`` is the task's ``serving_weight`` unless a request overrides it (finite, >= 0). Serving
(``ranking.inference``, ``ranking.fused``), the offline evaluation (NDCG of the serving score in
``ranking.evaluate``) and the training metrics (``ranking.train.module``) all take their scores from
here, so a ranking measured offline is the ranking served.

Example:
    >>> import torch
    >>> tasks = [TaskHead("click", "binary", "engagement", serving_weight=2.0),
    ...          TaskHead("dismiss", "binary", "satisfaction", higher_is_better=False)]
    >>> s = task_scores({"click": torch.tensor([0.0]), "dismiss": torch.tensor([0.0])}, tasks)
    >>> float(s["click"][0]), float(combined_score(s, tasks)[0])  # 2 * 0.5 - 1 * 0.5
    (0.5, 0.5)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypeVar

import numpy as np
import torch

from ranking.config import TaskHead

Scores = TypeVar("Scores", np.ndarray, torch.Tensor)


def task_score(task: TaskHead, logit: torch.Tensor) -> torch.Tensor:
    """One task's score from its logits (B,): the probability for a binary task, else the prediction."""
    return torch.sigmoid(logit) if task.type == "binary" else logit


def task_scores(logits: Mapping[str, torch.Tensor], tasks: Sequence[TaskHead]) -> dict[str, torch.Tensor]:
    """:func:`task_score` of every task: task name -> (B,) scores."""
    return {t.name: task_score(t, logits[t.name]) for t in tasks}


def binary_mask(tasks: Sequence[TaskHead]) -> torch.Tensor:
    """(T, 1) bool: which rows of a (T, N) logit matrix :func:`task_score` passes through a sigmoid."""
    return torch.tensor([[t.type == "binary"] for t in tasks])


def serving_weights(tasks: Sequence[TaskHead], overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """Each task's weight in the combined score: its ``serving_weight``, or the override given for it.

    Raises:
        ValueError: an override names no task, or is negative or not finite.
    """
    weights = {t.name: float(t.serving_weight) for t in tasks}
    for name, value in (overrides or {}).items():
        if name not in weights:
            raise ValueError(f"unknown objective {name!r}; known: {list(weights)}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"objective weight for {name!r} must be finite and >= 0, got {value}")
        weights[name] = float(value)
    return weights


def combined_score(scores: Mapping[str, Scores], tasks: Sequence[TaskHead],
                   weights: Mapping[str, float] | None = None) -> Scores:
    """``sum_t w_t * sign_t * score_t`` in float64 (a float32 score times a weight of 1e39 would overflow).

    Args:
        scores: task name -> (N,) scores (:func:`task_scores`), numpy arrays or torch tensors.
        tasks: the model's tasks (their serving weights and directions).
        weights: per-task overrides of the serving weights (:func:`serving_weights`).

    Returns:
        (N,) float64, of the type of ``scores``' values.
    """
    w = serving_weights(tasks, weights)
    total: Scores | None = None
    for t in tasks:
        s = scores[t.name]
        term = w[t.name] * (1.0 if t.higher_is_better else -1.0) * (
            s.double() if isinstance(s, torch.Tensor) else s.astype(np.float64))
        total = term if total is None else total + term
    if total is None:
        raise ValueError("a combined score needs at least one task")
    return total
