"""Gate health: are the experts used, and are the task gates collapsing onto one expert?

Accumulates gate weights (B, T, E) over an evaluation pass and summarises them per task:
the mean weight of each expert, the mean per-row entropy, the share of near-dead experts (an
expert no task gives more than ``dead_below`` of its weight on average) and a polarization flag
per task (the task's rows put more than ``polarized_above`` of their weight on one expert on
average; Zhao et al. 2019 report this failure and counter it with gate dropout).

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


@dataclass(frozen=True)
class GateHealth:
    tasks: list[str]
    mean_weight: list[list[float]]  # (T, E)
    entropy: list[float]  # (T,) mean per-row entropy in nats; log(E) is uniform
    max_weight: list[float]  # (T,) mean over rows of the largest weight
    dead_fraction: float  # share of experts below dead_below for every task
    polarized: list[bool]  # (T,)

    def metrics(self, prefix: str) -> dict[str, float]:
        """Flat metric dict, keys ``<prefix>/gate/<task>/...`` and ``<prefix>/gate/dead_fraction``."""
        out = {f"{prefix}/gate/dead_fraction": self.dead_fraction}
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

    def compute(self) -> GateHealth:
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
        )
