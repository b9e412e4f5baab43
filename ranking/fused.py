"""The serving network: the artifact's weights rearranged, once at load, for scoring requests.

:class:`FusedScorer` computes what the training model computes for the same rows (a parity test
holds it to 1e-5 of ``RankingModel.forward``), with none of the per-call work that the training
path needs and serving does not:

- **Tables as plain tensors, one gather per side.** Every single-valued table of one side
  (request or item, see below) is flattened into one buffer; a row's embeddings of all features
  are one ``take`` with an index computed from the ids. No ``KeyedJaggedTensor``, no
  ``EmbeddingBagCollection`` dispatch; multi-valued features are one ``embedding_bag`` each.
- **User and context once per request** (TorchEasyRec's input tiling). Request-side features
  (``features.plan``) are looked up for R requests, not N candidates. The first linear layer
  that reads the front is split by columns, ``W x = W_item x_item + W_req x_req``: the request
  part is computed once per request and added to each of its candidates' rows. The first layer
  is the shared bottom's, or, without a bottom, MMoE's expert input layers and gates fused into
  one matrix. A model with a feature gate or a cross network (``RankingModel.interact``) mixes
  the two sides before any linear layer: its front is assembled per candidate and not split.
- **MMoE as a handful of batched ops.** The experts' layers are stacked once (one ``baddbmm``
  per layer for all experts), all task gates are one matmul, the towers are stacked like the
  experts. Other variants (``omoe``, ``ple``, ``shared_bottom``, ``single_task``) keep their own
  ``head`` after the fused front.
- **Routed experts run on their rows only.** A routed mixture (top-k, top-p, hash, expert choice,
  the shared selection, or ``--experts-k``) computes its gates first; where the weights leave
  enough experts idle for the experts' size (:func:`ranking.blocks.prefer_sparse` per call in
  eager, decided once at load for an exported network), each expert runs only on the rows routed
  to it (:func:`ranking.blocks.sparse_mixture`), so lowering k lowers the cost per candidate.

Inputs are an :class:`features.plan.EncodedBatch`; the output is (T, N) scores: probabilities for
binary tasks, predictions for regression tasks.

Shape letters: R requests, N candidates of all of them, D width, E experts, T tasks, De expert
width; ``_r`` / ``_i`` mark request-side and item-side parts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from features.plan import EncodedBatch, ServingPlan
from ranking.blocks import (
    Expert,
    Tower,
    group_mixture,
    prefer_sparse,
    sparse_mixture,
    sparse_saves,
)
from ranking.gating import (
    expert_choice_weights,
    hash_weights,
    shared_topk_weights,
    softmax_weights,
    top_p_weights,
)
from ranking.mmoe import MMoE
from ranking.models import RankingModel
from ranking.scores import binary_mask


@dataclass(frozen=True)
class _Side:
    """Where one side's features sit: in the front's config order and in the side's own layout."""

    singles: list[str]  # single-valued sparse features of the side, config order
    lists: list[str]  # multi-valued sparse features of the side, config order
    dense: list[str]  # dense features of the side, the plan's order
    columns: list[int]  # config-order front columns, in the side's layout order


