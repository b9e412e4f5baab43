"""Small named parts the ranking models are assembled from."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": torch.relu, "silu": F.silu}


class MLP(nn.Sequential):
    """Linear (-> BatchNorm) -> activation (-> Dropout) per width in ``dims``.

    Args:
        in_dim: input width.
        dims: output width of each layer; the last is the block's output width.
        dropout: dropout after each activation (0 = none).
        norm: ``"batch"`` puts a ``BatchNorm1d`` between each linear layer and its activation (as
            torch-rechub's MLP); in eval mode it is an affine map, which the serving network folds
            into the linear layer (``ranking.fused``).
        activation: ``"relu"`` or ``"silu"`` (Swish: no dead units, as HoME uses against experts
            whose ReLUs are mostly zero).

    Example:
        >>> MLP(8, (16, 4))(torch.zeros(2, 8)).shape
        torch.Size([2, 4])
        >>> [type(m).__name__ for m in MLP(8, (4,), norm="batch")]
        ['Linear', 'BatchNorm1d', 'ReLU']
    """

    def __init__(self, in_dim: int, dims: Sequence[int], dropout: float = 0.0, norm: str = "none",
                 activation: str = "relu") -> None:
        if norm not in ("none", "batch"):
            raise ValueError(f"norm must be 'none' or 'batch', got {norm!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        layers: list[nn.Module] = []
        for d in dims:
            layers += [nn.Linear(in_dim, d), *([nn.BatchNorm1d(d)] if norm == "batch" else []),
                       nn.SiLU() if activation == "silu" else nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_dim = d
        super().__init__(*layers)
        self.out_dim = in_dim
        self.activation = activation
        self.norm = norm


class Expert(MLP):
    """One expert network of a mixture: (B, D_in) -> (B, D_expert)."""


class Experts(nn.ModuleList):
    """A pool of E experts with the same shapes, run on one input: (B, D) -> (B, E, De).

    The experts keep their own parameters (state_dict keys ``<i>.<layer>.weight``), but run as
    one batched network (see :func:`run_stacked`): one matmul per layer for the whole pool
    instead of E small ones, which is what dominates a CPU training step with many thin experts.
    :meth:`mix` mixes them for the tasks, running each expert only on its routed rows where
    sparse gate weights make that faster (:func:`prefer_sparse`).

    Args:
        in_dim: input width D.
        dims: each expert's layer widths; the last is De.
        num_experts: E.
        dropout: dropout inside each expert.
        activation: the experts' activation (:class:`MLP`).
        norm: ``"batch"``: a ``BatchNorm1d`` after each expert layer (:class:`MLP`; HoME's expert
            normalisation), run expert by expert in training and folded into the layers at serving.

    Example:
        >>> Experts(8, (16, 4), num_experts=3)(torch.zeros(2, 8)).shape
        torch.Size([2, 3, 4])
    """

    def __init__(self, in_dim: int, dims: Sequence[int], num_experts: int, dropout: float = 0.0,
                 activation: str = "relu", norm: str = "none") -> None:
        super().__init__(Expert(in_dim, dims, dropout, norm, activation) for _ in range(num_experts))
        self.out_dim = dims[-1] if dims else in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_stacked(cast("list[Expert]", list(self)), x)  # (B, E, De); nn.ModuleList types its items as Module

    def mix(self, x: torch.Tensor, weights: torch.Tensor, sparse: bool | None = None) -> torch.Tensor:
        """Each task's mixture of the experts' outputs: (B, D), (B, T, E) -> (B, T, De).

        Dense (``einsum('bte,bed->btd', weights, self(x))``, every expert on every row) or
        sparse (:func:`group_mixture`: expert ``e`` only on the rows that some task gives it a
        non-zero weight); ``sparse=None`` lets :func:`prefer_sparse` choose from the weights and
        the experts' size. Under ``torch.compile`` / ``torch.export`` the choice cannot read the
        weights, so ``None`` means dense there.

        Both give the same mixture and the same gradients to the experts' parameters (up to float
        summation order); see :func:`group_mixture` for the gradient of the weights themselves.

        Example:
            >>> _ = torch.manual_seed(0)
            >>> experts, x = Experts(4, (8, 3), num_experts=5), torch.randn(6, 4)
            >>> w = torch.zeros(6, 2, 5).index_fill_(2, torch.tensor([1, 3]), 0.5)  # experts 1 and 3 only
            >>> torch.allclose(experts.mix(x, w, sparse=True), experts.mix(x, w, sparse=False), atol=1e-6)
            True
        """
        if weights.dim() != 3 or weights.shape[2] != len(self) or weights.shape[0] != x.shape[0]:
            raise ValueError(f"weights of shape {tuple(weights.shape)} for {x.shape[0]} rows and {len(self)} experts; "
                             "expected (B, T, E)")
        if sparse is None:
            sparse = not torch.compiler.is_compiling() and prefer_sparse(weights, self.row_macs)
        if not sparse:
            experts = self(x)  # (B, E, De)
            return torch.einsum("bte,bed->btd", weights.to(experts.dtype), experts)
        mlps = cast("list[Expert]", list(self))
        return group_mixture(lambda e, rows: mlps[e](rows), x, weights)

    @property
    def row_macs(self) -> int:
        """Multiply-adds of one expert on one row: the sum of its layers' ``Din * Dout``."""
        linears = [m for m in cast(Expert, self[0]) if isinstance(m, nn.Linear)] if len(self) else []
        return sum(m.in_features * m.out_features for m in linears)


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
    if n and mlps[0].norm == "batch":  # per-MLP batch statistics: one by one
        return torch.stack([m(x) for m in mlps], dim=1)  # (B, N, Do)
    layers = [[m for m in mlp if isinstance(m, nn.Linear)] for mlp in mlps]  # N x L linears
    if not layers or not layers[0]:
        return x.unsqueeze(1).expand(-1, n, -1)  # (B, N, D)
    p = next((m.p for m in mlps[0] if isinstance(m, nn.Dropout)), 0.0)
    act = ACTIVATIONS[mlps[0].activation]
    h = x
    for depth in range(len(layers[0])):
        w = torch.stack([ls[depth].weight for ls in layers])  # (N, Do, Di)
        bias = torch.stack([ls[depth].bias for ls in layers])  # (N, Do)
        if depth == 0:
            h = torch.addmm(bias.flatten(), x, w.flatten(0, 1).t()).view(b, n, -1).transpose(0, 1)  # (N, B, Do)
        else:
            h = torch.baddbmm(bias.unsqueeze(1), h, w.transpose(1, 2))  # (N, B, Do)
        h = act(h)
        if p > 0:
            h = nn.functional.dropout(h, p, mlps[0].training)
    return h.transpose(0, 1)  # (B, N, Do)


