"""Scoring with an exported artifact: raw request features in, per-objective scores out.

This is what serving wraps; it never touches Lightning.

Objective scores: the probability for binary tasks, the prediction on the task's label scale
(e.g. log1p seconds of watch time) for regression tasks. The combined score is the YouTube form,
a weighted sum ``sum_t w_t * sign_t * score_t`` with ``sign_t = -1`` for tasks where lower is better
(e.g. dismiss).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from ranking.artifact import load_artifact
from ranking.batch import FeatureTable


class InferenceModel:
    """A loaded artifact ready to score candidates.

    Example:
        >>> model = InferenceModel.load("artifact/")  # doctest: +SKIP
        >>> scores = model.score_request(user, context, candidates)  # doctest: +SKIP
        >>> combined = model.combine(scores)  # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.model, self.config, self.fitted, self.metadata = load_artifact(path)
        self.tasks = [t.name for t in self.config.tasks]
        self.default_weights: dict[str, float] = {t.name: t.serving_weight for t in self.config.tasks}
        self._sign = {t.name: (1.0 if t.higher_is_better else -1.0) for t in self.config.tasks}
        self._binary = {t.name for t in self.config.tasks if t.type == "binary"}

    @classmethod
    def load(cls, path: str | Path) -> InferenceModel:
        return cls(path)

    @property
    def spec(self) -> Any:
        return self.fitted.spec

    @torch.inference_mode()
    def score_frame(self, frame: pl.DataFrame) -> dict[str, np.ndarray]:
        """Model-ready rows (from the fitted transform) -> task -> (N,) scores."""
        batch = FeatureTable(frame.drop("position", strict=False), self.config).all()
        out = self.model(batch.sparse, batch.dense, None)
        scores = {}
        for t, logit in out.logits.items():
            x = torch.sigmoid(logit) if t in self._binary else logit
            scores[t] = x.float().numpy()
        return scores

    def score_request(
        self, user: dict[str, Any], context: dict[str, Any], candidates: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        """Raw features of one request (user/context once, candidates column-wise) -> scores."""
        return self.score_frame(self.fitted.transform_request(user, context, candidates))

    def combine(self, scores: dict[str, np.ndarray], weights: dict[str, float] | None = None) -> np.ndarray:
        """Weighted sum of objective scores; ``weights`` override the defaults per task.

        Raises:
            ValueError: unknown objective name or a negative / non-finite weight.
        """
        w = dict(self.default_weights)
        for name, value in (weights or {}).items():
            if name not in w:
                raise ValueError(f"unknown objective {name!r}; known: {self.tasks}")
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"objective weight for {name!r} must be finite and >= 0, got {value}")
            w[name] = float(value)
        n = len(next(iter(scores.values())))
        total = np.zeros(n, dtype=np.float64)
        for t in self.tasks:
            total += w[t] * self._sign[t] * scores[t]
        return total
