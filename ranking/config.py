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
GateKind = Literal["softmax", "noisy_topk", "top_p", "hash", "expert_choice", "shared_topk"]
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)
GATE_KINDS: tuple[str, ...] = get_args(GateKind)
ROW_GATE_KINDS = ("softmax", "noisy_topk", "top_p")  # each row's weights from its own logits: any gated model
MMOE_GATE_KINDS = ("hash", "expert_choice", "shared_topk")  # routing over the task gates together: MMoE only


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
    """How every gate of a model turns its input into weights over its E experts (``ranking.gating``).

    Args:
        kind: the routing strategy:

            - ``"softmax"``: dense, every expert on every row (Ma et al. 2018);
            - ``"noisy_topk"``: the ``top_k`` largest logits, softmax over them (Shazeer et al. 2017),
              with trainable Gaussian noise of scale ``noise`` in training;
            - ``"top_p"``: per row the fewest experts whose softmax weights reach ``top_p``, at least
              ``min_experts`` and at most ``max_experts``, renormalised (dynamic k);
            - ``"hash"``: the expert fixed by a hash of the row's id of ``hash_feature``, the same
              for every task, weight 1; no learned router (Roller et al. 2021), the baseline;
            - ``"expert_choice"``: each expert takes its ``ceil(capacity_factor * n * top_k / E)``
              best rows of a group of n rows, per task gate (Zhou et al. 2022); the group is the
              batch in training and one request's candidates at serving;
            - ``"shared_topk"``: one router picks ``top_k`` of the E shared experts per row for all
              tasks together; each task's gate mixes those and its own ``private_experts``
              (a task-shared selection, as Kuaishou's SMES).

            The last three are MMoE's; the first three work for every gated model.
        top_k: experts per row (noisy_topk, shared_topk) or on average (expert_choice's capacity).
        noise: noisy_topk: scale of the trainable logit noise, training only; 0 = plain top-k.
        dropout: in training, probability of zeroing each expert's weight before renormalising
            (Zhao et al. 2019 use 0.1); 0 = off. Row kinds only.
        top_p, min_experts, max_experts: top_p's target mass and bounds; ``max_experts`` 0 = E.
        hash_feature: hash: the single-valued sparse feature whose id picks the expert; "" = the
            config's first single-valued sparse feature (the user id in the bundled specs).
        capacity_factor: expert_choice: rows each expert takes, relative to an even split of
            ``top_k`` experts per row; 1 means on average ``top_k`` experts per row.
        private_experts: shared_topk: experts each task owns (always on for its rows).
        z_loss_weight: the router z-loss of ST-MoE (Zoph et al. 2022), mean squared logsumexp of
            the router logits, added to the training loss with this weight; 0 = off.
        serving_k: experts per row when the artifact is served (``InferenceModel``, ``ranker
            serve``; ``--experts-k`` overrides it): the top-k of the row kinds, the shared
            selection's k, expert choice's k in its capacity; 0 = as trained.

    Example:
        >>> GateConfig("noisy_topk", top_k=1).sparse, GateConfig().sparse
        (True, False)
    """

    kind: GateKind = "softmax"
    top_k: int = 2
    noise: float = 1.0
    dropout: float = 0.0
    top_p: float = 0.8
    min_experts: int = 1
    max_experts: int = 0
    hash_feature: str = ""
    capacity_factor: float = 1.0
    private_experts: int = 1
    z_loss_weight: float = 0.0
    serving_k: int = 0

    def __post_init__(self) -> None:
        if self.kind not in GATE_KINDS:
            raise ValueError(f"gate.kind must be one of {list(GATE_KINDS)}, got {self.kind!r}")
        for name, low in (("top_k", 1), ("min_experts", 1), ("max_experts", 0), ("private_experts", 1),
                          ("serving_k", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"gate.{name} must be an integer >= {low}, got {v!r}")
        if self.max_experts and self.max_experts < self.min_experts:
            raise ValueError(f"gate.max_experts must be 0 or >= min_experts ({self.min_experts}), "
                             f"got {self.max_experts}")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"gate.noise must be finite and >= 0, got {self.noise}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"gate.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"gate.top_p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.capacity_factor) and self.capacity_factor > 0):
            raise ValueError(f"gate.capacity_factor must be finite and > 0, got {self.capacity_factor}")
        if not (math.isfinite(self.z_loss_weight) and self.z_loss_weight >= 0):
            raise ValueError(f"gate.z_loss_weight must be finite and >= 0, got {self.z_loss_weight}")
        if self.dropout > 0 and self.kind not in ROW_GATE_KINDS:
            raise ValueError(f"gate.dropout applies to {list(ROW_GATE_KINDS)}, not {self.kind!r}")

    @property
    def sparse(self) -> bool:
        """Each gate keeps its ``top_k`` largest logits per row (noisy top-k)."""
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
                known = [f.name for f in dataclasses.fields(cls)]
                raise ValueError(f"unknown gate field(s) {unknown}; known: {known}")
            return cls(**value)
        raise ValueError(f"gate must be a kind name or a mapping of GateConfig's fields; got {value!r}")


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
    feature_gate_dim: int = 0  # > 0: a field-wise input gate 2 sigmoid(MLP(x)) of this hidden width (HoME, PEPNet)
    cross_layers: int = 0  # > 0: a DCN-v2 cross network of this many layers on the front, under the bottom
    cross_rank: int = 0  # 0: full-rank cross layers (torchrec CrossNet); > 0: LowRankCrossNet of this rank
    cross_experts: int = 1  # > 1 (with cross_rank > 0): LowRankMixtureCrossNet with this many experts
    num_experts: int = 4  # omoe, mmoe
    num_task_experts: int = 1  # ple: experts owned by each task, per level
    num_shared_experts: int = 2  # ple: experts shared by all tasks, per level
    ple_levels: int = 2  # ple: extraction levels; 1 is CGC
    gate: GateConfig = dataclasses.field(default_factory=GateConfig)  # every gate's kind, top-k, noise, dropout
    load_balance_weight: float = 0.0  # > 0: model returns aux["load_balance"]; the trainer applies the weight
    expert_dims: tuple[int, ...] = (128, 64)
    expert_activation: Literal["relu", "silu"] = "relu"  # "silu": Swish experts, no dead units (HoME)
    expert_norm: Literal["none", "batch"] = "none"  # "batch": BatchNorm1d after each expert layer (folded at serving)
    tower_dims: tuple[int, ...] = (32,)
    tower_norm: Literal["none", "batch"] = "none"  # "batch": BatchNorm1d after each tower layer (folded at serving)
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
        self._check_gate()
        if not (math.isfinite(self.load_balance_weight) and self.load_balance_weight >= 0):
            raise ValueError(f"load_balance_weight must be finite and >= 0, got {self.load_balance_weight}")
        if not self.tasks:
            raise ValueError("a model needs at least one task")
        if not self.expert_dims:
            raise ValueError("expert_dims must name at least one layer width")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.expert_activation not in ("relu", "silu"):
            raise ValueError(f"expert_activation must be 'relu' or 'silu', got {self.expert_activation!r}")
        for name in ("tower_norm", "expert_norm"):
            if getattr(self, name) not in ("none", "batch"):
                raise ValueError(f"{name} must be 'none' or 'batch', got {getattr(self, name)!r}")
        for name, low in (("feature_gate_dim", 0), ("cross_layers", 0), ("cross_rank", 0), ("cross_experts", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if self.cross_experts > 1 and not self.cross_rank:
            raise ValueError(f"cross_experts {self.cross_experts} needs low-rank cross layers (cross_rank > 0)")

    def _check_gate(self) -> None:
        g, limit = self.gate, self.experts_per_gate
        if limit is None:
            return  # no gates: nothing to check against
        if g.kind in MMOE_GATE_KINDS and self.model != "mmoe":
            raise ValueError(f"gate.kind {g.kind!r} routes over MMoE's task gates; model {self.model!r} "
                             f"takes one of {list(ROW_GATE_KINDS)}")
        if g.z_loss_weight > 0 and self.model != "mmoe":
            raise ValueError(f"gate.z_loss_weight applies to MMoE's router; model {self.model!r} has none")
        shared = self.num_experts
        if g.kind in ("noisy_topk", "expert_choice") and g.top_k > limit:
            raise ValueError(f"gate.top_k must be <= {limit} (experts one {self.model} gate sees), got {g.top_k}")
        if g.kind == "shared_topk" and g.top_k > shared:
            raise ValueError(f"gate.top_k must be <= {shared} (the shared experts), got {g.top_k}")
        if g.kind == "top_p":
            for name in ("min_experts", "max_experts"):
                if getattr(g, name) > limit:
                    raise ValueError(f"gate.{name} must be <= {limit} (experts one {self.model} gate sees), "
                                     f"got {getattr(g, name)}")
        if g.kind == "hash":
            self.hash_slot()  # raises when no feature fits
        if g.serving_k:
            if g.kind == "hash":
                raise ValueError("gate.serving_k: hash routing runs one expert per row; there is no k to lower")
            bound = shared if g.kind == "shared_topk" else limit
            if g.serving_k > bound:
                raise ValueError(f"gate.serving_k must be <= {bound}, got {g.serving_k}")

    def hash_slot(self) -> str:
        """The sparse feature hash routing reads (``gate.hash_feature`` or the first single-valued one)."""
        singles = [s.name for s in self.sparse if not s.multi]
        name = self.gate.hash_feature or (singles[0] if singles else "")
        if name not in singles:
            raise ValueError(f"gate.hash_feature must name a single-valued sparse feature, one of {singles}; "
                             f"got {self.gate.hash_feature!r}")
        return name

    @property
    def total_experts(self) -> int:
        """Experts in MMoE's pool: ``num_experts``, plus each task's private ones under shared_topk."""
        private = self.gate.private_experts * len(self.tasks) if self.gate.kind == "shared_topk" else 0
        return self.num_experts + private

    @property
    def experts_per_gate(self) -> int | None:
        """E of the smallest gate this model has (PLE task gates: own + shared); None without gates."""
        if self.model == "mmoe" and self.gate.kind == "shared_topk":
            return self.num_experts + self.gate.private_experts
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
