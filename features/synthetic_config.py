"""The synthetic generator's knobs (standard library only: the command line reads its defaults here).

``features.synthetic`` generates the log; this module only holds what it is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator; defaults give about 420k impressions over 7 days."""

    days: int = 7
    users: int = 2_000
    items: int = 10_000
    requests_per_day: int = 3_000
    slate_size: int = 20
    seed: int = 0
    start: date = date(2026, 1, 1)
    factors: int = 8
    categories: int = 30
    creators: int = 1_500
    tags: int = 200
    correlation: float = 0.6  # engagement vs satisfaction affinity, in [-1, 1]
    position_bias: float = 1.0  # examine(p) = (1 + p) ** -position_bias; 0 = no position effect
    policy_noise: float = 1.0  # std of the logging policy's noise on the relevance logit
    policy_promotion: float = 0.0  # logging-policy boost for items of promoted categories (category % 3 == 0)

    def __post_init__(self) -> None:
        for f in ("days", "users", "items", "requests_per_day", "slate_size", "categories", "creators"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.slate_size > self.items:
            raise ValueError(f"slate_size ({self.slate_size}) must not exceed items ({self.items})")
        if not -1.0 <= self.correlation <= 1.0:
            raise ValueError(f"correlation must be in [-1, 1], got {self.correlation}")
        if self.position_bias < 0:
            raise ValueError(f"position_bias must be >= 0, got {self.position_bias}")
