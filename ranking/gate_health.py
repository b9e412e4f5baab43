"""Gate health: are the experts used, and are the task gates collapsing onto one expert?

Accumulates gate weights (B, T, E) over an evaluation pass and summarises them per task:
the mean weight of each expert, the mean per-row entropy, the share of near-dead experts (an
expert no task gives more than ``dead_below`` of its weight on average) and a polarization flag
per task (the task's rows put more than ``polarized_above`` of their weight on one expert on
average; Zhao et al. 2019 report this failure and counter it with gate dropout).

Gate weights cannot show one failure: experts that are all the same function (constant or
copied initialisation; symmetric updates keep them equal, Adam's per-parameter scaling included).
:func:`expert_spread` measures that from the parameters, and :meth:`GateHealth.problems` turns
everything into readable findings.

Example:
    >>> import torch
    >>> acc = GateStats(["click", "like"], num_experts=2)
    >>> acc.update(torch.tensor([[[0.5, 0.5], [1.0, 0.0]]]))
    >>> h = acc.compute()
    >>> h.polarized, [round(x, 3) for x in h.entropy]
    ([False, True], [0.693, 0.0])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ranking.blocks import Experts


@dataclass(frozen=True)
class GateHealth:
    tasks: list[str]
    mean_weight: list[list[float]]  # (T, E)
    entropy: list[float]  # (T,) mean per-row entropy in nats; log(E) is uniform
    max_weight: list[float]  # (T,) mean over rows of the largest weight
    dead_fraction: float  # share of experts below dead_below for every task
    polarized: list[bool]  # (T,)
    expert_spread: float | None = None  # see expert_spread(); None when not measured or no expert pool

    def problems(self, min_spread: float = 1e-3, max_dead_fraction: float = 0.5) -> list[str]:
        """What is wrong with the mixture, one readable line per finding; empty when healthy.

        Args:
            min_spread: experts closer than this (relative parameter distance) count as identical.
            max_dead_fraction: more near-dead experts than this share is a finding.

        Example:
            >>> GateHealth(["click"], [[1.0, 0.0]], [0.0], [1.0], 0.5, [True], expert_spread=0.0).problems()
            ['gate of task click is polarized (mean top weight 1.000)', 'experts are identical (spread 0)']
        """
        found = [
            f"gate of task {task} is polarized (mean top weight {self.max_weight[t]:.3f})"
            for t, task in enumerate(self.tasks)
            if self.polarized[t]
        ]
        if self.dead_fraction > max_dead_fraction:
            found.append(f"{self.dead_fraction:.0%} of experts are near-dead")
        if self.expert_spread is not None and self.expert_spread < min_spread:
            found.append(f"experts are identical (spread {self.expert_spread:.3g})")
        return found

    def metrics(self, prefix: str) -> dict[str, float]:
        """Flat metric dict, keys ``<prefix>/gate/<task>/...`` and ``<prefix>/gate/dead_fraction``."""
        out = {f"{prefix}/gate/dead_fraction": self.dead_fraction}
        if self.expert_spread is not None:
            out[f"{prefix}/gate/expert_spread"] = self.expert_spread
        for t, task in enumerate(self.tasks):
            out[f"{prefix}/gate/{task}/entropy"] = self.entropy[t]
            out[f"{prefix}/gate/{task}/polarized"] = float(self.polarized[t])
            for e, w in enumerate(self.mean_weight[t]):
                out[f"{prefix}/gate/{task}/expert_{e}"] = w
        return out


class GateStats:
    """Running sums of gate weights over batches; ``compute`` gives a :class:`GateHealth`."""

    def __init__(self, tasks: list[str], num_experts: int, dead_below: float | None = None,
                 polarized_above: float = 0.9) -> None:
        self.tasks = list(tasks)
        self.num_experts = num_experts
        self.dead_below = dead_below if dead_below is not None else 0.1 / num_experts
        self.polarized_above = polarized_above
        self.reset()

    def reset(self) -> None:
        t, e = len(self.tasks), self.num_experts
        self.rows = 0
        self.weight_sum = torch.zeros(t, e, dtype=torch.float64)
        self.entropy_sum = torch.zeros(t, dtype=torch.float64)
        self.max_sum = torch.zeros(t, dtype=torch.float64)

    @torch.no_grad()
    def update(self, gates: torch.Tensor) -> None:
        """gates: (B, T, E) weights summing to 1 over E."""
        g = gates.detach().double().cpu()
        self.rows += g.shape[0]
        self.weight_sum += g.sum(dim=0)  # (T, E)
        self.entropy_sum += -(g * g.clamp_min(1e-12).log()).sum(dim=-1).sum(dim=0)  # (T,)
        self.max_sum += g.max(dim=-1).values.sum(dim=0)  # (T,)

    def compute(self, model: nn.Module | None = None) -> GateHealth:
        """The summary of what was accumulated; with ``model``, also its :func:`expert_spread`."""
        n = max(self.rows, 1)
        mean = self.weight_sum / n  # (T, E)
        max_w = self.max_sum / n
        dead = (mean < self.dead_below).all(dim=0)  # (E,) dead for every task
        return GateHealth(
            tasks=self.tasks,
            mean_weight=mean.tolist(),
            entropy=(self.entropy_sum / n).tolist(),
            max_weight=max_w.tolist(),
            dead_fraction=float(dead.double().mean()),
            polarized=(max_w > self.polarized_above).tolist(),
            expert_spread=expert_spread(model) if model is not None else None,
        )


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
