"""Gates of a mixture of experts: dense softmax, noisy top-k, gate dropout, load-balancing loss.

A gate maps its input (B, D) to weights (B, E) that sum to 1 along E:

- dense softmax (Ma et al., KDD 2018): ``softmax(x W)``;
- noisy top-k (Shazeer et al., ICLR 2017): in training, add Gaussian noise whose per-expert std
  ``softplus(x W_noise)`` is learned; keep the k largest logits, softmax over them, zeros elsewhere.
  ``k`` can be lowered after training (``Gate.set_top_k``) to make inference cheaper;
- gate dropout (Zhao et al., RecSys 2019): in training, zero each expert's weight with probability
  p and renormalise, so no task leans on one expert (gate polarization).

Softmaxes run in float32 even under mixed precision. The model returns the weights; the
load-balancing loss below turns them into a scalar the trainer weighs and adds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from ranking.config import GateConfig

_EPS = 1e-10


class Gate(nn.Module):
    """Weights over E experts for each row, computed in float32.

    Args:
        in_dim: input width D.
        num_experts: E, the experts this gate mixes.
        config: top-k, noise and dropout settings; the default is a dense softmax gate.

    Returns (from ``forward``): weights (B, E), float32, summing to 1 along E; with top-k, exactly
    ``top_k`` non-zero weights per row (fewer only in training when gate dropout removed some).

    Example:
        >>> w = Gate(8, 3)(torch.randn(2, 8))
        >>> w.shape, w.dtype, torch.allclose(w.sum(-1), torch.ones(2))
        (torch.Size([2, 3]), torch.float32, True)
        >>> gate = Gate(8, 4, GateConfig("noisy_topk", top_k=2)).eval()
        >>> (gate(torch.randn(5, 8)) > 0).sum(-1).tolist()
        [2, 2, 2, 2, 2]
        >>> gate.set_top_k(1)
        >>> (gate(torch.randn(5, 8)) > 0).sum(-1).tolist()
        [1, 1, 1, 1, 1]
    """

    def __init__(self, in_dim: int, num_experts: int, config: GateConfig | None = None) -> None:
        super().__init__()
        config = config or GateConfig()
        self.num_experts = num_experts
        self.top_k: int | None = None
        if config.sparse:
            self.set_top_k(config.top_k)
        self.noise_scale = config.noise if config.sparse else 0.0
        self.dropout = config.dropout
        self.proj = nn.Linear(in_dim, num_experts)
        self.noise: nn.Linear | None = None
        if self.noise_scale > 0:
            # Zero init: every expert starts with the same noise std softplus(0) ~ 0.69 (as Shazeer et al.).
            self.noise = nn.Linear(in_dim, num_experts)
            nn.init.zeros_(self.noise.weight)
            nn.init.zeros_(self.noise.bias)

    def set_top_k(self, k: int) -> None:
        """Keep only the ``k`` largest logits per row from now on (no retraining needed).

        Raises:
            ValueError: ``k`` is not an integer in [1, E].
        """
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_experts:
            raise ValueError(f"top_k must be an integer in [1, {self.num_experts}], got {k!r}")
        self.top_k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.proj(x).float()  # (B, E); float32 even under mixed precision
        if self.training and self.noise is not None:
            std = F.softplus(self.noise(x).float()) * self.noise_scale  # (B, E)
            logits = logits + torch.randn_like(logits) * std
        if self.top_k is not None and self.top_k < self.num_experts:
            top = logits.topk(self.top_k, dim=-1)  # values, indices: (B, k)
            # -inf outside the top k: softmax gives exact zeros there and no gradient.
            logits = torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)  # (B, E)
        weights = torch.softmax(logits, dim=-1)  # (B, E)
        if self.training and self.dropout > 0:
            weights = drop_experts(weights, self.dropout)
        return weights


def drop_experts(weights: torch.Tensor, p: float) -> torch.Tensor:
    """Gate dropout: zero each weight with probability ``p``, then renormalise each row to sum 1.

    A row whose every non-zero weight would be dropped keeps its weights unchanged, so no row is
    ever routed to nothing.

    Args:
        weights: (B, E) gate weights summing to 1 along E.
        p: drop probability in [0, 1).

    Returns:
        (B, E) weights summing to 1 along E.

    Example:
        >>> w = drop_experts(torch.full((4, 3), 1 / 3), 0.5)
        >>> torch.allclose(w.sum(-1), torch.ones(4))
        True
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"gate dropout p must be in [0, 1), got {p}")
    keep = torch.rand_like(weights) >= p  # (B, E)
    dropped = weights * keep  # (B, E)
    total = dropped.sum(dim=-1, keepdim=True)  # (B, 1)
    alive = total > 0
    renormed = dropped / torch.where(alive, total, torch.ones_like(total))  # no 0/0 even in the unused branch
    return torch.where(alive, renormed, weights)


