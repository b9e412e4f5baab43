"""Per-task losses with label masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ranking.config import TaskHead


def task_loss(task: TaskHead, logit: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean loss over rows whose label is present; 0 when none is (B,) inputs -> scalar.

    Binary tasks use BCE with logits; regression tasks MSE on the spec's label scale.
    """
    logit = logit.float()
    if task.type == "binary":
        per_row = F.binary_cross_entropy_with_logits(logit, label, reduction="none")
    else:
        per_row = (logit - label) ** 2
    m = mask.to(per_row.dtype)
    return (per_row * m).sum() / m.sum().clamp(min=1.0)