def group_mixture(expert: Callable[[int, torch.Tensor], torch.Tensor], x: torch.Tensor | None,
                  weights: torch.Tensor) -> torch.Tensor:
    """Each task's mixture of E experts, each expert run only on the rows it is routed: -> (B, T, De).

    Equal to ``einsum('bte,bed->btd', weights, stack([expert(e, x) for e in range(E)], 1))`` for
    row-wise experts, without the (B, E, De) stack: expert ``e`` runs on the rows where some task's
    weight for it is non-zero (gathered), and its outputs, times those rows' weights, are added
    back into the (B, T, De) result (``index_add_``). With k of E experts active per row this does
    about k / E of the dense work, plus a fixed cost per expert (see :func:`prefer_sparse`).

    Gradients reach the experts' parameters and the weights. The weights' gradient equals the
    dense mixture's wherever the row's expert ran; on (row, expert) pairs no task selected it is 0,
    where the dense mixture's would be ``<grad, expert output>``. Every routing of
    ``ranking.gating`` makes its zeros by a mask or a ``-inf`` logit, which pass no gradient on, so
    the gate parameters get the same gradients either way.

    Eager runs read the per-expert row counts once (a host sync) and, without autograd, skip the
    experts with no rows; with autograd they run on no rows, so that every expert's parameters get
    a gradient (zeros, as from the dense mixture) and DDP sees each of them used. Under
    ``torch.compile`` / ``torch.export`` every expert runs, on ``nonzero``'s rows: sizes unknown
    at trace time (unbacked), which ``torch.export`` and AOTInductor accept, so the same code is
    exported with a dynamic batch (tests/ranking/test_sparse_experts.py).

    Args:
        expert: ``expert(e, rows)`` is expert ``e`` on ``rows`` (n, D) -> (n, De), row by row.
        x: (B, D) the experts' common input; ``None``: ``expert`` gets the (n,) indices of its rows
            instead and gathers its input itself (the serving network's split first layer).
        weights: (B, T, E) mixture weights, zeros where a task does not use an expert.

    Returns:
        (B, T, De) in the experts' output dtype; accumulated in the weights' (float32) precision.
    """
    b, t, e = weights.shape
    active = weights.ne(0).any(dim=1)  # (B, E): some task uses expert e on row b
    groups: list[tuple[int, torch.Tensor]]
    if torch.compiler.is_compiling():
        groups = [(i, active[:, i].nonzero().squeeze(1)) for i in range(e)]  # (n_i,) each, n_i unbacked
    else:
        counts = active.sum(dim=0).tolist()  # (E,) rows per expert
        _, rows = active.t().nonzero(as_tuple=True)  # (P,) rows, grouped by expert
        keep_all = torch.is_grad_enabled()  # an expert without rows still gets (zero) gradients, as in DDP's graph
        per_expert = zip(torch.split(rows, counts), counts, strict=True)  # (n_i,) rows of expert i
        groups = [(i, r) for i, (r, n) in enumerate(per_expert) if n or keep_all]
        if not groups:  # no row uses any expert (or B = 0): one empty run gives De and the dtype
            groups = [(0, rows)]
    out: torch.Tensor | None = None
    for i, rows in groups:
        y = expert(i, rows if x is None else x.index_select(0, rows))  # (n_i, De)
        part = weights[:, :, i].index_select(0, rows).unsqueeze(-1) * y.unsqueeze(1)  # (n_i, T, De)
        if out is None:
            out = part.new_zeros(b, t, y.shape[1])  # (B, T, De)
        out.index_add_(0, rows, part)
    assert out is not None  # groups is never empty
    return out.to(y.dtype)