class Front(nn.Module):
    """One side's inputs -> its part of the front, (n, D_side) in the side's layout.

    Layout: single-valued embeddings (config order), multi-valued pooled embeddings, dense.
    """

    flat: torch.Tensor  # buffers, registered in __init__
    col_feature: torch.Tensor
    col_scale: torch.Tensor
    col_base: torch.Tensor

    def __init__(self, model: RankingModel, side: _Side) -> None:
        super().__init__()
        bags = model.embeddings.embedding_bags
        dims = {s.name: s.embedding_dim for s in model.config.sparse}
        self.singles, self.lists, self.n_dense = side.singles, side.lists, len(side.dense)
        tables = [bags[f"t_{n}"].weight.detach() for n in side.singles]
        starts = np.cumsum([0] + [t.numel() for t in tables])[:-1]
        col_feature, col_scale, col_base = [], [], []
        for j, (name, start) in enumerate(zip(side.singles, starts, strict=True)):
            d = dims[name]
            col_feature += [j] * d
            col_scale += [d] * d
            col_base += [int(start) + k for k in range(d)]
        self.register_buffer("flat", torch.cat([t.reshape(-1) for t in tables]) if tables else torch.zeros(0))
        self.register_buffer("col_feature", torch.tensor(col_feature, dtype=torch.long))
        self.register_buffer("col_scale", torch.tensor(col_scale, dtype=torch.long))
        self.register_buffer("col_base", torch.tensor(col_base, dtype=torch.long))
        self.list_tables = [bags[f"t_{n}"].weight.detach() for n in side.lists]
        pooling = {s.name: s.pooling for s in model.config.sparse}
        self.list_modes = [pooling[n] for n in side.lists]
        self.width = len(col_base) + sum(dims[n] for n in side.lists) + self.n_dense

    def forward(self, ids: torch.Tensor, lists: list[tuple[torch.Tensor, torch.Tensor]],
                dense: torch.Tensor) -> torch.Tensor:
        """ids (n, F_side) int64, per list feature (values (L,), offsets (n,)), dense (n, Dd_side)."""
        parts = []
        if self.singles:
            index = ids.index_select(1, self.col_feature) * self.col_scale + self.col_base  # (n, sum of dims)
            parts.append(self.flat.take(index))  # (n, sum of dims): every table in one gather
        for table, mode, (values, offsets) in zip(self.list_tables, self.list_modes, lists, strict=True):
            parts.append(F.embedding_bag(values, table, offsets, mode=mode))  # (n, d), empty bags -> 0
        if self.n_dense or not parts:
            parts.append(dense)  # (n, Dd_side); (n, 0) for a side with no features at all
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (n, D_side)


