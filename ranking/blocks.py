"""Small named parts the ranking models are assembled from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn


class MLP(nn.Sequential):
    """Linear -> ReLU (-> Dropout) per width in ``dims``.

    Args:
        in_dim: input width.
        dims: output width of each layer; the last is the block's output width.
        dropout: dropout after each activation (0 = none).

    Example:
        >>> MLP(8, (16, 4))(torch.zeros(2, 8)).shape
        torch.Size([2, 4])
    """

    def __init__(self, in_dim: int, dims: Sequence[int], dropout: float = 0.0) -> None:
        layers: list[nn.Module] = []
        for d in dims:
            layers += [nn.Linear(in_dim, d), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_dim = d
        super().__init__(*layers)
        self.out_dim = in_dim


class Expert(MLP):
    """One expert network of a mixture: (B, D_in) -> (B, D_expert)."""


class Experts(nn.ModuleList):
    """A pool of E experts with the same shapes, run on one input: (B, D) -> (B, E, De).

    The experts keep their own parameters (state_dict keys ``<i>.<layer>.weight``), but run as
    one batched network (see :func:`run_stacked`): one matmul per layer for the whole pool
    instead of E small ones, which is what dominates a CPU training step with many thin experts.

    Args:
        in_dim: input width D.
        dims: each expert's layer widths; the last is De.
        num_experts: E.
        dropout: dropout inside each expert.

    Example:
        >>> Experts(8, (16, 4), num_experts=3)(torch.zeros(2, 8)).shape
        torch.Size([2, 3, 4])
    """

    def __init__(self, in_dim: int, dims: Sequence[int], num_experts: int, dropout: float = 0.0) -> None:
        super().__init__(Expert(in_dim, dims, dropout) for _ in range(num_experts))
        self.out_dim = dims[-1] if dims else in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_stacked(cast("list[Expert]", list(self)), x)  # (B, E, De); nn.ModuleList types its items as Module


def run_stacked(mlps: Sequence[MLP], x: torch.Tensor) -> torch.Tensor:
    """Run N same-shaped MLPs on one input as a single batched network: (B, D) -> (B, N, Dout).

    Equal to ``torch.stack([m(x) for m in mlps], dim=1)`` (up to float summation order): the
    first layer of all N is one (D -> N * D1) matmul, every later layer one ``baddbmm`` over N;
    ReLU and dropout act elementwise as in each MLP. Gradients reach every MLP's own parameters,
    because the stacked weights are rebuilt from them on every call (a cheap copy of small
    matrices, far cheaper than N separate matmuls and their backward passes).

    Args:
        mlps: N MLPs built with the same ``in_dim``, ``dims`` and ``dropout``.
        x: (B, D) input.

    Returns:
        (B, N, Dout), MLP ``n``'s output at ``[:, n]``; with no layers, ``x`` repeated N times.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> mlps, x = [MLP(3, (4, 2)) for _ in range(5)], torch.randn(6, 3)
        >>> torch.allclose(run_stacked(mlps, x), torch.stack([m(x) for m in mlps], dim=1), atol=1e-6)
        True
    """
    n, b = len(mlps), x.shape[0]
    layers = [[m for m in mlp if isinstance(m, nn.Linear)] for mlp in mlps]  # N x L linears
    if not layers or not layers[0]:
        return x.unsqueeze(1).expand(-1, n, -1)  # (B, N, D)
    p = next((m.p for m in mlps[0] if isinstance(m, nn.Dropout)), 0.0)
    h = x
    for depth in range(len(layers[0])):
        w = torch.stack([ls[depth].weight for ls in layers])  # (N, Do, Di)
        bias = torch.stack([ls[depth].bias for ls in layers])  # (N, Do)
        if depth == 0:
            h = torch.addmm(bias.flatten(), x, w.flatten(0, 1).t()).view(b, n, -1).transpose(0, 1)  # (N, B, Do)
        else:
            h = torch.baddbmm(bias.unsqueeze(1), h, w.transpose(1, 2))  # (N, B, Do)
        h = torch.relu(h)
        if p > 0:
            h = nn.functional.dropout(h, p, mlps[0].training)
    return h.transpose(0, 1)  # (B, N, Do)


class Tower(nn.Module):
    """A task tower: MLP then a single output logit, (B, D) -> (B,).

    Example:
        >>> Tower(8, (4,))(torch.zeros(3, 8)).shape
        torch.Size([3])
    """

    def __init__(self, in_dim: int, dims: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, dims, dropout)
        self.out = nn.Linear(self.mlp.out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit: torch.Tensor = self.out(self.mlp(x))  # (B, 1)
        return logit.squeeze(-1)


class PositionBiasTower(nn.Module):
    """Shallow tower (YouTube, Zhao et al. 2019): a per-position logit added in training only.

    A share ``dropout`` of training rows gets the reserved "unknown position" bucket so the main
    towers do not learn to lean on it; at serving the tower is not called at all.
    """

    def __init__(self, buckets: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.buckets = buckets
        self.dropout = dropout
        self.bias = nn.Embedding(buckets + 1, 1)  # last row: unknown / dropped position
        nn.init.zeros_(self.bias.weight)

    def forward(self, position: torch.Tensor) -> torch.Tensor:
        pos = position.clamp(0, self.buckets - 1)
        if self.training and self.dropout > 0:
            drop = torch.rand(pos.shape, device=pos.device) < self.dropout
            pos = torch.where(drop, torch.full_like(pos, self.buckets), pos)
        bias: torch.Tensor = self.bias(pos)  # (B, 1)
        return bias.squeeze(-1)  # (B,)
