"""The model's frozen config: derived from the feature spec and fitted transform, saved with the weights.

Shape letters used across ``ranking``: B batch, F sparse features, Dd dense features, D width,
E experts, T tasks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:  # a type only: this module stays standard library (the command line reads its defaults)
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
    """How every gate of a model turns its input into weights over its E experts (``ranking.gating.Gate``).

    Args:
        kind: ``"softmax"`` (dense, Ma et al. 2018) or ``"noisy_topk"`` (Shazeer et al. 2017: the k
            largest logits, softmax over them, zeros elsewhere; k can be lowered after training).
        top_k: noisy_topk: experts kept per row.
        noise: noisy_topk: scale of the trainable Gaussian logit noise, training only; 0 = plain top-k.
        dropout: in training, probability of zeroing each expert's weight before renormalising
            (Zhao et al. 2019 use 0.1); 0 = off. Any kind.

    Example:
        >>> GateConfig("noisy_topk", top_k=1).sparse, GateConfig().sparse
        (True, False)
    """

    kind: GateKind = "softmax"
    top_k: int = 2
    noise: float = 1.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in GATE_KINDS:
            raise ValueError(f"gate.kind must be one of {list(GATE_KINDS)}, got {self.kind!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"gate.top_k must be an integer >= 1, got {self.top_k!r}")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"gate.noise must be finite and >= 0, got {self.noise}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"gate.dropout must be in [0, 1), got {self.dropout}")

    @property
    def sparse(self) -> bool:
        """Only some experts get a non-zero weight per row (top-k)."""
        return self.kind == "noisy_topk"

    @classmethod
    def of(cls, value: GateConfig | str | dict[str, Any]) -> GateConfig:
        """A gate config from an instance, a kind (``"noisy_topk"``) or a mapping of its fields."""
        if isinstance(value, GateConfig):
            return value
        if isinstance(value, str):
            return cls(kind=value)  # type: ignore[arg-type]  # checked in __post_init__
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ValueError(f"unknown gate field(s) {unknown}; known: kind, top_k, noise, dropout")
            return cls(**value)
        raise ValueError(f"gate must be a kind name or a mapping of kind, top_k, noise, dropout; got {value!r}")


# The flat gate fields artifacts of format 1 (and model configs before 2026-12-07) wrote, and their new place.
_FLAT_GATE_FIELDS = {"top_k": "top_k", "gate_noise": "noise", "gate_dropout": "dropout"}


def migrate_gate_fields(data: dict[str, Any]) -> dict[str, Any]:
    """A saved model config with its flat gate fields (``gate: "noisy_topk"``, ``top_k``, ``gate_noise``,
    ``gate_dropout``) rewritten as one ``gate`` mapping; a config already nested is returned as it is.

    Example:
        >>> migrate_gate_fields({"gate": "noisy_topk", "top_k": 1, "gate_noise": 0.5})["gate"]
        {'kind': 'noisy_topk', 'top_k': 1, 'noise': 0.5}
    """
    flat = {k: data[k] for k in _FLAT_GATE_FIELDS if k in data}
    if not flat and not isinstance(data.get("gate"), str):
        return data
    out = {k: v for k, v in data.items() if k not in _FLAT_GATE_FIELDS}
    gate = {"kind": out.pop("gate", "softmax")} | {_FLAT_GATE_FIELDS[k]: v for k, v in flat.items()}
    out["gate"] = gate
    return out


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
    gate: GateConfig = dataclasses.field(default_factory=GateConfig)  # every gate's kind, top-k, noise, dropout
    load_balance_weight: float = 0.0  # > 0: model returns aux["load_balance"]; the trainer applies the weight
    expert_dims: tuple[int, ...] = (128, 64)
    tower_dims: tuple[int, ...] = (32,)
    dropout: float = 0.0
    position_dropout: float = 0.1  # share of training rows whose position is hidden from the bias tower

    def __post_init__(self) -> None:
        if self.model not in MODEL_KINDS:
            raise ValueError(f"model must be one of {list(MODEL_KINDS)}, got {self.model!r}")
        if not isinstance(self.gate, GateConfig):
            raise ValueError(f"gate must be a GateConfig (GateConfig.of builds one), got {self.gate!r}")
        for name in ("num_experts", "num_task_experts", "num_shared_experts", "ple_levels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        limit = self.experts_per_gate
        if self.gate.sparse and limit is not None and self.gate.top_k > limit:
            raise ValueError(
                f"gate.top_k must be <= {limit} (experts one {self.model} gate sees), got {self.gate.top_k}")
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
            hint = ("; the gate's settings are fields of 'gate': gate.kind, gate.top_k, gate.noise, gate.dropout"
                    if set(unknown) & set(_FLAT_GATE_FIELDS) else "")
            raise ValueError(f"unknown model config field(s) {unknown}; known: {sorted(known)}{hint}")
        if "gate" in overrides:
            overrides = {**overrides, "gate": GateConfig.of(overrides["gate"])}
        base = cls(
            sparse=sparse, dense=tuple(d.name for d in spec.dense), tasks=tasks, position_buckets=position
        )
        return dataclasses.replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """A config from :meth:`to_dict`'s output, also as artifacts of earlier versions wrote it: fields
        added since take their defaults, the flat gate fields become ``gate`` (:func:`migrate_gate_fields`),
        ``extra`` (always empty) is dropped."""
        d = migrate_gate_fields(dict(data))
        d.pop("extra", None)
        if "gate" in d:
            d["gate"] = GateConfig.of(d["gate"])
        d["sparse"] = tuple(SparseSlot(**s) for s in d["sparse"])
        d["tasks"] = tuple(TaskHead(**t) for t in d["tasks"])
        for k in ("dense", "bottom_dims", "expert_dims", "tower_dims"):
            d[k] = tuple(d[k])
        return cls(**d)