# prefer_sparse's cost model, fitted on the 2-core AMD EPYC box (torch 2.13 CPU, inference mode,
# 4 tasks, input width 256; benchmarks/sparse_experts.py and a wider grid of 4-16 experts of
# [128, 64] to [512, 256] on 1-1000 rows): an expert run on its gathered rows costs a fixed ~35 µs
# (its ~10 operators: row gather, one matmul per layer, weight gather, scatter-add) whatever its
# row count, ~1.5M multiply-adds at the ~40k per µs that one thread's matmuls reach; a gathered
# (row, expert) pair costs ~1.3x a dense one (the gather of its input row, the scatter of T
# outputs); and an expert the dense side runs but the sparse side skips also saves reading its
# weights, worth ~4 rows of multiply-adds (at one row, 16 experts of [512, 256]: 690 µs dense, the
# 16 MB of weights, against 90 µs for one expert). The fixed cost is per thread: with more threads
# the dense matmuls speed up and the operators' fixed costs do not.
_EXPERT_RUN_MACS = 1_500_000
_PAIR_FACTOR = 1.3
_WEIGHT_READ_MACS = 4


def prefer_sparse(weights: torch.Tensor, row_macs: int) -> bool:
    """Whether :func:`group_mixture` is faster than the dense mixture for these weights and experts.

    Sparse when the work it skips outweighs its fixed costs, all in multiply-adds::

        row_macs * (B * E - 1.3 * P + 4 * (E - E_run))  >  1.5M * torch threads * E_run

    with P the (row, expert) pairs some task uses and E_run the experts with at least one such row
    (the constants are explained above the function). Measured eager (benchmarks/sparse_experts.py,
    stacked layout, µs of dense / sparse, 1 thread, k of E experts per row):

    ============================  ======  =========================================
    experts                       rows    k = 1 / 2 / 4 / 8 / 16
    ============================  ======  =========================================
    16 x [512, 256], 256 wide     1000    11.3 / 6.8 / 3.8 / 1.8 / 0.98x
    16 x [512, 256], 256 wide     100     4.0 / 3.4 / 2.4 / 1.6 / 0.96x
    4 x [128, 64] (the default)   1000    2.64 / 1.40 / 0.71x (k = 1 / 2 / 4)
    4 x [128, 64] (the default)   100     1.31 / 0.97 / 0.64x
    ============================  ======  =========================================

    At 2 threads the default pool at 100 rows and k = 1 turns to 0.84x; at one row it is 0.4x (24
    against 61 µs). The rule picks the faster side in all 32 cases of that benchmark (1 and 2
    threads; one a tie at 1.00x); in the wider grid it misses 8 of 104 cases, each by at most 16%.

    It reads the weights (a host sync on a GPU) and the thread count, so it suits eager code only;
    an exported network has to decide once, from its configuration. Compiled by AOTInductor (the
    same benchmark, ``--aoti``), sparse beats dense with a quarter of the pairs active or fewer
    (1.35-9x), is about even at half for the default pool (0.93-1.04x; 1.2-1.5x for the large
    one) and loses with all active (0.56-0.81x).

    Args:
        weights: (B, T, E) mixture weights.
        row_macs: multiply-adds of one expert on one row (:attr:`Experts.row_macs`).

    Example:
        >>> w = torch.zeros(1000, 4, 16); w[:, :, :2] = 0.5  # 2 of 16 experts per row
        >>> prefer_sparse(w, 256 * 512 + 512 * 256), prefer_sparse(torch.ones(100, 4, 4), 256 * 128 + 128 * 64)
        (True, False)
    """
    active = weights.ne(0).any(dim=1)  # (B, E)
    b, e = active.shape
    return sparse_saves(b, e, int(active.sum()), int(active.any(dim=0).sum()), row_macs)


