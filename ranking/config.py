"""The model's frozen config: derived from the feature spec and fitted transform, saved with the weights.

Shape letters used across ``ranking``: B batch, F sparse features, Dd dense features, D width,
E experts, T tasks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from features.fitted import FittedTransform


@dataclass(frozen=True)
class SparseSlot:
    """One embedding table: a sparse feature with its vocabulary size."""

    name: str
    num_embeddings: int
    embedding_dim: int
    pooling: Literal["sum", "mean"] = "sum"
    multi: bool = False
    max_len: int = 1


@dataclass(frozen=True)
class TaskHead:
    """One objective as the model sees it."""

    name: str
    type: Literal["binary", "regression"]
    group: Literal["engagement", "satisfaction"]
    loss_weight: float = 1.0
    serving_weight: float = 1.0
    higher_is_better: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; stored in the inference artifact.

    Example:
        >>> cfg = ModelConfig(sparse=(SparseSlot("user", 10, 4),), dense=("age",),
        ...                   tasks=(TaskHead("click", "binary", "engagement"),))
        >>> ModelConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    sparse: tuple[SparseSlot, ...]
    dense: tuple[str, ...]
    tasks: tuple[TaskHead, ...]
    model: Literal["mmoe"] = "mmoe"
    position_buckets: int = 0  # 0 disables the position-bias tower
    bottom_dims: tuple[int, ...] = (256,)  # shared bottom; () turns it off
    num_experts: int = 4
    expert_dims: tuple[int, ...] = (128, 64)
    tower_dims: tuple[int, ...] = (32,)
    dropout: float = 0.0
    position_dropout: float = 0.1  # share of training rows whose position is hidden from the bias tower
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not self.tasks:
            raise ValueError("a model needs at least one task")
        if not self.expert_dims:
            raise ValueError("expert_dims must name at least one layer width")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_fitted(cls, fitted: FittedTransform, **overrides: Any) -> ModelConfig:
        """Derive tables, dense inputs and task heads from the spec; ``overrides`` set other fields."""
        spec = fitted.spec
        sparse = tuple(
            SparseSlot(
                name=f.name,
                num_embeddings=fitted.table_size(f.name),
                embedding_dim=f.embedding_dim,
                pooling=f.pooling,
                multi=f.multi,
                max_len=f.max_len if f.multi else 1,
            )
            for f in spec.sparse
        )
        tasks = tuple(
            TaskHead(t.name, t.type, t.group, t.loss_weight, t.serving_weight, t.higher_is_better)
            for t in spec.tasks
        )
        position = spec.position.max_position + 1 if spec.position is not None else 0
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s) {unknown}; known: {sorted(known)}")
        base = cls(
            sparse=sparse, dense=tuple(d.name for d in spec.dense), tasks=tasks, position_buckets=position
        )
        return dataclasses.replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        d = dict(data)
        d["sparse"] = tuple(SparseSlot(**s) for s in d["sparse"])
        d["tasks"] = tuple(TaskHead(**t) for t in d["tasks"])
        for k in ("dense", "bottom_dims", "expert_dims", "tower_dims"):
            d[k] = tuple(d[k])
        return cls(**d)
