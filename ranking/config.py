"""The model's frozen config: derived from the feature spec and fitted transform, saved with the weights.

Shape letters used across ``ranking``: B batch, F sparse features, Dd dense features, D width,
E experts, T tasks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

from features.fitted import FittedTransform

ModelKind = Literal["single_task", "shared_bottom", "omoe", "mmoe", "ple"]
GateKind = Literal["softmax", "noisy_topk"]
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)
GATE_KINDS: tuple[str, ...] = get_args(GateKind)


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
class GateConfig:
    """How a gate turns its input into weights over E experts (see ``ranking.gating.Gate``).

    Args:
        top_k: keep the k largest logits and softmax over them (zeros elsewhere); None = dense.
        noise: scale of the trainable Gaussian logit noise (Shazeer et al. 2017), training only;
            0 = no noise.
        dropout: in training, probability of zeroing each expert's weight before renormalising
            (Zhao et al. 2019 use 0.1); 0 = off.

    Example:
        >>> GateConfig(top_k=2, noise=1.0).top_k
        2
    """

    top_k: int | None = None
    noise: float = 0.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"gate noise must be finite and >= 0, got {self.noise}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"gate dropout must be in [0, 1), got {self.dropout}")


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
    model: ModelKind = "mmoe"  # which mixing sits between the shared front and the towers
    position_buckets: int = 0  # 0 disables the position-bias tower
    bottom_dims: tuple[int, ...] = (256,)  # shared bottom; () turns it off (single_task: per-task bottom)
    num_experts: int = 4  # omoe, mmoe
    num_task_experts: int = 1  # ple: experts owned by each task, per level
    num_shared_experts: int = 2  # ple: experts shared by all tasks, per level
    ple_levels: int = 2  # ple: extraction levels; 1 is CGC
    gate: GateKind = "softmax"  # "noisy_topk": Shazeer et al. 2017 sparse gate
    top_k: int = 2  # noisy_topk: experts kept per row (can be lowered later with set_top_k)
    gate_noise: float = 1.0  # noisy_topk: scale of the trainable logit noise (training only)
    gate_dropout: float = 0.0  # training only: chance of zeroing each expert's gate weight (paper: 0.1)
    load_balance_weight: float = 0.0  # > 0: model returns aux["load_balance"]; the trainer applies the weight
    expert_dims: tuple[int, ...] = (128, 64)
    tower_dims: tuple[int, ...] = (32,)
    dropout: float = 0.0
    position_dropout: float = 0.1  # share of training rows whose position is hidden from the bias tower

    def __post_init__(self) -> None:
        if self.model not in MODEL_KINDS:
            raise ValueError(f"model must be one of {list(MODEL_KINDS)}, got {self.model!r}")
        if self.gate not in GATE_KINDS:
            raise ValueError(f"gate must be one of {list(GATE_KINDS)}, got {self.gate!r}")
        for name in ("num_experts", "num_task_experts", "num_shared_experts", "ple_levels", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        limit = self.experts_per_gate
        if self.gate == "noisy_topk" and limit is not None and self.top_k > limit:
            raise ValueError(f"top_k must be <= {limit} (experts one {self.model} gate sees), got {self.top_k}")
        if not (math.isfinite(self.gate_noise) and self.gate_noise >= 0):
            raise ValueError(f"gate_noise must be finite and >= 0, got {self.gate_noise}")
        if not 0.0 <= self.gate_dropout < 1.0:
            raise ValueError(f"gate_dropout must be in [0, 1), got {self.gate_dropout}")
        if not (math.isfinite(self.load_balance_weight) and self.load_balance_weight >= 0):
            raise ValueError(f"load_balance_weight must be finite and >= 0, got {self.load_balance_weight}")
        if not self.tasks:
            raise ValueError("a model needs at least one task")
        if not self.expert_dims:
            raise ValueError("expert_dims must name at least one layer width")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def experts_per_gate(self) -> int | None:
        """E of the smallest gate this model has (PLE task gates: own + shared); None without gates."""
        if self.model in ("omoe", "mmoe"):
            return self.num_experts
        if self.model == "ple":
            return self.num_task_experts + self.num_shared_experts
        return None

    @property
    def gating(self) -> GateConfig:
        """The gate settings every gate of the model is built with."""
        sparse = self.gate == "noisy_topk"
        return GateConfig(
            top_k=self.top_k if sparse else None,
            noise=self.gate_noise if sparse else 0.0,
            dropout=self.gate_dropout,
        )

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
        position = fitted.position_buckets()  # positions (x the crossed feature), 0 without position
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
        """A config from :meth:`to_dict`'s output, also as artifacts of earlier versions wrote it
        (fields added since take their defaults; ``extra``, always empty, was dropped on 2026-12-07)."""
        d = dict(data)
        d.pop("extra", None)
        d["sparse"] = tuple(SparseSlot(**s) for s in d["sparse"])
        d["tasks"] = tuple(TaskHead(**t) for t in d["tasks"])
        for k in ("dense", "bottom_dims", "expert_dims", "tower_dims"):
            d[k] = tuple(d[k])
        return cls(**d)