class SplitLinear(nn.Module):
    """``W x + b`` on the front, with the request columns computed once per request.

    Args:
        weight: (Out, D) over the front in config order; bias: (Out,).
        request_cols, item_cols: the config-order columns of each side, in the sides' layouts.
    """

    w_i: torch.Tensor  # buffers, registered in __init__
    w_r: torch.Tensor
    bias: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, request_cols: list[int], item_cols: list[int]) -> None:
        super().__init__()
        w = weight.detach()
        self.register_buffer("w_i", w[:, item_cols].t().contiguous())  # (D_i, Out)
        self.register_buffer("w_r", w[:, request_cols].t().contiguous())  # (D_r, Out)
        self.register_buffer("bias", bias.detach().clone())  # (Out,)
        self.has_request = bool(request_cols)
        self.has_item = bool(item_cols)

    def forward(self, x_r: torch.Tensor, x_i: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """x_r (R, D_r), x_i (N, D_i), owner (N,) request of each candidate -> (N, Out)."""
        if self.has_request:
            per_request = torch.addmm(self.bias, x_r, self.w_r)  # (R, Out): once per request
            base = per_request.index_select(0, owner)  # (N, Out)
            return torch.addmm(base, x_i, self.w_i) if self.has_item else base
        return torch.addmm(self.bias, x_i, self.w_i)  # (N, Out)


def _affine_layers(mlp: nn.Sequential) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """An MLP's linear layers as (weight (Dout, Din), bias (Dout,)), each eval-mode ``BatchNorm1d``
    that follows one folded in: ``gamma (W x + b - mean) / sqrt(var + eps) + beta``."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for m in mlp:
        if isinstance(m, nn.Linear):
            out.append((m.weight.detach(), m.bias.detach()))
        elif isinstance(m, nn.BatchNorm1d):
            if not out or m.running_mean is None or m.running_var is None:
                raise ValueError("a BatchNorm1d with running statistics must follow a linear layer")
            w, b = out[-1]
            scale = (m.weight.detach() if m.affine else 1.0) / torch.sqrt(m.running_var + m.eps)  # (Dout,)
            shift = m.bias.detach() if m.affine else 0.0
            out[-1] = (w * scale.unsqueeze(1), (b - m.running_mean) * scale + shift)
    return out


def _stack_layers(mlps: Sequence[nn.Sequential]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """N same-shaped MLPs -> per layer (N, Din, Dout) weights and (N, 1, Dout) biases (batch norms folded)."""
    layers = [_affine_layers(mlp) for mlp in mlps]
    weights, biases = [], []
    for depth in range(len(layers[0]) if layers else 0):
        weights.append(torch.stack([ls[depth][0].t() for ls in layers]).contiguous())
        biases.append(torch.stack([ls[depth][1] for ls in layers]).unsqueeze(1).contiguous())
    return weights, biases


class MMoEHead(nn.Module):
    """MMoE after its first hidden layer: stacked experts, fused gates, stacked towers.

    ``first`` computes ``[experts' first layer (E * D1) | gate logits (T * E_gate) | router (S)]``
    for every row (the router only for a task-shared selection); with a shared bottom, it is the
    experts' and gates' input projection on the bottom's output. The routing is the model's
    (``ranking.gating``'s functions, so the weights equal the training path's); expert choice
    groups the candidates by request, hash routing reads the rows' ids of its feature.
    """

    def __init__(self, model: MMoE) -> None:
        super().__init__()
        experts = cast("list[Expert]", list(model.experts))  # nn.ModuleList/ModuleDict type their items as Module
        routing = model.gates
        gates = routing.gates
        self.kind = routing.kind
        self.n_experts, self.n_tasks = len(experts), len(model.task_names)
        self.route_k = routing.top_k  # expert choice's capacity, the shared selection's k (set_top_k lowers it)
        self.capacity_factor = routing.config.capacity_factor
        self.private = routing.config.private_experts
        g0 = gates[0] if gates else None
        self.top_k = g0.top_k if g0 is not None and g0.top_k is not None and g0.top_k < g0.num_experts else None
        self.top_p = g0.top_p if g0 is not None else None
        self.activation = experts[0].activation  # the experts' ("relu" or "silu")
        w, b = _stack_layers(experts)  # layer 0: (E, D, D1)
        self.d1 = w[0].shape[2]
        self.expert_w = [x for x in w[1:]]  # (E, Din, Dout) per later layer
        self.expert_b = [x for x in b[1:]]
        projections = [g.proj for g in gates] + ([routing.router] if routing.router is not None else [])
        first_w = torch.cat([w[0].transpose(1, 2).reshape(-1, w[0].shape[1]),  # (E * D1, D)
                             *[p.weight.detach() for p in projections]])  # (T * E_gate [+ S], D)
        first_b = torch.cat([b[0].reshape(-1), *[p.bias.detach() for p in projections]])
        self.gate_width = g0.num_experts if g0 is not None else 0
        self.first_weight, self.first_bias = first_w, first_b
        cut = len(experts) * self.d1  # first's rows: the experts' first layer, then the gates
        self.expert_weight, self.expert_bias = first_w[:cut].contiguous(), first_b[:cut].contiguous()
        self.gate_weight, self.gate_bias = first_w[cut:].contiguous(), first_b[cut:].contiguous()
        # every expert layer as (E, Din, Dout) and (E, 1, Dout), the first a view of expert_weight (no copy)
        first = self.expert_weight.view(self.n_experts, self.d1, -1).transpose(1, 2)  # (E, D, D1)
        self.layers = [(first, b[0]), *zip(self.expert_w, self.expert_b, strict=True)]
        self.row_macs = sum(int(x.shape[1] * x.shape[2]) for x in w)  # one expert on one row
        self.pairs_per_row = self._expected_pairs()
        # a routed mixture's weights have zeros, so some experts may be skipped on some rows
        self.may_sparse = self.kind in ("hash", "expert_choice", "shared_topk") or self.top_k is not None \
            or self.top_p is not None
        # an exported network cannot look at the weights: it decides once, for 100 candidates
        self.sparse_when_exported = self.may_sparse and sparse_saves(
            100, self.n_experts, 100 * self.pairs_per_row, self.n_experts, self.row_macs)
        towers = [cast(Tower, model.towers[t]) for t in model.task_names]
        tw, tb = _stack_layers([nn.Sequential(*t.mlp, t.out) for t in towers])
        self.tower_w, self.tower_b = tw, tb  # (T, Din, Dout); the last layer's Dout is 1

    def _expected_pairs(self) -> float:
        """Experts a row runs, at most (any task's weight non-zero): the configuration's bound."""
        e, t = self.n_experts, self.n_tasks
        if self.kind == "hash":
            return 1.0
        if self.kind == "shared_topk":
            return float(min(e, self.route_k + t * self.private))
        if self.kind == "expert_choice":  # each task's experts take capacity_factor * k rows per row on average
            return float(min(e, t * self.capacity_factor * self.route_k))
        if self.top_k is not None:
            return float(min(e, t * self.top_k))
        if self.top_p is not None:
            return float(min(e, t * self.top_p[2]))
        return float(e)

    def use_sparse(self, g: torch.Tensor) -> bool:
        """Whether to run each expert on its routed rows only, for these (N, T, E) weights.

        Eager: :func:`ranking.blocks.prefer_sparse` on the weights themselves (so one candidate of
        small experts stays dense); exported: the choice made at load for 100 candidates.
        """
        if not self.may_sparse:
            return False
        if torch.compiler.is_compiling():
            return self.sparse_when_exported
        return prefer_sparse(g, self.row_macs)

    def forward(self, h: torch.Tensor, owner: torch.Tensor, n_requests: int,
                ids: torch.Tensor | None = None) -> torch.Tensor:
        """h (N, E * D1 + T * E_gate [+ S]), owner (N,) request of each row -> (T, N) logits (dense)."""
        g = self.weights(h[:, self.n_experts * self.d1:], owner, n_requests, ids)  # (N, T, E)
        return self.dense(h, g)

    def dense(self, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Every expert on every row: h (N, >= E * D1) the experts' first layer, g (N, T, E) -> (T, N)."""
        n, e = h.shape[0], self.n_experts
        # activations in place: every tensor here is this call's own (h too: the gates were read from it already)
        x = self._act_(h[:, : e * self.d1]).view(n, e, self.d1).transpose(0, 1)  # (E, N, D1)
        for w, b in zip(self.expert_w, self.expert_b, strict=True):
            x = self._act_(torch.baddbmm(b, x, w))  # (E, N, Dout)
        mixed = torch.bmm(g.to(x.dtype), x.transpose(0, 1)).transpose(0, 1)  # (N, T, E) @ (N, E, De) -> (T, N, De)
        return self.towers(mixed)

    def _act_(self, x: torch.Tensor) -> torch.Tensor:
        """The experts' activation, in place."""
        return F.silu(x, inplace=True) if self.activation == "silu" else x.relu_()

    def sparse(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Each expert on its routed rows only: x (N, D) the experts' input, g (N, T, E) -> (T, N)."""
        mixed = sparse_mixture(self.layers, x, g, activation=self.activation)  # (N, T, De)
        return self.towers(mixed.transpose(0, 1))

    def sparse_split(self, x_r: torch.Tensor, x_i: torch.Tensor, split: SplitLinear, owner: torch.Tensor,
                     g: torch.Tensor) -> torch.Tensor:
        """:meth:`sparse` with the first layer split by ``split`` (the experts' first layer): -> (T, N).

        An expert that runs computes its request part once per request (R rows, not its n
        candidates), reading only its own columns of ``split``'s weights.

        Args:
            x_r: (R, D_r) the requests' features; x_i: (N, D_i) the candidates'.
            split: the experts' first layer, ``W`` of (E * D1) outputs split by side.
            owner: (N,) request of each candidate; g: (N, T, E) the weights.
        """
        e, d1 = self.n_experts, self.d1
        request_w, item_w = split.w_r.view(-1, e, d1), split.w_i.view(-1, e, d1)  # (D_side, E, D1) views
        bias = split.bias.view(e, d1)

        def expert(i: int, rows: torch.Tensor) -> torch.Tensor:
            if split.has_request:  # (R, D1) once per request, then each row's request
                h = torch.addmm(bias[i], x_r, request_w[:, i]).index_select(0, owner.index_select(0, rows))
                if split.has_item:
                    h = torch.addmm(h, x_i.index_select(0, rows), item_w[:, i])
            else:
                h = torch.addmm(bias[i], x_i.index_select(0, rows), item_w[:, i])
            h = self._act_(h)  # (n, D1)
            for w, b in zip(self.expert_w, self.expert_b, strict=True):
                h = self._act_(torch.addmm(b[i], h, w[i]))  # (n, Dout)
            return h

        return self.towers(group_mixture(expert, None, g).transpose(0, 1))  # (T, N, De)

    def towers(self, mixed: torch.Tensor) -> torch.Tensor:
        """(T, N, De) each task's mixture -> (T, N) logits."""
        last = len(self.tower_w) - 1
        for depth, (w, b) in enumerate(zip(self.tower_w, self.tower_b, strict=True)):
            mixed = torch.baddbmm(b, mixed, w)  # (T, N, Dout)
            if depth < last:
                mixed = torch.relu(mixed)
        return mixed.squeeze(-1)  # (T, N)

    def weights(self, gate_cols: torch.Tensor, owner: torch.Tensor, n_requests: int,
                ids: torch.Tensor | None) -> torch.Tensor:
        """The gate columns of ``first`` (N, T * E_gate [+ S]) -> (N, T, E) mixture weights, float32."""
        n, t = gate_cols.shape[0], self.n_tasks
        if self.kind == "hash":
            assert ids is not None
            return hash_weights(ids, self.n_experts, t)
        logits = gate_cols[:, : t * self.gate_width].reshape(n, t, self.gate_width).float()  # (N, T, E_gate)
        if self.kind == "shared_topk":
            router = gate_cols[:, t * self.gate_width:].float()  # (N, S)
            return shared_topk_weights(logits, router, self.route_k, self.private)
        if self.kind == "expert_choice":
            return expert_choice_weights(softmax_weights(logits), self.route_k, self.capacity_factor, owner, n_requests)
        if self.top_k is not None:
            top = logits.topk(self.top_k, dim=-1)
            logits = torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)
        g = softmax_weights(logits)  # (N, T, E)
        return top_p_weights(g, *self.top_p) if self.top_p is not None else g


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """torch talks to itself while exporting: its fx tracer warns that its own is_fx_tracing covers
    export too, and it pickles pytree specs with a check it deprecated (torch 2.13)."""
    fx_log = logging.getLogger("torch.fx._symbolic_trace")
    level = fx_log.level
    fx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        fx_log.setLevel(level)


class _Scores(nn.Module):
    """:meth:`FusedScorer.scores` as a module's forward, for ``torch.export``."""

    def __init__(self, scorer: FusedScorer) -> None:
        super().__init__()
        self.scorer = scorer

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.scorer.scores(*inputs)


class FusedScorer(nn.Module):
    """The artifact's network for serving; see the module docstring.

    Args:
        model: the loaded network (eval mode; its weights are copied, not shared for training).
        plan: the serving plan of the same artifact (which features are request-side).

    Example:
        >>> scorer = FusedScorer(model, ServingPlan(fitted))  # doctest: +SKIP
        >>> scorer.score(plan.encode(requests)).shape  # (T, N)  # doctest: +SKIP
    """

    binary: torch.Tensor  # buffers, registered in __init__
    to_config: torch.Tensor
    first: SplitLinear | None  # the bottom's first layer, split; None without a bottom

    def __init__(self, model: RankingModel, plan: ServingPlan) -> None:
        super().__init__()
        cfg = model.config
        self._compiled: Callable[..., torch.Tensor] | None = None
        self.model = model.eval()
        self.tasks = [t.name for t in cfg.tasks]
        self.register_buffer("binary", binary_mask(cfg.tasks))  # (T, 1): ranking.scores' sigmoid rows
        # config-order front columns: embeddings of config.sparse, then config.dense
        starts, at = {}, 0
        for s in cfg.sparse:
            starts[s.name] = (at, s.embedding_dim)
            at += s.embedding_dim
        for d in cfg.dense:
            starts[d] = (at, 1)
            at += 1
        multi = {s.name for s in cfg.sparse if s.multi}
        sides = {}
        for side in ("request", "item"):
            names = [s.name for s in cfg.sparse if plan.side(s.name) == side]
            singles = [n for n in names if n not in multi]
            lists = [n for n in names if n in multi]
            dense = plan.request_dense if side == "request" else plan.item_dense
            cols = [c for n in [*singles, *lists, *dense] for c in range(starts[n][0], starts[n][0] + starts[n][1])]
            sides[side] = _Side(singles, lists, list(dense), cols)
        self.sides = sides
        self.front_r, self.front_i = Front(model, sides["request"]), Front(model, sides["item"])
        self.width = at
        linears = [m for m in model.bottom if isinstance(m, nn.Linear)]
        self.mmoe = MMoEHead(model) if isinstance(model, MMoE) else None
        self.after_bottom: SplitLinear | None = None  # the dense MMoE's first layer without a bottom
        # A feature gate or cross network mixes request and item columns before any linear layer:
        # the front is assembled per candidate and no layer is split.
        self.interacts = model.interacts
        self.bottom_rest: nn.Sequential
        if self.interacts:
            self.bottom_rest = model.bottom
            self.first = None
        elif linears:  # the bottom's first layer takes the split; the rest runs per candidate
            self.first = SplitLinear(linears[0].weight, linears[0].bias, sides["request"].columns,
                                     sides["item"].columns)
            self.bottom_rest = nn.Sequential(*list(model.bottom)[1:])
        else:
            self.bottom_rest = nn.Sequential()
            self.first = None
            if self.mmoe is not None:  # no bottom: experts' first layer and gates take the split
                req, item = sides["request"].columns, sides["item"].columns
                if self.mmoe.may_sparse:  # gates first, then the experts' first layer, all rows or routed ones
                    self.gate_split = SplitLinear(self.mmoe.gate_weight, self.mmoe.gate_bias, req, item)
                    self.expert_split = SplitLinear(self.mmoe.expert_weight, self.mmoe.expert_bias, req, item)
                else:  # the dense softmax: experts' first layer and gates in one matrix
                    self.after_bottom = SplitLinear(self.mmoe.first_weight, self.mmoe.first_bias, req, item)
        self.hash_at: tuple[str, int] | None = None  # (side, column of that side's ids) of hash routing's feature
        if isinstance(model, MMoE) and model.hash_feature is not None:
            side = plan.side(model.hash_feature)
            self.hash_at = (side, sides[side].singles.index(model.hash_feature))
        order = sides["request"].columns + sides["item"].columns
        self.register_buffer("to_config", torch.tensor(np.argsort(order), dtype=torch.long))

    def route_ids(self, ids_r: torch.Tensor, ids_i: torch.Tensor, owner: torch.Tensor) -> torch.Tensor | None:
        """Hash routing's ids, (N,): the hash feature's column of its side (request ids once per candidate)."""
        if self.hash_at is None:
            return None
        side, col = self.hash_at
        return ids_r[:, col].index_select(0, owner) if side == "request" else ids_i[:, col]

    @torch.inference_mode()
    def score(self, batch: EncodedBatch) -> torch.Tensor:
        """Encoded requests -> (T, N) scores: probabilities (binary tasks) or predictions."""
        inputs = self.inputs(batch)
        if self._compiled is not None:
            return self._compiled(*inputs)  # the package computes the scores, sigmoid included
        return self.scores(*inputs)

    def scores(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The tensors of :meth:`inputs` -> (T, N) scores: what :meth:`compile` exports."""
        logits = self(*inputs)
        return torch.where(self.binary, torch.sigmoid(logits), logits)

    def compile(self, example: EncodedBatch, package: Path) -> None:
        """Score through an AOTInductor package from now on: the network compiled ahead of time.

        Exports :meth:`scores` with every batch dimension dynamic (requests, candidates, list
        entries), compiles it to ``package`` with AOTInductor unless that file exists (so several
        processes and restarts compile once; the caller names the file after what it depends on),
        and loads it. A compiled call runs one C++ function instead of some forty eager operators:
        on the 2-core box a one-candidate forward of the default model takes about 0.11 ms instead
        of 0.25 ms. Takes 15-50 s without the file; needs a C++ compiler. Check the result against
        eager (:meth:`uncompile` is the fallback).

        Args:
            example: a batch of at least two requests, each with at least two candidates and list
                entries, so that no dimension is specialised to 0 or 1.
            package: the ``.pt2`` file to write or reuse.
        """
        from torch._inductor import aoti_compile_and_package, aoti_load_package  # Inductor loads slowly: on use

        if not package.is_file():
            tmp = package.with_name(f"{package.stem}.{os.getpid()}.tmp.pt2")  # AOTInductor wants .pt2
            with _quiet_export():
                aoti_compile_and_package(self.export(example), package_path=str(tmp))
            os.replace(tmp, package)
        self._compiled = aoti_load_package(str(package))

    def export(self, example: EncodedBatch) -> torch.export.ExportedProgram:
        """:meth:`scores` as a ``torch.export`` program with every batch dimension dynamic (see :meth:`compile`)."""
        args = self.inputs(example)
        dims = tuple({0: torch.export.Dim.DYNAMIC} if a.dim() == 1 or a.shape[1] > 0 else {} for a in args)
        with _quiet_export(), torch.inference_mode():
            return torch.export.export(_Scores(self), args, dynamic_shapes=(dims,))

    def uncompile(self) -> None:
        self._compiled = None

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def inputs(self, batch: EncodedBatch) -> tuple[torch.Tensor, ...]:
        """EncodedBatch (numpy) -> the forward's tensors, without copies where numpy allows."""
        owner = torch.from_numpy(np.repeat(np.arange(len(batch.sizes)), batch.sizes))  # (N,)
        out: list[torch.Tensor] = [owner]
        for front, ids_by_name, dense, n in (
            (self.front_r, batch.request_ids, batch.request_dense, len(batch.sizes)),
            (self.front_i, batch.item_ids, batch.item_dense, batch.n_candidates),
        ):
            ids = (np.stack([ids_by_name[f] for f in front.singles], axis=1) if front.singles
                   else np.zeros((n, 0), np.int64))  # (n, F_side)
            out += [torch.from_numpy(ids), torch.from_numpy(dense)]
            for f in front.lists:
                j = batch.lists[f]
                out += [torch.from_numpy(j.values), torch.from_numpy(j.offsets()[:-1])]
        return tuple(out)

    def forward(self, owner: torch.Tensor, *parts: torch.Tensor) -> torch.Tensor:
        """The tensors of :meth:`inputs` -> (T, N) logits."""
        n_lists_r = len(self.front_r.lists)
        ids_r, dense_r = parts[0], parts[1]
        lists_r = [(parts[2 + 2 * k], parts[3 + 2 * k]) for k in range(n_lists_r)]
        rest = parts[2 + 2 * n_lists_r:]
        ids_i, dense_i = rest[0], rest[1]
        lists_i = [(rest[2 + 2 * k], rest[3 + 2 * k]) for k in range(len(self.front_i.lists))]
        x_r = self.front_r(ids_r, lists_r, dense_r)  # (R, D_r)
        x_i = self.front_i(ids_i, lists_i, dense_i)  # (N, D_i)
        x: torch.Tensor | None
        if self.interacts:  # the whole front per candidate, through the gate / cross network and the bottom
            x = self.bottom_rest(self.model.interact(self._front(x_r, x_i, owner)))  # (N, D)
        elif self.first is not None:
            x = self.bottom_rest(self.first(x_r, x_i, owner))  # (N, D); bottom_rest starts with its ReLU
        else:
            x = None if self.mmoe is not None else self._front(x_r, x_i, owner)  # None: MMoE splits its first layer
        if self.mmoe is not None:
            return self._mmoe(self.mmoe, x, x_r, x_i, owner, self.route_ids(ids_r, ids_i, owner))
        assert x is not None
        out = self.model.head(x, None).logits
        return torch.stack([out[t] for t in self.tasks])  # (T, N)

    def _front(self, x_r: torch.Tensor, x_i: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """The whole front per candidate, in config order: (N, D)."""
        return torch.cat([x_r.index_select(0, owner), x_i], dim=1).index_select(1, self.to_config)

    def _mmoe(self, mmoe: MMoEHead, x: torch.Tensor | None, x_r: torch.Tensor, x_i: torch.Tensor,
              owner: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """The MMoE head on the bottom's output ``x``, or, without a bottom (``None``), on the split front.

        A routed mixture (zeros in its weights) computes the gates first and then either every
        expert on every row or each expert on its rows only (:meth:`MMoEHead.use_sparse`); the
        dense softmax keeps the one fused matmul of experts and gates.
        """
        n_requests = x_r.shape[0]
        if not mmoe.may_sparse:
            h = F.linear(x, mmoe.first_weight, mmoe.first_bias) if x is not None \
                else cast(SplitLinear, self.after_bottom)(x_r, x_i, owner)
            return cast(torch.Tensor, mmoe(h, owner, n_requests, ids))
        gates = F.linear(x, mmoe.gate_weight, mmoe.gate_bias) if x is not None else self.gate_split(x_r, x_i, owner)
        g = mmoe.weights(gates, owner, n_requests, ids)  # (N, T, E)
        if mmoe.use_sparse(g):
            if x is not None:
                return mmoe.sparse(x, g)
            return mmoe.sparse_split(x_r, x_i, self.expert_split, owner, g)
        h = F.linear(x, mmoe.expert_weight, mmoe.expert_bias) if x is not None else self.expert_split(x_r, x_i, owner)
        return mmoe.dense(h, g)
