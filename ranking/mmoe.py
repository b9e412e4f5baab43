"""Multi-gate Mixture-of-Experts (Ma et al., KDD 2018) as a ranking model.

The other variants (single_task, shared_bottom, omoe, ple) and the shared parts live in
``ranking.models``; ``ModelOutput`` is re-exported here for existing imports.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.nn import functional as F
from torchrec import KeyedJaggedTensor  # noqa: F401  # the docstring's example uses it

from ranking.blocks import Experts
from ranking.config import ModelConfig
from ranking.gating import Gate, mix_experts
from ranking.models import ModelOutput, RankingModel

__all__ = ["MMoE", "ModelOutput"]


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
        self.gates = nn.ModuleDict({t: Gate(self.width, config.num_experts, config.gating) for t in self.task_names})

    def head(self, x: torch.Tensor, position: torch.Tensor | None = None) -> ModelOutput:
        """The front's (B, D) -> predictions."""
        experts = self.experts(x)  # (B, E, De)
        gates = self.dense_gates(x)
        if gates is None:
            gates = torch.stack([g(x) for g in self.gates.values()], dim=1)  # (B, T, E), tasks in config order
            mixed = mix_experts(gates, experts)  # (B, T, De)
        else:
            mixed = mix_per_task(gates, experts)  # (B, T, De)
        return self.predict(mixed, position, gates, routing=[gates])

    def dense_gates(self, x: torch.Tensor) -> torch.Tensor | None:
        """Fast path: all T plain softmax gates as one matmul, (B, T, E) in float32; else None.

        Equal to stacking each ``Gate(x)`` (up to float rounding) when no gate adds noise, keeps a
        top-k or (in training) drops experts; those need ``Gate.forward`` and get None. The
        softmax is written out because ``torch.softmax`` over a short last dim (E = 8) runs a slow
        CPU kernel, about 4x the cost of these three elementwise ops.
        """
        gates = cast("list[Gate]", list(self.gates.values()))  # nn.ModuleDict types its values as Module
        if any(g.noise is not None or g.top_k is not None or (self.training and g.dropout > 0) for g in gates):
            return None
        weight = torch.cat([g.proj.weight for g in gates])  # (T * E, D)
        bias = torch.cat([g.proj.bias for g in gates])  # (T * E,)
        logits = F.linear(x, weight, bias).view(x.shape[0], len(gates), -1).float()  # (B, T, E)
        e = (logits - logits.amax(dim=-1, keepdim=True)).exp()  # (B, T, E), max-shifted: no overflow
        return e / e.sum(dim=-1, keepdim=True)


def mix_per_task(weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """``ranking.gating.mix_experts`` as T broadcast multiply-sums: (B, T, E), (B, E, De) -> (B, T, De).

    Same result (up to float rounding); on CPU the einsum becomes B tiny matmuls, forward and
    backward, which cost about twice these elementwise ops for a few tasks.

    Example:
        >>> w, x = torch.softmax(torch.randn(4, 2, 3), -1), torch.randn(4, 3, 5)
        >>> torch.allclose(mix_per_task(w, x), mix_experts(w, x), atol=1e-6)
        True
    """
    w = weights.to(experts.dtype)
    return torch.stack([(w[:, t].unsqueeze(-1) * experts).sum(dim=1) for t in range(w.shape[1])], dim=1)