def sparse_saves(rows: int, experts: int, pairs: float, runs: int, row_macs: int) -> bool:
    """:func:`prefer_sparse`'s rule on counts: ``pairs`` (row, expert) pairs used, ``runs`` experts run.

    For code that must decide before it sees the weights (an exported network): the counts a
    configuration expects, e.g. ``rows`` candidates with ``k`` experts each, every expert used.

    Example:
        >>> sparse_saves(100, 16, 100 * 2, 16, 256 * 512 + 512 * 256), sparse_saves(100, 4, 400, 4, 40_000)
        (True, False)
    """
    saved = row_macs * (rows * experts - _PAIR_FACTOR * pairs + _WEIGHT_READ_MACS * (experts - runs))
    return saved > _EXPERT_RUN_MACS * torch.get_num_threads() * runs


def sparse_mixture(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor, weights: torch.Tensor,
                   *, dropout: float = 0.0, training: bool = False, activation: str = "relu") -> torch.Tensor:
    """:func:`group_mixture` of stacked experts: each expert only on the rows routed to it -> (B, T, De).

    Equal to the dense ``einsum('bte,bed->btd', weights, experts(x))`` (up to float summation
    order), where ``experts`` are the stacked MLPs of ``layers``: per layer ``x W_e + b_e``, the activation,
    dropout (as :class:`MLP` and :func:`run_stacked`; dropout acts only when ``training``).

    Args:
        layers: per layer (E, Din, Dout) weights and (E, 1, Dout) biases, the layout of
            ``ranking.fused._stack_layers``; no layers: each expert is the identity.
        x: (B, D) the experts' common input.
        weights: (B, T, E) gate weights, with zeros where a task does not use an expert.
        dropout: dropout probability after each activation.
        training: whether dropout acts.
        activation: ``"relu"`` or ``"silu"``, as the experts were built.

    Returns:
        (B, T, De).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layers = [(torch.randn(3, 4, 5), torch.randn(3, 1, 5)), (torch.randn(3, 5, 2), torch.randn(3, 1, 2))]
        >>> x, w = torch.randn(6, 4), torch.zeros(6, 2, 3).index_fill_(2, torch.tensor([2]), 1.0)  # expert 2
        >>> h = torch.relu(torch.relu(x @ layers[0][0][2] + layers[0][1][2]) @ layers[1][0][2] + layers[1][1][2])
        >>> torch.allclose(sparse_mixture(layers, x, w), h.unsqueeze(1).expand(-1, 2, -1))
        True
    """
    e = weights.shape[-1]
    for w, bias in layers:
        if w.dim() != 3 or w.shape[0] != e or bias.shape != (e, 1, w.shape[2]):
            raise ValueError(f"layer weights {tuple(w.shape)} and biases {tuple(bias.shape)} for {e} experts; "
                             "expected (E, Din, Dout) and (E, 1, Dout)")

    act = ACTIVATIONS[activation]

    def expert(i: int, h: torch.Tensor) -> torch.Tensor:
        for w, bias in layers:
            h = act(torch.addmm(bias[i], h, w[i]))  # (n, Dout)
            if dropout > 0:
                h = F.dropout(h, dropout, training)
        return h

    return group_mixture(expert, x, weights)


