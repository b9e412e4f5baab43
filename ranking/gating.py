"""Gates of a mixture of experts and their routing strategies (``GateConfig.kind``).

A gate maps its input (B, D) to weights (B, E) that sum to 1 along E:

- dense softmax (Ma et al., KDD 2018): ``softmax(x W)``;
- noisy top-k (Shazeer et al., ICLR 2017): in training, add Gaussian noise whose per-expert std
  ``softplus(x W_noise)`` is learned; keep the k largest logits, softmax over them, zeros elsewhere.
  ``k`` can be lowered after training (``Gate.set_top_k``) to make inference cheaper;
- top-p (dynamic k): per row the fewest experts whose softmax weights reach p (within
  ``[min_experts, max_experts]``), renormalised;
- gate dropout (Zhao et al., RecSys 2019): in training, zero each expert's weight with probability
  p and renormalise, so no task leans on one expert (gate polarization).

Routing over MMoE's task gates together (:class:`TaskGates`), each a pure function here so that the
serving network (``ranking.fused``) computes exactly the same weights:

- hash (:func:`hash_weights`): the expert fixed by a hash of an id, weight 1, no learned router;
- expert choice (:func:`expert_choice_weights`): each expert takes its best rows of a group, a
  fixed capacity per expert; a row no expert takes gets all-zero weights (its towers see a zero
  mixture); a group of one row is taken by every expert;
- task-shared top-k (:func:`shared_topk_weights`): one router picks k shared experts per row for
  every task; each task mixes those and its own private experts;
- the router z-loss (:func:`router_z_loss`, ST-MoE) keeps the router logits small.

Softmaxes run in float32 even under mixed precision. The model returns the weights; the
load-balancing loss below turns them into a scalar the trainer weighs and adds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from ranking.config import ROW_GATE_KINDS, GateConfig

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
        self.top_p: tuple[float, int, int] | None = (
            (config.top_p, config.min_experts, config.max_experts or num_experts) if config.kind == "top_p" else None
        )
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

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The router logits (B, E), float32, with the training noise of noisy top-k."""
        logits: torch.Tensor = self.proj(x).float()  # (B, E); float32 even under mixed precision
        if self.training and self.noise is not None:
            std = F.softplus(self.noise(x).float()) * self.noise_scale  # (B, E)
            logits = logits + torch.randn_like(logits) * std
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights(self.logits(x))

    def weights(self, logits: torch.Tensor) -> torch.Tensor:
        """Router logits (..., E) -> weights (..., E) by this gate's rule (top-k, top-p, dropout)."""
        if self.top_k is not None and self.top_k < self.num_experts:
            top = logits.topk(self.top_k, dim=-1)  # values, indices: (B, k)
            # -inf outside the top k: softmax gives exact zeros there and no gradient.
            logits = torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)  # (B, E)
        weights = torch.softmax(logits, dim=-1)  # (B, E)
        if self.top_p is not None:
            weights = top_p_weights(weights, *self.top_p)
        if self.training and self.dropout > 0:
            weights = drop_experts(weights, self.dropout)
        return weights


def top_p_weights(weights: torch.Tensor, p: float, min_experts: int = 1,
                  max_experts: int | None = None) -> torch.Tensor:
    """Per row the fewest largest weights whose sum reaches ``p`` (at least ``min_experts``, at most
    ``max_experts``), renormalised to sum 1; the rest exactly 0 (no gradient through them).

    Args:
        weights: (..., E) softmax weights.

    Example:
        >>> top_p_weights(torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]]), 0.75).tolist()
        [[0.625, 0.375, 0.0], [1.0, 0.0, 0.0]]
    """
    e = weights.shape[-1]
    hi = min(max_experts or e, e)
    sorted_w, order = weights.sort(dim=-1, descending=True)
    before = sorted_w.cumsum(dim=-1) - sorted_w  # (..., E) mass of the larger ones
    rank = torch.arange(e, device=weights.device)
    keep_sorted = ((before < p) | (rank < min_experts)) & (rank < hi)  # (..., E); the first always kept
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = weights * keep
    return kept / kept.sum(dim=-1, keepdim=True)


