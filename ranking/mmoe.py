"""Multi-gate Mixture-of-Experts (Ma et al., KDD 2018) as a ranking model.

The other variants (single_task, shared_bottom, omoe, ple) and the shared parts (the front, the
towers, ``ModelOutput``) live in ``ranking.models``; the experts in ``ranking.blocks``, the task gates
in ``ranking.gating``.
"""

from __future__ import annotations

import torch
from torchrec import KeyedJaggedTensor  # noqa: F401  # the docstring's example uses it

from ranking.blocks import Experts
from ranking.config import ModelConfig
from ranking.gating import TaskGates
from ranking.models import ModelOutput, RankingModel

__all__ = ["MMoE"]


class MMoE(RankingModel):
    """TorchRec embeddings -> shared bottom -> E experts, one gate per task -> one tower per task.

    The YouTube layout (Zhao et al., RecSys 2019): the mixture sits on a shared bottom; gates may
    be dense softmax or noisy top-k, with optional gate dropout (see ``ranking.gating``).

    Args:
        config: the model config (tables, dense inputs, tasks, widths, gating).

    Returns (from ``forward``): :class:`ModelOutput` with logits per task, each (B,), gate
    weights (B, T, E) and, when ``config.load_balance_weight > 0``, ``aux["load_balance"]``.

    Example:
        >>> from ranking.config import SparseSlot, TaskHead
        >>> cfg = ModelConfig(sparse=(SparseSlot("user", 10, 4),), dense=("x",),
        ...                   tasks=(TaskHead("click", "binary", "engagement"),), bottom_dims=(8,),
        ...                   expert_dims=(8,), tower_dims=(4,), num_experts=2)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user"], torch.tensor([1, 2]), torch.tensor([1, 1]))
        >>> MMoE(cfg)(kjt, torch.zeros(2, 1)).logits["click"].shape
        torch.Size([2])
    """

    def build_mixing(self, config: ModelConfig) -> None:
        self.experts = Experts(self.width, config.expert_dims, config.num_experts, config.dropout)
        self.gates = TaskGates(self.task_names, self.width, config.num_experts, config.gate)

    def head(self, x: torch.Tensor, position: torch.Tensor | None = None) -> ModelOutput:
        """The front's (B, D) -> experts -> gates -> each task's mixture -> towers."""
        experts: torch.Tensor = self.experts(x)  # (B, E, De)
        gates: torch.Tensor = self.gates(x)  # (B, T, E), tasks in config order
        mixed = self.gates.mix(gates, experts)  # (B, T, De)
        return self.predict(mixed, position, gates, routing=[gates])
