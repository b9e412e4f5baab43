"""Gate and routing health: are the experts used, how are rows routed, and on what do routers specialise?

Accumulates a model's final gate weights (B, T, E) over an evaluation pass and summarises them per
task, whatever the routing strategy: dense softmax, top-k / top-p (exact zeros), hash, expert
choice (a row no expert takes has all-zero weights) or a task-shared top-k whose E columns include
each task's private experts (:func:`task_experts` says which columns a task can reach).

Weights (``val/gate/...``): the mean weight of each expert, the mean entropy of each row's mixture,
near-dead experts (an expert no task gives more than ``dead_below`` of its weight) and a polarization
flag per task (its rows put more than ``polarized_above`` of their weight on one expert on average;
Zhao et al. 2019 report this failure and counter it with gate dropout). Entropy and top weight are
taken over served rows, each renormalised to sum to 1 (expert choice keeps unnormalised weights).

Routing (``val/routing/...``, keys in :meth:`GateHealth.metrics`): expert load as the share of rows
that give an expert a non-zero weight and importance as its share of the weight, the coefficient of
variation (std / mean over the experts a task reaches) of each, dropped rows (all-zero weights),
under-served rows (total weight below ``1 - 1e-4``, dropped ones included), the mean number of
experts per row, and a collapse flag (one expert takes more than ``collapsed_above`` of a task's
weight; for a hard router that is the share of rows it takes).

Specialisation: the mutual information, in nats, between the chosen expert (each row's argmax, per
task, over served rows) and (a) the task, pooled over tasks, (b) the item category, (c) a user
activity segment (:func:`routing_groups` picks the features), also normalised by the entropy of the
choice. The plug-in estimate is biased upward on a finite sample (about ``(K-1)(E-1) / 2N`` nats for
K values and N rows: 0.05 nats, 2.4% of log 8, for 2,000 rows, 30 categories, 8 experts), so what is
reported is the plug-in minus the mean over shuffled pairings (the same margins, the pairing
permuted: the exact chance level of this sample), floored at 0. A router is *specialised* on a
grouping when that corrected share reaches ``specialised_above`` (2% of the choice's entropy) and
the plug-in lies ``min_z`` (3) standard deviations of the shuffles above their mean. Rows are
treated as independent: a feature that is constant per user (a segment) against a router keyed on
the user has fewer effective samples than rows, which the share threshold, not the z test, absorbs.

Gate weights cannot show one failure: experts that are all the same function (constant or
copied initialisation; symmetric updates keep them equal, Adam's per-parameter scaling included).
:func:`expert_spread` measures that from the parameters, and :meth:`GateHealth.problems` turns
everything into readable findings.

Dimensions: B rows, T tasks, E experts (columns of the gate weights), K values of a grouping.

Example:
    >>> import torch
    >>> acc = GateStats(["click", "like"], num_experts=2)
    >>> acc.update(torch.tensor([[[0.5, 0.5], [1.0, 0.0]]]))
    >>> h = acc.compute()
    >>> h.polarized, [round(x, 3) for x in h.entropy], h.active_experts
    ([False, True], [0.693, 0.0], [2.0, 1.0])
    >>> h.problems()
    ['router of task like is collapsed: expert e0 takes 100% of its weight']
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from ranking.blocks import Experts
from ranking.config import ModelConfig, SparseSlot

# Feature names (of the spec, hence of the model config) that routing specialisation is measured
# against, in order of preference: the first single-valued one a model has is used. The bundled
# specs: synthetic has `category`; KuaiRand-Pure has `upload_type` (its `tag`, the content category,
# is not an input) and `user_active_degree`; census-income has neither (no items, no activity).
GROUP_FEATURES: dict[str, tuple[str, ...]] = {
    "category": ("category", "item_category", "upload_type"),
    "segment": ("user_segment", "activity_segment", "user_active_degree"),
}
MAX_GROUP_VALUES = 4096  # a grouping with a larger vocabulary is skipped (a (T, K, E) table per pass)
UNDERSERVED_BELOW = 1.0 - 1e-4  # a row whose weights sum to less is under-served


@dataclass(frozen=True)
class HealthConfig:
    """Thresholds of :class:`GateStats`; :meth:`GateHealth.problems` takes its own.

    Args:
        dead_below: an expert whose share of every task's weight is below this is near-dead;
            None means ``0.1 / E``.
        polarized_above: a task whose rows give, on average, more than this to their top expert.
        collapsed_above: a task whose top expert takes more than this share of its weight.
        specialised_above: normalised mutual information above chance that counts as specialised.
        min_z: and the plug-in must lie this many shuffle standard deviations above chance.
        shuffles: shuffled pairings that estimate chance (fixed seed: the same tables give the
            same result).
    """

    dead_below: float | None = None
    polarized_above: float = 0.9
    collapsed_above: float = 0.9
    specialised_above: float = 0.02
    min_z: float = 3.0
    shuffles: int = 16


@dataclass(frozen=True)
class Grouping:
    """A feature routing specialisation is measured against: ``name`` ("category") read from ``feature``."""

    name: str
    feature: str
    values: int  # K: ids lie in [0, K)


@dataclass(frozen=True)
class Dependence:
    """How much the chosen expert tells about a grouping (see the module docstring).

    Attributes:
        mi: nats above chance: ``plugin - chance``, floored at 0.
        plugin: the plug-in estimate, nats.
        chance: mean plug-in estimate over shuffled pairings, nats.
        normalised: ``mi`` over the entropy of the expert choice (0 when the choice is constant).
        z: ``(plugin - chance)`` in standard deviations of the shuffles.
        specialised: ``normalised >= specialised_above`` and ``z >= min_z``.
    """

    mi: float
    plugin: float
    chance: float
    normalised: float
    z: float
    specialised: bool


@dataclass(frozen=True)
class GateHealth:
    """What :meth:`GateStats.compute` found; lists are per task (T) or per task and expert (T, E)."""

    tasks: list[str]
    mean_weight: list[list[float]]  # (T, E) mean over all rows
    entropy: list[float]  # (T,) mean entropy of served rows' mixtures, nats; log(E) is uniform
    max_weight: list[float]  # (T,) mean over served rows of the largest (renormalised) weight
    dead_fraction: float  # share of experts below dead_below for every task
    polarized: list[bool]  # (T,)
    load: list[list[float]]  # (T, E) share of rows giving the expert a weight > 0
    importance: list[list[float]]  # (T, E) share of the task's weight
    load_cv: list[float]  # (T,) over the experts the task reaches
    importance_cv: list[float]  # (T,)
    dropped: list[float]  # (T,) share of rows with all-zero weights
    underserved: list[float]  # (T,) share with total weight < 1 - 1e-4, dropped rows included
    active_experts: list[float]  # (T,) mean experts with weight > 0 per row
    collapsed: list[bool]  # (T,)
    dense: list[bool]  # (T,) every row gives every reachable expert weight
    dead: list[int]  # near-dead experts
    task_mi: Dependence | None = None  # chosen expert vs task, pooled; None with one task
    group_mi: dict[str, list[Dependence]] = field(default_factory=dict)  # grouping -> (T,)
    group_choices: dict[str, torch.Tensor] = field(default_factory=dict)  # grouping -> (T, K, E) row counts
    specialised_above: float = HealthConfig.specialised_above
    expert_spread: float | None = None  # see expert_spread(); None when not measured or no expert pool

    def problems(self, min_spread: float = 1e-3, max_dead_fraction: float = 0.5,
                 max_dropped: float = 0.05) -> list[str]:
        """What is wrong with the mixture, one readable line per finding; empty when healthy.

        Findings: a collapsed router (one expert takes nearly all of a task's weight), a polarized
        dense gate (rows near one-hot though spread over experts; a hard router is one-hot by
        design), dropped rows above ``max_dropped``, near-dead experts, identical experts.

        Args:
            min_spread: experts closer than this (relative parameter distance) count as identical.
            max_dead_fraction: more near-dead experts than this share is a finding.
            max_dropped: a task that leaves more than this share of its rows without an expert.

        Example:
            >>> stats = GateStats(["click"], num_experts=4)
            >>> stats.update(torch.tensor([[[0.0, 0.0, 0.0, 0.0]], [[0.0, 1.0, 0.0, 0.0]]]))
            >>> stats.compute().problems()  # doctest: +NORMALIZE_WHITESPACE
            ['router of task click is collapsed: expert e1 takes 100% of its weight',
             'task click: 50.0% of rows get no expert (all-zero weights; above 5%)',
             '75% of experts are near-dead: e0, e2, e3']
        """
        found = []
        for t, task in enumerate(self.tasks):
            if self.collapsed[t]:
                top = max(range(len(self.importance[t])), key=self.importance[t].__getitem__)
                found.append(f"router of task {task} is collapsed: expert e{top} takes "
                             f"{self.importance[t][top]:.0%} of its weight")
            elif self.polarized[t] and self.dense[t]:
                found.append(f"gate of task {task} is polarized (mean top weight {self.max_weight[t]:.3f})")
            if self.dropped[t] > max_dropped:
                found.append(f"task {task}: {self.dropped[t]:.1%} of rows get no expert "
                             f"(all-zero weights; above {max_dropped:.0%})")
        if self.dead_fraction > max_dead_fraction:
            found.append(f"{self.dead_fraction:.0%} of experts are near-dead: {', '.join(f'e{e}' for e in self.dead)}")
        if self.expert_spread is not None and self.expert_spread < min_spread:
            found.append(f"experts are identical (spread {self.expert_spread:.3g})")
        return found

    def metrics(self, prefix: str) -> dict[str, float]:
        """Flat metric dict (flags as 0/1), ``<prefix>`` the split (``val``):

        - ``<prefix>/gate/dead_fraction``, ``<prefix>/gate/expert_spread`` (when measured);
        - ``<prefix>/gate/<task>/{entropy, polarized, expert_<e>}`` (``expert_<e>``: mean weight);
        - ``<prefix>/routing/<task>/{dropped, underserved, active_experts, load_cv, importance_cv,
          top_share, collapsed}`` (``top_share``: the top expert's share of the weight);
        - ``<prefix>/routing/<task>/expert_<e>/{load, importance}``;
        - ``<prefix>/routing/<task>/{mi_<g>, mi_<g>_norm, specialised_<g>}`` for each grouping g
          measured (``category``, ``segment``): nats above chance, its share of the choice's entropy;
        - ``<prefix>/routing/{mi_task, mi_task_norm, specialised_task}`` with two or more tasks.
        """
        out = {f"{prefix}/gate/dead_fraction": self.dead_fraction}
        if self.expert_spread is not None:
            out[f"{prefix}/gate/expert_spread"] = self.expert_spread
        for t, task in enumerate(self.tasks):
            out[f"{prefix}/gate/{task}/entropy"] = self.entropy[t]
            out[f"{prefix}/gate/{task}/polarized"] = float(self.polarized[t])
            for e, w in enumerate(self.mean_weight[t]):
                out[f"{prefix}/gate/{task}/expert_{e}"] = w
            r = f"{prefix}/routing/{task}"
            out |= {f"{r}/dropped": self.dropped[t], f"{r}/underserved": self.underserved[t],
                    f"{r}/active_experts": self.active_experts[t], f"{r}/load_cv": self.load_cv[t],
                    f"{r}/importance_cv": self.importance_cv[t], f"{r}/top_share": max(self.importance[t]),
                    f"{r}/collapsed": float(self.collapsed[t])}
            for e, (load, imp) in enumerate(zip(self.load[t], self.importance[t], strict=True)):
                out[f"{r}/expert_{e}/load"] = load
                out[f"{r}/expert_{e}/importance"] = imp
            for g, per_task in self.group_mi.items():
                out |= _dependence_metrics(f"{r}/", g, per_task[t])
        if self.task_mi is not None:
            out |= _dependence_metrics(f"{prefix}/routing/", "task", self.task_mi)
        return out


def _dependence_metrics(prefix: str, name: str, d: Dependence) -> dict[str, float]:
    return {f"{prefix}mi_{name}": d.mi, f"{prefix}mi_{name}_norm": d.normalised,
            f"{prefix}specialised_{name}": float(d.specialised)}


class GateStats:
    """Running sums of gate weights over batches; ``compute`` gives a :class:`GateHealth`.

    Args:
        tasks: task names, in the order of the gates' T axis.
        num_experts: E, the gate weights' last axis.
        config: thresholds (:class:`HealthConfig`).
        groupings: features to measure specialisation against; :meth:`update` then needs their ids.
        reachable: (T, E) bool, the experts each task's gate can weigh (:func:`task_experts`); all.
    """

    def __init__(self, tasks: Sequence[str], num_experts: int, config: HealthConfig | None = None,
                 groupings: Sequence[Grouping] = (), reachable: torch.Tensor | None = None) -> None:
        self.tasks = list(tasks)
        self.num_experts = num_experts
        self.config = config or HealthConfig()
        self.dead_below = self.config.dead_below if self.config.dead_below is not None else 0.1 / num_experts
        self.groupings = tuple(groupings)
        shape = (len(self.tasks), num_experts)
        self.reachable = torch.ones(shape, dtype=torch.bool) if reachable is None else reachable.bool().cpu()
        if self.reachable.shape != shape:
            raise ValueError(f"reachable must have shape {shape} (tasks, experts), got {tuple(self.reachable.shape)}")
        self.reset()

    @classmethod
    def for_model(cls, config: ModelConfig, num_experts: int, health: HealthConfig | None = None) -> GateStats:
        """Statistics for a model of ``config`` whose gates give E = ``num_experts`` columns, measured
        against the model's :func:`routing_groups`."""
        groupings = [Grouping(g, s.name, s.num_embeddings) for g, s in routing_groups(config).items()]
        return cls([t.name for t in config.tasks], num_experts, health, groupings, task_experts(config, num_experts))

    def reset(self) -> None:
        t, e = len(self.tasks), self.num_experts
        self.rows = 0
        self.weight_sum = torch.zeros(t, e, dtype=torch.float64)
        self.active_sum = torch.zeros(t, e, dtype=torch.float64)  # rows giving the expert weight > 0
        self.entropy_sum = torch.zeros(t, dtype=torch.float64)
        self.max_sum = torch.zeros(t, dtype=torch.float64)
        self.dropped = torch.zeros(t, dtype=torch.float64)
        self.underserved = torch.zeros(t, dtype=torch.float64)
        self.choices = torch.zeros(t, e, dtype=torch.int64)  # served rows whose argmax is the expert
        self.joint = {g.name: torch.zeros(t, g.values, e, dtype=torch.int64) for g in self.groupings}

    def ids_of(self, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Each grouping's (B,) ids from a batch's sparse features (single-valued: one id per row)."""
        return {g.name: sparse[g.feature].values() for g in self.groupings}

    @torch.no_grad()
    def update(self, gates: torch.Tensor, ids: Mapping[str, torch.Tensor] | None = None) -> None:
        """Add a batch.

        Args:
            gates: (B, T, E) weights; rows sum to 1, or less (expert choice), 0 for a dropped row.
            ids: grouping name -> (B,) int64 ids in [0, K) (:meth:`ids_of`); needed with groupings.
        """
        w = gates.detach().double().cpu()  # (B, T, E)
        b, t, e = w.shape
        if (t, e) != tuple(self.reachable.shape):
            raise ValueError(f"gates must be (B, {len(self.tasks)}, {self.num_experts}), got {tuple(w.shape)}")
        total = w.sum(dim=-1)  # (B, T)
        served = total > 0  # (B, T)
        self.rows += b
        self.weight_sum += w.sum(dim=0)  # (T, E)
        self.active_sum += (w > 0).sum(dim=0)
        self.dropped += (~served).sum(dim=0)
        self.underserved += (total < UNDERSERVED_BELOW).sum(dim=0)
        mix = w / total.clamp_min(1e-300).unsqueeze(-1)  # (B, T, E) each row's mixture, summing to 1
        entropy = -(mix * mix.clamp_min(1e-12).log()).sum(dim=-1)  # (B, T)
        self.entropy_sum += torch.where(served, entropy, 0.0).sum(dim=0)
        self.max_sum += torch.where(served, mix.amax(dim=-1), 0.0).sum(dim=0)
        chosen = w.argmax(dim=-1)  # (B, T)
        task = torch.arange(t).expand(b, t)  # (B, T)
        self.choices += torch.bincount((task * e + chosen)[served], minlength=t * e).view(t, e)
        for g in self.groupings:
            v = _group_ids(ids, g, b)  # (B,)
            flat = (task * g.values + v.unsqueeze(1)) * e + chosen  # (B, T) index of (task, value, expert)
            self.joint[g.name] += torch.bincount(flat[served], minlength=t * g.values * e).view(t, g.values, e)

    def compute(self, model: nn.Module | None = None) -> GateHealth:
        """The summary of what was accumulated; with ``model``, also its :func:`expert_spread`."""
        n = max(self.rows, 1)
        cfg = self.config
        served = (self.rows - self.dropped).clamp_min(1)  # (T,)
        mean = self.weight_sum / n  # (T, E)
        importance = self.weight_sum / self.weight_sum.sum(dim=-1, keepdim=True).clamp_min(1e-300)  # (T, E)
        load = self.active_sum / n  # (T, E)
        max_w = self.max_sum / served
        dead = ((importance < self.dead_below) | ~self.reachable).all(dim=0)  # (E,) for every task
        dense = [bool((load[i][self.reachable[i]] == 1.0).all()) for i in range(len(self.tasks))]
        gen = torch.Generator().manual_seed(0)
        task_mi = _dependence(self.choices, cfg, gen) if len(self.tasks) > 1 else None
        group_mi = {name: [_dependence(j[i], cfg, gen) for i in range(len(self.tasks))]
                    for name, j in self.joint.items()}
        return GateHealth(
            tasks=self.tasks,
            mean_weight=mean.tolist(),
            entropy=(self.entropy_sum / served).tolist(),
            max_weight=max_w.tolist(),
            dead_fraction=float(dead.double().mean()),
            polarized=(max_w > cfg.polarized_above).tolist(),
            expert_spread=expert_spread(model) if model is not None else None,
            load=load.tolist(),
            importance=importance.tolist(),
            load_cv=_cv(load, self.reachable),
            importance_cv=_cv(importance, self.reachable),
            dropped=(self.dropped / n).tolist(),
            underserved=(self.underserved / n).tolist(),
            active_experts=(self.active_sum.sum(dim=-1) / n).tolist(),
            collapsed=(importance.amax(dim=-1) > cfg.collapsed_above).tolist(),
            dense=dense,
            dead=dead.nonzero().flatten().tolist(),
            task_mi=task_mi,
            group_mi=group_mi,
            group_choices={name: j.clone() for name, j in self.joint.items()},
            specialised_above=cfg.specialised_above,
        )


def _group_ids(ids: Mapping[str, torch.Tensor] | None, g: Grouping, rows: int) -> torch.Tensor:
    v = None if ids is None else ids.get(g.name)
    if v is None:
        raise ValueError(f"update needs the ids of grouping {g.name!r} (feature {g.feature!r})")
    v = v.detach().cpu().long()
    if v.shape != (rows,):
        raise ValueError(f"grouping {g.name!r}: ids must be ({rows},), one per row, got {tuple(v.shape)}")
    if rows and (int(v.min()) < 0 or int(v.max()) >= g.values):
        raise ValueError(f"grouping {g.name!r}: ids must lie in [0, {g.values}), got {int(v.min())}..{int(v.max())}")
    return v


def _cv(x: torch.Tensor, reachable: torch.Tensor) -> list[float]:
    """(T, E) -> (T,) std / mean over each task's reachable experts (population std; 0 for a zero mean)."""
    out = []
    for row, keep in zip(x, reachable, strict=True):
        v = row[keep]
        m = float(v.mean()) if v.numel() else 0.0
        out.append(float(v.std(unbiased=False)) / m if m > 0 else 0.0)
    return out


def mutual_information(table: torch.Tensor) -> float:
    """Plug-in mutual information (nats) of a (K, E) contingency table of counts.

    Example:
        >>> round(mutual_information(torch.tensor([[5, 0], [0, 5]])), 4), mutual_information(torch.ones(3, 2))
        (0.6931, 0.0)
    """
    p = table.double() / max(float(table.sum()), 1.0)  # (K, E)
    outer = p.sum(dim=1, keepdim=True) * p.sum(dim=0, keepdim=True)  # (K, E)
    nz = p > 0
    return max(float((p[nz] * (p[nz].log() - outer[nz].log())).sum()), 0.0)


def _entropy(counts: torch.Tensor) -> float:
    p = counts.double()[counts > 0]
    p = p / p.sum()
    return float(-(p * p.log()).sum()) if p.numel() else 0.0


def _dependence(table: torch.Tensor, config: HealthConfig, generator: torch.Generator) -> Dependence:
    """Plug-in MI of a (K, E) table of counts, corrected by shuffled pairings with the same margins."""
    plugin = mutual_information(table)
    k, e = table.shape
    values = torch.repeat_interleave(torch.arange(k), table.sum(dim=1))  # (N,) one entry per row
    experts = torch.repeat_interleave(torch.arange(e), table.sum(dim=0))  # (N,)
    chance = []
    for _ in range(config.shuffles if values.numel() else 0):
        perm = torch.randperm(values.numel(), generator=generator)
        chance.append(mutual_information(torch.bincount(values * e + experts[perm], minlength=k * e).view(k, e)))
    draws = torch.tensor(chance or [0.0], dtype=torch.float64)
    mean, std = float(draws.mean()), float(draws.std()) if len(chance) > 1 else 0.0
    mi = max(plugin - mean, 0.0)
    h = _entropy(table.sum(dim=0))
    normalised = mi / h if h > 0 else 0.0
    z = (plugin - mean) / std if std > 0 else (math.inf if plugin > mean else 0.0)
    return Dependence(mi=mi, plugin=plugin, chance=mean, normalised=normalised, z=z,
                      specialised=normalised >= config.specialised_above and z >= config.min_z)


def routing_groups(config: ModelConfig) -> dict[str, SparseSlot]:
    """The features routing specialisation is measured against: grouping name -> sparse slot.

    For each grouping of :data:`GROUP_FEATURES` the first of its names that the config has as a
    single-valued feature of at most :data:`MAX_GROUP_VALUES` ids; a grouping none fits is left out.

    Example:
        >>> from ranking.config import TaskHead
        >>> cfg = ModelConfig(sparse=(SparseSlot("user_id", 100, 4), SparseSlot("category", 31, 4)),
        ...                   dense=(), tasks=(TaskHead("click", "binary", "engagement"),))
        >>> {g: s.name for g, s in routing_groups(cfg).items()}
        {'category': 'category'}
    """
    slots = {s.name: s for s in config.sparse if not s.multi and s.num_embeddings <= MAX_GROUP_VALUES}
    found = {}
    for group, names in GROUP_FEATURES.items():
        name = next((n for n in names if n in slots), None)
        if name is not None:
            found[group] = slots[name]
    return found


def task_experts(config: ModelConfig, num_experts: int) -> torch.Tensor:
    """(T, E) bool: the gate columns each task can weigh.

    All of them, except for an MMoE whose gates give more columns than its ``num_experts`` shared
    experts: the rest are the tasks' private experts, task 0's first, each task reaching only its own.

    Example:
        >>> from ranking.config import TaskHead
        >>> cfg = ModelConfig(sparse=(SparseSlot("u", 10, 4),), dense=(), num_experts=2,
        ...                   tasks=(TaskHead("a", "binary", "engagement"), TaskHead("b", "binary", "engagement")))
        >>> task_experts(cfg, 4).int().tolist()
        [[1, 1, 1, 0], [1, 1, 0, 1]]
    """
    t, shared = len(config.tasks), config.num_experts
    mask = torch.ones(t, num_experts, dtype=torch.bool)
    if config.model != "mmoe" or num_experts <= shared or (num_experts - shared) % t:
        return mask
    private = (num_experts - shared) // t
    mask[:, shared:] = False
    for i in range(t):
        mask[i, shared + i * private: shared + (i + 1) * private] = True
    return mask


@torch.no_grad()
def expert_spread(model: nn.Module) -> float | None:
    """How different the experts of each pool are: the smallest relative parameter distance.

    For every pool of experts (:class:`ranking.blocks.Experts`; PLE has several) and every pair of
    experts i, j in it: ``||θ_i − θ_j|| / mean(||θ_i||, ||θ_j||)`` over all their parameters. The
    result is the minimum over pairs and pools: 0 means two experts are the same function (e.g.
    constant initialisation), around 1.4 is typical for independent random initialisations.

    Returns:
        The spread, or None when the model has no pool with two or more experts.

    Example:
        >>> pool = Experts(4, (3,), num_experts=2)
        >>> round(expert_spread(pool), 2) > 0.5
        True
        >>> for p in pool.parameters():
        ...     _ = torch.nn.init.constant_(p, 0.1)
        >>> expert_spread(pool)
        0.0
    """
    spreads = []
    for pool in (m for m in model.modules() if isinstance(m, Experts) and len(m) > 1):
        flat = torch.stack([torch.cat([p.flatten() for p in e.parameters()]) for e in pool]).double()  # (E, P)
        norms = flat.norm(dim=1)  # (E,)
        dist = torch.cdist(flat, flat)  # (E, E)
        scale = (norms[:, None] + norms[None, :]) / 2  # (E, E)
        rel = dist / scale.clamp_min(1e-12)
        off_diag = ~torch.eye(len(pool), dtype=torch.bool)
        spreads.append(float(rel[off_diag].min()))
    return min(spreads) if spreads else None
