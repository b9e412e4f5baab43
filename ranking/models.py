"""The model family: one shared front and output assembly, five ways of mixing in between.

Every model maps ``(sparse, dense, position)`` to a :class:`ModelOutput`::

    TorchRec embeddings ++ dense -> shared bottom (optional) -> MIXING -> one tower per task
                                                                          (+ position bias, training)

and differs only in MIXING, which turns the front's (B, D) into each task's tower input (B, T, De):

- ``single_task``: one bottom + expert-sized MLP per task; tasks share only the embedding tables;
- ``shared_bottom``: one shared MLP for all tasks (an MMoE with a single expert and no gate);
- ``omoe``: E experts, ONE gate shared by every task;
- ``mmoe`` (in ``ranking.mmoe``): E experts, one gate per task (Ma et al., KDD 2018);
- ``ple``: Progressive Layered Extraction (Tang et al., RecSys 2020); one level is CGC.

Shape letters: B batch, T tasks, E experts (per gate), D front width, De expert / tower-input width.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from ranking.blocks import MLP, Experts, FeatureGate, PositionBiasTower, Tower, cross_network
from ranking.config import ModelConfig
from ranking.gating import Gate, load_balance_loss, mix_experts


@dataclass
class ModelOutput:
    """What a ranking model returns: predictions plus what auxiliary losses and gate health need.

    Attributes:
        logits: task name -> (B,) logits (binary tasks) or predictions (regression tasks).
        gates: (B, T, E) gate weights per task, rows summing to 1 (expert choice: what the
            experts that took the row give it, 0 when none did); None for models without gates.
            OMoE repeats its one gate for every task; PLE gives the last level's task gates over
            [the task's own experts, then the shared experts].
        aux: unweighted auxiliary losses (scalars), e.g. ``"load_balance"`` when the config's
            ``load_balance_weight > 0`` and ``"router_z"`` (MMoE, ``gate.z_loss_weight > 0``); the
            trainer weighs and adds them.
    """

    logits: dict[str, torch.Tensor]
    gates: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


#: The single-lookup fast path stacks every table on each step: worth it for small tables only
#: (census-size vocabularies); above this many weights in all, the per-table lookup is cheaper.
SINGLE_LOOKUP_MAX_ELEMENTS = 1 << 22


class RankingModel(nn.Module):
    """Base of every variant: the shared front (``embed``) and the output assembly (``predict``).

    Subclasses build their mixing modules in ``build_mixing`` and write ``forward`` as
    ``embed -> mix -> predict``. Modules are created in state_dict order (front, mixing, towers,
    position tower) so that MMoE's keys and seeded initialisation match earlier releases; the
    attribute names are part of the saved keys, keep them.

    Args:
        config: the model config (tables, dense inputs, tasks, widths, gating).
    """

    #: build ``config.bottom_dims`` as a shared bottom; ``SingleTask`` gives each task its own instead.
    shared_bottom: ClassVar[bool] = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.task_names = [t.name for t in config.tasks]
        self.sparse_names = [s.name for s in config.sparse]  # the embedding order the bottom layer expects
        self.engagement = [t.name for t in config.tasks if t.group == "engagement"]
        self.embeddings = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=f"t_{s.name}",
                    embedding_dim=s.embedding_dim,
                    num_embeddings=s.num_embeddings,
                    feature_names=[s.name],
                    pooling=PoolingType.MEAN if s.pooling == "mean" else PoolingType.SUM,
                )
                for s in config.sparse
            ],
            device=torch.device("cpu"),
        )
        # First row of each table in the tables stacked row-wise (``lookup_single``); None when the
        # fast path cannot apply. Not persistent: the state_dict keeps its per-table layout.
        single = bool(config.sparse) and not any(s.multi for s in config.sparse)
        same_width = len({s.embedding_dim for s in config.sparse}) == 1
        starts = [0, *itertools.accumulate(s.num_embeddings for s in config.sparse)][:-1]
        small = sum(s.num_embeddings * s.embedding_dim for s in config.sparse) <= SINGLE_LOOKUP_MAX_ELEMENTS
        fast = single and same_width and small
        self.single_rows: torch.Tensor | None
        self.single_sizes: torch.Tensor | None  # rows per table: an id outside its table takes the general path
        self.register_buffer("single_rows", torch.tensor(starts) if fast else None, persistent=False)
        self.register_buffer(
            "single_sizes", torch.tensor([s.num_embeddings for s in config.sparse]) if fast else None, persistent=False
        )
        in_dim = sum(s.embedding_dim for s in config.sparse) + len(config.dense)
        # Optional interactions on the front, before the bottom: built only when asked, so a model
        # without them keeps its keys and seeded initialisation.
        widths = [s.embedding_dim for s in config.sparse] + [1] * len(config.dense)
        self.feature_gate = FeatureGate(widths, config.feature_gate_dim) if config.feature_gate_dim else None
        self.cross = (cross_network(in_dim, config.cross_layers, config.cross_rank, config.cross_experts)
                      if config.cross_layers else None)
        self.bottom = MLP(in_dim, config.bottom_dims if self.shared_bottom else (), config.dropout)
        self.build_mixing(config)
        self.towers = nn.ModuleDict(
            {t: Tower(config.expert_dims[-1], config.tower_dims, config.dropout, config.tower_norm)
             for t in self.task_names}
        )
        self.position_tower = (
            PositionBiasTower(config.position_buckets, config.position_dropout)
            if config.position_buckets > 0
            else None
        )

    def build_mixing(self, config: ModelConfig) -> None:
        """Create the variant's modules between the front (width ``self.width``) and the towers."""
        raise NotImplementedError

    def forward(
        self, sparse: KeyedJaggedTensor, dense: torch.Tensor, position: torch.Tensor | None = None
    ) -> ModelOutput:
        """embed -> head: ids and dense features of B rows -> predictions."""
        return self.head(self.embed(sparse, dense), position)  # (B, D) -> logits per task

    def head(self, x: torch.Tensor, position: torch.Tensor | None = None) -> ModelOutput:
        """The variant's mixing, towers and position bias on the front's output ``x`` (B, D).

        Split from ``forward`` so that a serving module (``ranking.fused``) can compute the front
        its own way (request-side embeddings once per request) and reuse the rest as it is.
        """
        raise NotImplementedError

    @property
    def width(self) -> int:
        """D, the width of what ``embed`` returns (the mixing part's input)."""
        return self.bottom.out_dim

    def embed(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        """Pooled embeddings ++ dense features through the shared bottom: (B, D)."""
        if not self.sparse_names:  # dense-only model: TorchRec cannot pool a collection without tables
            emb = dense.new_zeros(dense.shape[0], 0)
        else:
            single = self.lookup_single(sparse)
            emb = single if single is not None else self.lookup_pooled(sparse)
        out: torch.Tensor = self.bottom(self.interact(torch.cat([emb, dense], dim=1)))  # (B, D)
        return out

    @property
    def interacts(self) -> bool:
        """Whether the front passes a feature gate or a cross network before the bottom."""
        return self.feature_gate is not None or self.cross is not None

    def interact(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings ++ dense (B, D0) through the feature gate and the cross network, where built."""
        if self.feature_gate is not None:
            x = self.feature_gate(x)
        if self.cross is not None:
            x = self.cross(x)
        return x

    def lookup_single(self, sparse: KeyedJaggedTensor) -> torch.Tensor | None:
        """Fast path: every feature has exactly one id per row -> one gather, (B, F * De); else None.

        With one id per bag, sum and mean pooling both return that id's row, so the F per-table
        lookups of ``EmbeddingBagCollection`` (and their F backward passes) collapse into one
        gather over the tables stacked row-wise: same values, same gradients, same
        parameters. Taken only for a plain (unsharded) collection whose tables share one width,
        an unweighted batch with keys in config order, all lengths 1 and every id inside its
        table; None otherwise.
        """
        if (
            self.single_rows is None
            or self.single_sizes is None
            or type(self.embeddings) is not EmbeddingBagCollection
            or sparse.keys() != self.sparse_names
            or sparse.weights_or_none() is not None
        ):
            return None
        lengths, b = sparse.lengths(), sparse.stride()
        if lengths.numel() != len(self.sparse_names) * b or not bool((lengths == 1).all()):
            return None
        ids = sparse.values().view(-1, b)  # (F, B), key-major
        if not bool(((ids >= 0) & (ids < self.single_sizes.unsqueeze(1))).all()):
            return None  # would read a neighbouring table; the collection raises its own error instead
        bags = self.embeddings.embedding_bags
        table = torch.cat([bags[f"t_{n}"].weight for n in self.sparse_names])  # (sum of rows, De)
        rows = ids + self.single_rows.unsqueeze(1)  # (F, B) rows of the stacked table
        # index_select, not F.embedding: its backward is one index_add, no sort of the B * F ids.
        return table.index_select(0, rows.t().flatten()).view(b, -1)  # (B * F, De) -> (B, F * De), config order

    def lookup_pooled(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """The general path: pooled embeddings of any KeyedJaggedTensor, (B, sum of De)."""
        pooled = self.embeddings(sparse)  # KeyedTensor
        if pooled.keys() == self.sparse_names:
            emb: torch.Tensor = pooled.values()  # (B, sum of embedding dims), already in config order
        else:  # a sharded collection groups its outputs by shard: put them back in config order
            per_feature = pooled.to_dict()
            emb = torch.cat([per_feature[n] for n in self.sparse_names], dim=1)
        return emb

    def predict(
        self,
        task_inputs: torch.Tensor,
        position: torch.Tensor | None,
        gates: torch.Tensor | None = None,
        routing: Sequence[torch.Tensor] = (),
    ) -> ModelOutput:
        """Towers, position bias and auxiliary losses: the part every variant ends with.

        Args:
            task_inputs: (B, T, De) each task's tower input, tasks in config order.
            position: (B,) display positions in training, None at serving.
            gates: (B, T, E) weights to report (gate health), or None.
            routing: every gate's weights, (B, E) or (B, T, E), for the load-balancing loss.
        """
        logits = {t: self.towers[t](task_inputs[:, i]) for i, t in enumerate(self.task_names)}  # t -> (B,)
        # Serving passes no position: the bias tower then drops out of the prediction entirely.
        if position is not None and self.position_tower is not None:
            bias = self.position_tower(position)  # (B,)
            logits = {t: (x + bias if t in self.engagement else x) for t, x in logits.items()}
        aux: dict[str, torch.Tensor] = {}
        if self.config.load_balance_weight > 0 and routing:
            aux["load_balance"] = torch.stack([load_balance_loss(w) for w in routing]).mean()
        return ModelOutput(logits=logits, gates=gates, aux=aux)

    def set_top_k(self, k: int) -> None:
        """Make every gate keep only its ``k`` largest weights (e.g. fewer experts at inference).

        Works without retraining; not written to the config, so re-apply it after loading.

        Raises:
            ValueError: the model has no gates, or ``k`` is outside [1, E] for one of its gates.
        """
        gates = [m for m in self.modules() if isinstance(m, Gate)]
        if not gates:
            raise ValueError(f"model {self.config.model!r} has no gates; set_top_k needs omoe, mmoe or ple")
        limit = min(g.num_experts for g in gates)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limit:
            raise ValueError(f"top_k must be an integer in [1, {limit}] (experts of the smallest gate), got {k!r}")
        for g in gates:
            g.set_top_k(k)


class SingleTask(RankingModel):
    """One independent network per task (bottom + expert-sized MLP + tower) on shared embedding tables.

    Task A's loss reaches only A's network and the embedding tables, never B's dense layers.

    Example:
        >>> from ranking.config import SparseSlot, TaskHead
        >>> cfg = ModelConfig(sparse=(SparseSlot("user", 10, 4),), dense=("x",), model="single_task",
        ...                   tasks=(TaskHead("click", "binary", "engagement"),), bottom_dims=(8,),
        ...                   expert_dims=(8,), tower_dims=(4,))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user"], torch.tensor([1, 2]), torch.tensor([1, 1]))
        >>> out = SingleTask(cfg)(kjt, torch.zeros(2, 1))
        >>> out.logits["click"].shape, out.gates
        (torch.Size([2]), None)
    """

    shared_bottom = False

    def build_mixing(self, config: ModelConfig) -> None:
        dims = (*config.bottom_dims, *config.expert_dims)
        self.task_nets = nn.ModuleDict({t: MLP(self.width, dims, config.dropout) for t in self.task_names})

    def head(self, x: torch.Tensor, position: torch.Tensor | None = None) -> ModelOutput:
        """The front's (B, D) -> predictions; x is embeddings ++ dense, with no shared layer."""
        per_task = torch.stack([net(x) for net in self.task_nets.values()], dim=1)  # (B, T, De)
        return self.predict(per_task, position)


class SharedBottom(RankingModel):
    """Hard parameter sharing: one MLP (``expert_dims``) for all tasks on top of the shared bottom.

    Example:
        >>> from ranking.config import SparseSlot, TaskHead
        >>> cfg = ModelConfig(sparse=(SparseSlot("user", 10, 4),), dense=("x",), model="shared_bottom",
        ...                   tasks=(TaskHead("click", "binary", "engagement"),), bottom_dims=(8,),
        ...                   expert_dims=(8,), tower_dims=(4,))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user"], torch.tensor([1, 2]), torch.tensor([1, 1]))
        >>> SharedBottom(cfg)(kjt, torch.zeros(2, 1)).logits["click"].shape
        torch.Size([2])
    """

    def build_mixing(self, config: ModelConfig) -> None:
        self.shared = MLP(self.width, config.expert_dims, config.dropout)

    def head(self, x: torch.Tensor, position: torch.Tensor | None = None) -> ModelOutput:
        """The front's (B, D) -> predictions."""
        h = self.shared(x)  # (B, De)
        per_task = h.unsqueeze(1).expand(-1, len(self.task_names), -1)  # (B, T, De): same input to every tower
        return self.predict(per_task, position)


class OMoE(RankingModel):
    """One-gate Mixture-of-Experts: E experts and a single gate whose mixture every tower reads.

    ``gates`` in the output repeats the one gate for every task: (B, T, E).

    Example:
        >>> from ranking.config import SparseSlot, TaskHead
        >>> cfg = ModelConfig(sparse=(SparseSlot("user", 10, 4),), dense=("x",), model="omoe",
        ...                   tasks=(TaskHead("click", "binary", "engagement"),
        ...                          TaskHead("like", "binary", "satisfaction")),
        ...                   bottom_dims=(8,), expert_dims=(8,), tower_dims=(4,), num_experts=3)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user"], torch.tensor([1, 2]), torch.tensor([1, 1]))
        >>> OMoE(cfg)(kjt, torch.zeros(2, 1)).gates.shape
        torch.Size([2, 2, 3])
    """

    def build_mixing(self, config: ModelConfig) -> None:
        self.experts = Experts(self.width, config.expert_dims, config.num_experts, config.dropout,
                               config.expert_activation, config.expert_norm)
        self.gate = Gate(self.width, config.num_experts, config.gate)

    def head(self, x: torch.Tensor, position: torch.Tensor | None = None) -> ModelOutput:
        """The front's (B, D) -> predictions."""
        experts = self.experts(x)  # (B, E, De)
        gate = self.gate(x)  # (B, E)
        gates = gate.unsqueeze(1).expand(-1, len(self.task_names), -1)  # (B, T, E): one gate, every task
        return self.predict(mix_experts(gates, experts), position, gates, routing=[gate])


@dataclass
class LevelOutput:
    """What one PLE level hands on: task and shared outputs, and its gate weights."""

    tasks: torch.Tensor  # (B, T, De) each task's mixture
    shared: torch.Tensor | None  # (B, De) the shared mixture; None on the last level
    task_gates: torch.Tensor  # (B, T, Et + Es) over [task's own experts, shared experts]
    shared_gate: torch.Tensor | None  # (B, T * Et + Es) over [task 0's, ..., task T-1's, shared experts]


class ExtractionLevel(nn.Module):
    """One PLE level: per-task experts plus shared experts, one gate per task (+ a shared gate).

    Task t's gate, fed task t's input, mixes [t's own Et experts, the Es shared experts]. With
    ``shared_gate`` (every level but the last), a shared gate fed the shared input mixes all
    T * Et + Es experts into the next level's shared input. A lone last level is CGC.

    Args:
        in_dim: input width (D on the first level, De after).
        config: expert counts and widths, gating.
        shared_gate: build the shared gate (False on the last level, whose shared output is unused).

    Example:
        >>> from ranking.config import SparseSlot, TaskHead
        >>> cfg = ModelConfig(sparse=(), dense=("x",), tasks=(TaskHead("a", "binary", "engagement"),
        ...                   TaskHead("b", "binary", "engagement")), model="ple", expert_dims=(4,),
        ...                   num_task_experts=1, num_shared_experts=2)
        >>> out = ExtractionLevel(6, cfg, shared_gate=True)(torch.zeros(5, 2, 6), torch.zeros(5, 6))
        >>> out.tasks.shape, out.shared.shape, out.task_gates.shape, out.shared_gate.shape
        (torch.Size([5, 2, 4]), torch.Size([5, 4]), torch.Size([5, 2, 3]), torch.Size([5, 4]))
    """

    def __init__(self, in_dim: int, config: ModelConfig, shared_gate: bool) -> None:
        super().__init__()
        n_tasks, own, shared = len(config.tasks), config.num_task_experts, config.num_shared_experts
        self.task_experts = nn.ModuleList(
            Experts(in_dim, config.expert_dims, own, config.dropout, config.expert_activation, config.expert_norm)
            for _ in range(n_tasks)
        )
        self.shared_experts = Experts(in_dim, config.expert_dims, shared, config.dropout, config.expert_activation,
                                      config.expert_norm)
        self.task_gates = nn.ModuleList(Gate(in_dim, own + shared, config.gate) for _ in range(n_tasks))
        self.shared_gate = Gate(in_dim, n_tasks * own + shared, config.gate) if shared_gate else None

    def forward(self, task_inputs: torch.Tensor, shared_input: torch.Tensor) -> LevelOutput:
        """task_inputs: (B, T, D_in), shared_input: (B, D_in)."""
        n_tasks = task_inputs.shape[1]
        own = torch.stack([e(task_inputs[:, t]) for t, e in enumerate(self.task_experts)], dim=1)  # (B, T, Et, De)
        shared = self.shared_experts(shared_input)  # (B, Es, De)
        pools = torch.cat([own, shared.unsqueeze(1).expand(-1, n_tasks, -1, -1)], dim=2)  # (B, T, Et + Es, De)
        gates = torch.stack([g(task_inputs[:, t]) for t, g in enumerate(self.task_gates)], dim=1)  # (B, T, Et + Es)
        tasks = torch.einsum("bte,bted->btd", gates.to(pools.dtype), pools)  # (B, T, De)
        if self.shared_gate is None:
            return LevelOutput(tasks, None, gates, None)
        everything = torch.cat([own.flatten(1, 2), shared], dim=1)  # (B, T * Et + Es, De)
        shared_w = self.shared_gate(shared_input)  # (B, T * Et + Es)
        mixed = mix_experts(shared_w.unsqueeze(1), everything).squeeze(1)  # (B, De)
        return LevelOutput(tasks, mixed, gates, shared_w)


class PLE(RankingModel):
    """Progressive Layered Extraction (Tang et al., RecSys 2020); ``ple_levels=1`` is CGC.

    ``gates`` in the output are the last level's task gates, (B, T, Et + Es), experts ordered
    [the task's own ``num_task_experts``, then the ``num_shared_experts`` shared ones].

    Example:
        >>> from ranking.config import SparseSlot, TaskHead
        >>> cfg = ModelConfig(sparse=(SparseSlot("user", 10, 4),), dense=("x",), model="ple",
        ...                   tasks=(TaskHead("click", "binary", "engagement"),
        ...                          TaskHead("like", "binary", "satisfaction")),
        ...                   bottom_dims=(8,), expert_dims=(8,), tower_dims=(4,),
        ...                   num_task_experts=1, num_shared_experts=2, ple_levels=2)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user"], torch.tensor([1, 2]), torch.tensor([1, 1]))
        >>> PLE(cfg)(kjt, torch.zeros(2, 1)).gates.shape
        torch.Size([2, 2, 3])
    """

    def build_mixing(self, config: ModelConfig) -> None:
        widths = [self.width] + [config.expert_dims[-1]] * (config.ple_levels - 1)
        last = config.ple_levels - 1
        self.levels = nn.ModuleList(
            ExtractionLevel(w, config, shared_gate=i < last) for i, w in enumerate(widths)
        )

    def head(self, x: torch.Tensor, position: torch.Tensor | None = None) -> ModelOutput:
        """The front's (B, D) -> predictions."""
        tasks, shared = x.unsqueeze(1).expand(-1, len(self.task_names), -1), x  # (B, T, D), (B, D)
        routing: list[torch.Tensor] = []
        for level in self.levels:
            out = level(tasks, shared)
            tasks = out.tasks  # (B, T, De)
            shared = out.shared if out.shared is not None else shared  # (B, De); the last level has none
            routing += [g for g in (out.task_gates, out.shared_gate) if g is not None]
        return self.predict(tasks, position, out.task_gates, routing)