def hash_experts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The expert of each id: a fixed hash, ids (B,) int64 -> (B,) in [0, E).

    Two rounds of a multiplication modulo the prime 2^31 - 1 and a xor-shift: every product stays
    below 2^62 (no int64 overflow, so eager, exported and compiled code agree), neighbouring ids
    land on unrelated experts, and it is the same in every process and on every machine. Ids are
    the vocabulary indices the model reads.

    Example:
        >>> hash_experts(torch.arange(8), 4).tolist()
        [1, 0, 3, 0, 3, 2, 0, 2]
    """
    p = 2**31 - 1
    x = torch.remainder(ids.long() + 1, p)
    for mult in (48271, 1103515245):
        x = torch.remainder(x * mult, p)
        x = x ^ (x >> 13)
    return torch.remainder(x, num_experts)


def hash_weights(ids: torch.Tensor, num_experts: int, num_tasks: int) -> torch.Tensor:
    """Hash routing's weights: one-hot on :func:`hash_experts`, the same for every task: (B, T, E)."""
    one_hot = F.one_hot(hash_experts(ids, num_experts), num_experts).float()  # (B, E)
    return one_hot.unsqueeze(1).expand(-1, num_tasks, -1)


def expert_choice_weights(probs: torch.Tensor, top_k: int, capacity_factor: float,
                          groups: torch.Tensor | None = None, num_groups: int | None = None) -> torch.Tensor:
    """Expert choice: per group of rows, each expert keeps its ``C`` best rows, zeros elsewhere.

    ``C = ceil(capacity_factor * n * top_k / E)``, at least 1 and at most ``n``, for a group of n
    rows; so on average a row gets ``capacity_factor * top_k`` experts, some rows more, some none.
    A row no expert takes gets all-zero weights; a group of one row is taken by every expert (its
    weights are the dense softmax). Weights are the kept softmax probabilities, not renormalised
    (Zhou et al. 2022). Each row's result depends on its own group only; probabilities equal to
    2^-16 tie, and a tie goes to the earlier row.

    Args:
        probs: (B, T, E) softmax weights of every task gate (each (task, expert) column chooses).
        groups: (B,) int64 group of each row, rows of a group contiguous and groups numbered
            0, 1, ... in order (a serving batch's request index); None = one group.
        num_groups: how many groups there are (counted from ``groups`` when None); a group may
            be empty.

    Example:
        >>> p = torch.tensor([[[0.6, 0.4]], [[0.3, 0.7]], [[0.5, 0.5]], [[0.9, 0.1]]])  # (B=4, T=1, E=2)
        >>> (expert_choice_weights(p, 1, 1.0) > 0).squeeze(1).int().tolist()  # C = 2 rows per expert
        [[1, 0], [0, 1], [0, 1], [1, 0]]
    """
    b, t, e = probs.shape
    if b == 0:
        return probs
    if groups is None:
        groups = torch.zeros(b, dtype=torch.long, device=probs.device)
        num_groups = 1
    if num_groups is None:
        sizes = torch.bincount(groups)  # (G,)
    else:  # a known count keeps every shape static for torch.export
        sizes = torch.zeros(num_groups, dtype=torch.long, device=probs.device).index_add_(0, groups,
                                                                                         torch.ones_like(groups))
    start = torch.cumsum(sizes, 0) - sizes  # (G,)
    caps = torch.ceil(sizes.to(torch.float64) * (capacity_factor * top_k / e)).long().clamp(min=1)
    caps = torch.minimum(caps, sizes)  # (G,)
    flat = probs.reshape(b, t * e)  # (B, T * E)
    # Sort each column by (group, -prob): a row's rank within its group, per column.
    # Probabilities rounded to 2^-16 first: candidates equal up to float noise (the same request
    # computed in a batch of another size) tie, and ties go to the earlier row, so a row's choice
    # does not depend on what else the batch holds.
    p = torch.round(flat.to(torch.float64) * 65536.0)
    key = groups.unsqueeze(1).to(torch.float64) * 131072.0 - p  # p in [0, 65536]: groups never overlap
    order = key.argsort(dim=0, stable=True)  # (B, T * E)
    pos = torch.arange(b, device=probs.device).unsqueeze(1) - start[groups[order]]  # (B, T * E) rank in group
    rank = torch.empty_like(order).scatter_(0, order, pos)
    keep = rank < caps[groups].unsqueeze(1)
    return probs * keep.view(b, t, e)