def mix_experts(weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Each task's weighted sum of expert outputs.

    Args:
        weights: (B, T, E) gate weights (float32).
        experts: (B, E, D) expert outputs (any float dtype; the result keeps it).

    Returns:
        (B, T, D).

    Example:
        >>> mix_experts(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])).tolist()
        [[[1.0, 2.0]]]
    """
    return torch.einsum("bte,bed->btd", weights.to(experts.dtype), experts)


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation along the last dim: var / mean², 0 when all equal.

    Example:
        >>> cv_squared(torch.tensor([1.0, 1.0])).item(), cv_squared(torch.tensor([2.0, 0.0])).item()
        (0.0, 1.0)
    """
    x = x.float()
    return x.var(dim=-1, correction=0) / (x.mean(dim=-1) ** 2 + _EPS)


def load_balance_loss(weights: torch.Tensor) -> torch.Tensor:
    """Shazeer et al.'s balancing term for gate weights: CV²(importance) + CV²(load).

    Importance of an expert is the sum of its weights over the batch; load is the number of rows
    that give it a non-zero weight (for a dense gate every expert is loaded by every row, so only
    importance counts). Load is a count and carries no gradient; importance does. Each router
    (every position along the middle dims, e.g. each task's gate) is scored on its own and the
    scores are averaged. Unweighted: the trainer multiplies by ``load_balance_weight``.

    Args:
        weights: (B, E) or (B, T, E) gate weights.

    Returns:
        A float32 scalar, 0 for perfectly balanced gates.

    Example:
        >>> load_balance_loss(torch.full((4, 2, 3), 1 / 3)).item()
        0.0
        >>> round(load_balance_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]])).item(), 3)
        2.0
    """
    w = weights.float()
    importance = w.sum(dim=0)  # (..., E)
    load = (w > 0).float().sum(dim=0)  # (..., E)
    return (cv_squared(importance) + cv_squared(load)).mean()


def mix_per_task(weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """:func:`mix_experts` as T broadcast multiply-sums: (B, T, E), (B, E, De) -> (B, T, De).

    Same result (up to float rounding); on CPU the einsum becomes B tiny matmuls, forward and
    backward, which cost about twice these elementwise ops for a few tasks.

    Example:
        >>> w, x = torch.softmax(torch.randn(4, 2, 3), -1), torch.randn(4, 3, 5)
        >>> torch.allclose(mix_per_task(w, x), mix_experts(w, x), atol=1e-6)
        True
    """
    w = weights.to(experts.dtype)
    return torch.stack([(w[:, t].unsqueeze(-1) * experts).sum(dim=1) for t in range(w.shape[1])], dim=1)


class TaskGates(nn.ModuleDict):
    """One :class:`Gate` per task over the same E experts: (B, D) -> (B, T, E), and the tasks' mixtures.

    Its state_dict keys are the gates' (``<task>.proj.weight`` ...), tasks in the order given. While
    every gate is a plain softmax (no noise, no top-k, no gate dropout in training) the T gates run
    as one matmul with the softmax written out (``torch.softmax`` over a short last dim, E = 8,
    runs a slow CPU kernel, about 4x these three elementwise ops), and :meth:`mix` as T broadcast
    multiply-sums; otherwise each gate runs its own ``forward`` and the mixture is one einsum. Both
    ways give the same values up to float rounding (tests/ranking/test_fast_paths.py).

    Args:
        tasks: task names, in output order.
        in_dim: input width D.
        num_experts: E.
        config: every gate's settings (:class:`~ranking.config.GateConfig`).

    Example:
        >>> gates = TaskGates(["click", "like"], in_dim=8, num_experts=3)
        >>> x, experts = torch.randn(5, 8), torch.randn(5, 3, 4)
        >>> w = gates(x)
        >>> w.shape, gates.mix(w, experts).shape
        (torch.Size([5, 2, 3]), torch.Size([5, 2, 4]))
    """

    def __init__(self, tasks: Sequence[str], in_dim: int, num_experts: int, config: GateConfig | None = None) -> None:
        super().__init__({t: Gate(in_dim, num_experts, config) for t in tasks})

    @property
    def gates(self) -> list[Gate]:
        """The gates, in task order."""
        return cast("list[Gate]", list(self.values()))  # nn.ModuleDict types its values as Module

    @property
    def plain(self) -> bool:
        """Every gate is a dense softmax right now (the fast paths apply)."""
        return not any(g.noise is not None or g.top_k is not None or (self.training and g.dropout > 0)
                       for g in self.gates)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """All T plain softmax gates as one matmul: (B, D) -> (B, T, E), float32 (only while :attr:`plain`)."""
        gates = self.gates
        weight = torch.cat([g.proj.weight for g in gates])  # (T * E, D)
        bias = torch.cat([g.proj.bias for g in gates])  # (T * E,)
        logits = F.linear(x, weight, bias).view(x.shape[0], len(gates), -1).float()  # (B, T, E)
        e = (logits - logits.amax(dim=-1, keepdim=True)).exp()  # (B, T, E), max-shifted: no overflow
        return e / e.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, T, E) weights, float32, each row summing to 1 along E."""
        if self.plain:
            return self.dense(x)
        return torch.stack([g(x) for g in self.gates], dim=1)  # (B, T, E), tasks in order

    def mix(self, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Each task's weighted sum of the experts' outputs: (B, T, E), (B, E, De) -> (B, T, De)."""
        return mix_per_task(weights, experts) if self.plain else mix_experts(weights, experts)