class FeatureGate(nn.Module):
    """A field-wise input gate: each feature field of the front scaled by ``2 sigmoid(MLP(x))``.

    HoME's feature gate and PEPNet's gate unit (Kuaishou): a small network of the whole front
    (B, D) gives one factor per field (an embedding of ``widths[f]`` columns, or one dense column)
    in (0, 2), multiplied onto that field's columns; it lets a row turn features up or down. The
    last layer starts at zero, so every factor starts at 1 and the gate at the identity.

    Args:
        widths: the columns of each field, in front order (they sum to D).
        hidden: the gate network's hidden width.

    Example:
        >>> gate = FeatureGate([4, 4, 1], hidden=8)
        >>> x = torch.randn(3, 9)
        >>> torch.equal(gate(x), x)  # the identity until trained
        True
    """

    field_of_col: torch.Tensor  # buffer, registered in __init__

    def __init__(self, widths: Sequence[int], hidden: int) -> None:
        super().__init__()
        d = sum(widths)
        self.hidden = nn.Linear(d, hidden)
        self.out = nn.Linear(hidden, len(widths))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        cols = [f for f, w in enumerate(widths) for _ in range(w)]
        self.register_buffer("field_of_col", torch.tensor(cols, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, D), each field's columns times its factor."""
        factor = 2 * torch.sigmoid(self.out(torch.relu(self.hidden(x))))  # (B, fields)
        return x * factor.index_select(1, self.field_of_col)  # (B, D)


def cross_network(in_dim: int, layers: int, rank: int, experts: int) -> nn.Module:
    """A DCN-v2 cross network (Wang et al. 2021) from TorchRec: (B, D) -> (B, D).

    ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l``, explicit feature crosses of degree ``layers + 1``.
    ``rank`` 0: full-rank ``W_l`` (:class:`torchrec.modules.crossnet.CrossNet`); ``rank`` r > 0:
    ``W_l = U_l V_l`` of rank r (``LowRankCrossNet``); with ``experts`` > 1, a mixture of that many
    low-rank crosses per layer (``LowRankMixtureCrossNet``, DCN-Mix).

    Example:
        >>> cross_network(6, 2, 3, 1)(torch.zeros(4, 6)).shape
        torch.Size([4, 6])
    """
    from torchrec.modules.crossnet import CrossNet, LowRankCrossNet, LowRankMixtureCrossNet

    net: nn.Module
    if not rank:
        net = CrossNet(in_dim, layers)
    elif experts > 1:
        net = LowRankMixtureCrossNet(in_dim, layers, num_experts=experts, low_rank=rank)
    else:
        net = LowRankCrossNet(in_dim, layers, low_rank=rank)
    return net


class Tower(nn.Module):
    """A task tower: MLP (``norm``: see :class:`MLP`) then a single output logit, (B, D) -> (B,).

    Example:
        >>> Tower(8, (4,))(torch.zeros(3, 8)).shape
        torch.Size([3])
    """

    def __init__(self, in_dim: int, dims: Sequence[int], dropout: float = 0.0, norm: str = "none") -> None:
        super().__init__()
        self.mlp = MLP(in_dim, dims, dropout, norm)
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