def shared_topk_weights(task_logits: torch.Tensor, router_logits: torch.Tensor, top_k: int,
                        private: int) -> torch.Tensor:
    """A task-shared selection: ``top_k`` of the S shared experts per row, chosen once for all tasks
    by the router; each task's softmax over those and its own ``private`` experts.

    The chosen experts' router logits are added to every task's logits for them, so the router
    learns from every task through what it selected.

    Args:
        task_logits: (B, T, S + private) each task gate's logits over the shared experts, then its own.
        router_logits: (B, S).

    Returns:
        (B, T, S + T * private): columns are the S shared experts, then task 0's private
        experts, task 1's, ...; a task's weights are zero on the other tasks' private experts.

    Example:
        >>> w = shared_topk_weights(torch.zeros(2, 3, 5), torch.randn(2, 4), top_k=2, private=1)
        >>> w.shape, (w[:, :, :4] > 0).sum(-1).tolist(), (w > 0).sum(-1).tolist()
        (torch.Size([2, 3, 7]), [[2, 2, 2], [2, 2, 2]], [[3, 3, 3], [3, 3, 3]])
    """
    b, t, _ = task_logits.shape
    s = router_logits.shape[-1]
    top = router_logits.topk(min(top_k, s), dim=-1).indices  # (B, k), shared by every task
    chosen = torch.zeros_like(router_logits, dtype=torch.bool).scatter(-1, top, True)  # (B, S)
    shared = torch.where(chosen.unsqueeze(1), task_logits[..., :s] + router_logits.unsqueeze(1),
                         torch.full_like(task_logits[..., :s], float("-inf")))  # (B, T, S)
    w = torch.softmax(torch.cat([shared, task_logits[..., s:]], dim=-1), dim=-1)  # (B, T, S + P)
    out = w.new_zeros(b, t, s + t * private)
    out[..., :s] = w[..., :s]
    for task in range(t):
        out[:, task, s + task * private: s + (task + 1) * private] = w[:, task, s:]
    return out


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over rows of ``logsumexp(logits)²`` (float32 scalar).

    Example:
        >>> round(router_z_loss(torch.zeros(4, 2)).item(), 4)  # log(2)²
        0.4805
    """
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


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
    """MMoE's task gates over one pool of experts: (B, D) -> (B, T, E) weights, and the tasks' mixtures.

    The routing follows ``config.kind`` (see :class:`~ranking.config.GateConfig`): the row kinds
    (softmax, noisy top-k, top-p) run one :class:`Gate` per task; ``hash`` has no parameters and
    needs the rows' ids; ``expert_choice`` chooses within groups of rows (the batch, or what
    ``groups`` says); ``shared_topk`` adds a router (state_dict ``router.weight``) and each task
    gate spans the S shared experts and its own private ones (E = S + T * private columns).

    Its state_dict keys are the gates' (``<task>.proj.weight`` ...), tasks in the order given. While
    every gate is a plain softmax (no noise, no top-k, no gate dropout in training) the T gates run
    as one matmul with the softmax written out (``torch.softmax`` over a short last dim, E = 8,
    runs a slow CPU kernel, about 4x these three elementwise ops), and :meth:`mix` as T broadcast
    multiply-sums; otherwise each gate runs its own ``forward`` and the mixture is one einsum. Both
    ways give the same values up to float rounding (tests/ranking/test_fast_paths.py).

    Args:
        tasks: task names, in output order.
        in_dim: input width D.
        num_experts: the shared experts S (E without private experts).
        config: the routing (:class:`~ranking.config.GateConfig`); default dense softmax.

    Example:
        >>> gates = TaskGates(["click", "like"], in_dim=8, num_experts=3)
        >>> x, experts = torch.randn(5, 8), torch.randn(5, 3, 4)
        >>> w = gates(x)
        >>> w.shape, gates.mix(w, experts).shape
        (torch.Size([5, 2, 3]), torch.Size([5, 2, 4]))
    """

    def __init__(self, tasks: Sequence[str], in_dim: int, num_experts: int, config: GateConfig | None = None) -> None:
        config = config or GateConfig()
        if "router" in tasks:
            raise ValueError("a task may not be named 'router' (the name of the shared router's parameters)")
        kind = config.kind
        private = config.private_experts if kind == "shared_topk" else 0
        row = config if kind in ROW_GATE_KINDS else GateConfig()  # expert choice / shared: plain logits
        super().__init__({} if kind == "hash" else {t: Gate(in_dim, num_experts + private, row) for t in tasks})
        self.tasks = list(tasks)
        self.config = config
        self.kind = kind
        self.shared = num_experts
        self.num_experts = num_experts + private * len(self.tasks)  # E, the mixture's columns
        self.top_k = config.top_k  # expert choice, shared top-k; lowered by set_top_k
        self.router = nn.Linear(in_dim, num_experts) if kind == "shared_topk" else None

    @property
    def gates(self) -> list[Gate]:
        """The gates, in task order (none for hash routing)."""
        return [cast(Gate, self[t]) for t in self.tasks] if self.kind != "hash" else []

    @property
    def plain(self) -> bool:
        """Every gate is a dense softmax right now (the fast paths apply)."""
        return self.kind in ROW_GATE_KINDS and not any(
            g.noise is not None or g.top_k is not None or g.top_p is not None or (self.training and g.dropout > 0)
            for g in self.gates)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """All T plain softmax gates as one matmul: (B, D) -> (B, T, E), float32 (only while :attr:`plain`)."""
        return softmax_weights(self.logits(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every task gate's logits as one matmul (no noise): (B, D) -> (B, T, E_gate), float32."""
        gates = self.gates
        weight = torch.cat([g.proj.weight for g in gates])  # (T * E, D)
        bias = torch.cat([g.proj.bias for g in gates])  # (T * E,)
        return F.linear(x, weight, bias).view(x.shape[0], len(gates), -1).float()  # (B, T, E)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None,
                groups: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D) -> (B, T, E) weights, float32; see :meth:`route`."""
        return self.route(x, ids, groups)[0]

    def route(self, x: torch.Tensor, ids: torch.Tensor | None = None,
              groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weights (B, T, E) and, when ``z_loss_weight`` > 0, the router z-loss of this batch.

        Args:
            x: (B, D) the front's output.
            ids: (B,) int64 the rows' ids of the hash feature (hash routing only).
            groups: (B,) int64 expert choice's groups (see :func:`expert_choice_weights`); None = one.
        """
        z_wanted = self.config.z_loss_weight > 0
        if self.kind == "hash":
            if ids is None:
                raise ValueError("hash routing needs the rows' ids of its hash feature")
            return hash_weights(ids, self.num_experts, len(self.tasks)).to(x.device), None
        if self.kind == "expert_choice":
            logits = self.logits(x)
            w = expert_choice_weights(softmax_weights(logits), self.top_k, self.config.capacity_factor, groups)
            return w, router_z_loss(logits) if z_wanted else None
        if self.kind == "shared_topk":
            assert self.router is not None
            logits, router = self.logits(x), self.router(x).float()  # (B, T, S + P), (B, S)
            w = shared_topk_weights(logits, router, self.top_k, self.config.private_experts)
            z = (router_z_loss(logits) + router_z_loss(router)) / 2 if z_wanted else None
            return w, z
        if self.plain:
            logits = self.logits(x)
            return softmax_weights(logits), router_z_loss(logits) if z_wanted else None
        logits = torch.stack([g.logits(x) for g in self.gates], dim=1)  # (B, T, E), with noise in training
        w = torch.stack([g.weights(logits[:, i]) for i, g in enumerate(self.gates)], dim=1)
        return w, router_z_loss(logits) if z_wanted else None

    def set_top_k(self, k: int) -> None:
        """Fewer experts per row from now on: every gate's top-k (row kinds), the shared selection's k,
        or expert choice's capacity; hash routing has one expert per row already.

        Raises:
            ValueError: hash routing, or ``k`` outside [1, E] of what it limits.
        """
        if self.kind == "hash":
            raise ValueError("hash routing runs one expert per row; there is no k to lower")
        limit = self.shared if self.kind == "shared_topk" else self.num_experts
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limit:
            raise ValueError(f"top_k must be an integer in [1, {limit}], got {k!r}")
        if self.kind in ("expert_choice", "shared_topk"):
            self.top_k = k
            return
        for g in self.gates:
            g.set_top_k(k)

    def mix(self, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Each task's weighted sum of the experts' outputs: (B, T, E), (B, E, De) -> (B, T, De)."""
        return mix_per_task(weights, experts) if self.plain else mix_experts(weights, experts)


def softmax_weights(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim written out (max-shifted: no overflow); faster than the kernel for small E."""
    e = (logits - logits.amax(dim=-1, keepdim=True)).exp()
    return e / e.sum(dim=-1, keepdim=True)
