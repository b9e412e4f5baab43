"""The multi-task training loss: per-task losses with label masks, their weighting and the extra terms.

``MultiTaskLoss`` is a plain ``nn.Module`` (testable without Lightning): it takes a model's
:class:`~ranking.models.ModelOutput` and a :class:`~ranking.batch.Batch` and returns
:class:`LossParts`, the total to back-propagate and each term on its own for logging.

    total = sum_t w_t * L_t                 (fixed: w_t = the spec's loss weight)
          | sum_t exp(-s_t) * L_t + s_t     (uncertainty: one learned log-variance s_t per task)
          + load_balance_weight * aux["load_balance"]   (when the model returns it)
          + gate.z_loss_weight * aux["router_z"]        (MMoE's router z-loss, when the model returns it)
          + embedding_l2 * touched_rows_l2(tables, batch ids)   (training only, when > 0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor

from ranking.batch import Batch
from ranking.config import ModelConfig, TaskHead
from ranking.models import ModelOutput
from ranking.train.config import LossConfig


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


def touched_rows_l2(model: nn.Module, sparse: KeyedJaggedTensor) -> torch.Tensor:
    """Sum of squared embedding rows looked up in this batch, each distinct row counted once.

    The sparse counterpart of L2 weight decay: only rows a batch touches are penalised, when they
    are touched, so rows never seen (the OOV row 0) keep their initial value and the rule ports to
    TorchRec's fused row-wise optimisers. Since every distinct row pays the same price however
    often it occurs, while its data gradient grows with its frequency, rare ids (most users and
    videos) are pulled to zero hardest: the ones that overfit first.

    Args:
        model: any module holding ``EmbeddingBagCollection``s (every one is searched).
        sparse: the batch's ids; keys are feature names of those collections.

    Returns:
        A scalar: ``sum_tables sum_{r in unique ids} ||W[r]||^2``.

    Example:
        >>> from torchrec import EmbeddingBagConfig
        >>> ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=2,
        ...     num_embeddings=4, feature_names=["f"])], device=torch.device("cpu"))
        >>> with torch.no_grad():
        ...     _ = ebc.embedding_bags["t"].weight.copy_(torch.arange(8.0).view(4, 2))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor([1, 1, 3]), torch.tensor([1, 1, 1]))
        >>> float(touched_rows_l2(ebc, kjt).detach())  # rows 1 and 3: (4 + 9) + (36 + 49)
        98.0
    """
    total = torch.zeros(())
    present = set(sparse.keys())
    for ebc in (m for m in model.modules() if isinstance(m, EmbeddingBagCollection)):
        for table in ebc.embedding_bag_configs():
            weight = ebc.embedding_bags[table.name].weight  # (rows, D)
            for feature in table.feature_names:
                if feature in present:
                    rows = torch.unique(sparse[feature].values())  # (R,) distinct ids of this batch
                    total = total.to(weight.device) + weight[rows].pow(2).sum()
    return total


@dataclass(frozen=True)
class LossParts:
    """One batch's loss: the total and each term (unweighted), for logging.

    Attributes:
        total: scalar to back-propagate.
        tasks: task name -> its masked mean loss.
        load_balance: the model's load-balance loss, when it returned one and its weight is > 0.
        embedding_l2: the touched-rows penalty, when it was computed (training, weight > 0).
        router_z: the router z-loss, when the model returned one and its weight is > 0.
    """

    total: torch.Tensor
    tasks: dict[str, torch.Tensor]
    load_balance: torch.Tensor | None = None
    embedding_l2: torch.Tensor | None = None
    router_z: torch.Tensor | None = None


class MultiTaskLoss(nn.Module):
    """The weighted sum of the per-task losses plus the load-balance and embedding-L2 terms.

    Args:
        tasks: the model's objectives (name, type, loss weight), in output order.
        load_balance_weight: weight of the model's ``aux["load_balance"]``; 0 = not added.
        z_loss_weight: weight of the model's ``aux["router_z"]``; 0 = not added.
        config: weighting and embedding L2 (:class:`LossConfig`).

    With ``weighting="uncertainty"`` the module holds a parameter ``log_vars`` (T,), trained with
    the model.

    Example:
        >>> tasks = [TaskHead("click", "binary", "engagement"), TaskHead("watch", "regression", "engagement", 0.5)]
        >>> loss = MultiTaskLoss(tasks)
        >>> out = ModelOutput(logits={"click": torch.zeros(2), "watch": torch.tensor([1.0, 3.0])})
        >>> parts = loss(out, {"click": torch.tensor([1.0, 0.0]), "watch": torch.tensor([1.0, 1.0])},
        ...              {"click": torch.tensor([True, True]), "watch": torch.tensor([True, False])})
        >>> round(float(parts.total), 4)  # BCE at logit 0 = ln 2; MSE of the one labelled row = 0
        0.6931
    """

    def __init__(self, tasks: Sequence[TaskHead], load_balance_weight: float = 0.0,
                 config: LossConfig | None = None, z_loss_weight: float = 0.0) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.load_balance_weight = float(load_balance_weight)
        self.z_loss_weight = float(z_loss_weight)
        self.config = config or LossConfig()
        self.log_vars = (nn.Parameter(torch.zeros(len(self.tasks))) if self.config.weighting == "uncertainty"
                         else None)

    @classmethod
    def for_model(cls, config: ModelConfig, loss: LossConfig | None = None) -> MultiTaskLoss:
        """The loss of a model built from ``config`` (its tasks, load-balance and z-loss weights)."""
        return cls(config.tasks, config.load_balance_weight, loss, config.gate.z_loss_weight)

    def forward(self, out: ModelOutput, labels: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                tables: nn.Module | None = None, sparse: KeyedJaggedTensor | None = None) -> LossParts:
        """The loss of one batch.

        Args:
            out: the model's output for the batch.
            labels, masks: task name -> (B,) labels and (B,) bool "label present".
            tables, sparse: the module holding the embedding tables and the batch's ids; give both
                to add the embedding L2 term (training), neither to leave it out (evaluation).
        """
        total = torch.zeros((), device=next(iter(out.logits.values())).device)
        per_task: dict[str, torch.Tensor] = {}
        for i, t in enumerate(self.tasks):
            loss = task_loss(t, out.logits[t.name], labels[t.name], masks[t.name])
            if self.log_vars is not None:
                total = total + torch.exp(-self.log_vars[i]) * loss + self.log_vars[i]
            else:
                total = total + t.loss_weight * loss
            per_task[t.name] = loss
        balance = out.aux.get("load_balance") if self.load_balance_weight > 0 else None
        if balance is not None:
            total = total + self.load_balance_weight * balance
        router_z = out.aux.get("router_z") if self.z_loss_weight > 0 else None
        if router_z is not None:
            total = total + self.z_loss_weight * router_z
        penalty = None
        if tables is not None and sparse is not None and self.config.embedding_l2 > 0:
            penalty = touched_rows_l2(tables, sparse)
            total = total + self.config.embedding_l2 * penalty
        return LossParts(total, per_task, balance, penalty, router_z)

    def of_batch(self, out: ModelOutput, batch: Batch, tables: nn.Module | None = None) -> LossParts:
        """:meth:`forward` with the labels, masks and (with ``tables``) the ids of ``batch``."""
        parts: LossParts = self(out, batch.labels, batch.masks, tables, batch.sparse if tables is not None else None)
        return parts
