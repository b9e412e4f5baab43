"""Multi-gate Mixture-of-Experts (Ma et al., KDD 2018) as a ranking model.

The other variants (single_task, shared_bottom, omoe, ple) and the shared parts (the front, the
towers, ``ModelOutput``) live in ``ranking.models``; the experts in ``ranking.blocks``, the task gates
in ``ranking.gating``.
"""

from __future__ import annotations

import torch
from torchrec import KeyedJaggedTensor

from ranking.blocks import Experts
from ranking.config import ModelConfig
from ranking.gating import TaskGates
from ranking.models import ModelOutput, RankingModel

__all__ = ["MMoE"]


class MMoE(RankingModel):
    """TorchRec embeddings -> shared bottom -> E experts, one gate per task -> one tower per task.

    The YouTube layout (Zhao et al., RecSys 2019): the mixture sits on a shared bottom; the task
    gates route by ``config.gate.kind`` (dense softmax, noisy top-k, top-p, hash, expert choice or
    a task-shared top-k; see ``ranking.gating``).

    Args:
        config: the model config (tables, dense inputs, tasks, widths, gating).

    Returns (from ``forward``): :class:`ModelOutput` with logits per task, each (B,), gate
    weights (B, T, E), when ``config.load_balance_weight > 0`` ``aux["load_balance"]`` and, when
    ``config.gate.z_loss_weight > 0``, ``aux["router_z"]``.

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
        self.experts = Experts(self.width, config.expert_dims, config.total_experts, config.dropout,
                               config.expert_activation, config.expert_norm)
        self.gates = TaskGates(self.task_names, self.width, config.num_experts, config.gate)
        self.hash_feature = config.hash_slot() if config.gate.kind == "hash" else None

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor, position: torch.Tensor | None = None,
                groups: torch.Tensor | None = None) -> ModelOutput:
        """embed -> head; ``groups`` (B,) are expert choice's groups (None: the batch is one group)."""
        ids = sparse[self.hash_feature].values() if self.hash_feature is not None else None  # (B,) one id each
        return self.head(self.embed(sparse, dense), position, ids=ids, groups=groups)

    def head(self, x: torch.Tensor, position: torch.Tensor | None = None, *, ids: torch.Tensor | None = None,
             groups: torch.Tensor | None = None) -> ModelOutput:
        """The front's (B, D) -> gates -> experts (each on the rows routed to it) -> each task's mixture -> towers."""
        gates, z_loss = self.gates.route(x, ids, groups)  # (B, T, E), tasks in config order
        # Dense softmax: every expert on every row and the fast elementwise mixture; routed: each
        # expert only on its rows where that is cheaper (Experts.mix decides). (B, T, De) either way.
        mixed = self.gates.mix(gates, self.experts(x)) if self.gates.plain else self.experts.mix(x, gates)
        out = self.predict(mixed, position, gates, routing=[gates])
        if z_loss is not None:
            out.aux["router_z"] = z_loss
        return out

    def set_top_k(self, k: int) -> None:
        """Fewer experts per row from now on (see :meth:`TaskGates.set_top_k`); not written to the config."""
        self.gates.set_top_k(k)
