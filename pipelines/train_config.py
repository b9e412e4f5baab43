"""What ``ranker train`` is asked for: :class:`TrainConfig`, and the one schema of its YAML and ``--set``.

The training fields of a ``--config`` file, of a pipeline config's ``train:`` section and of
``--set`` model overrides are typed by one pydantic schema built from the dataclasses that own
them (:class:`TrainConfig`, :class:`~ranking.config.ModelConfig`, :class:`~ranking.config.GateConfig`),
so a new field is known everywhere at once and every file gets the pipeline config's one-line error:
``invalid training config 'c.yaml': field 'model_config.gate.top_k': Input should be a valid
integer ... (got 'two')``. Standard library, pydantic and YAML only: the command line reads its
defaults here before the training stack is imported.

Example:
    >>> train_section({"epochs": "3", "model_config": {"gate": {"kind": "noisy_topk"}}}, "training config 'c.yaml'")
    ({'epochs': 3}, {'gate': {'kind': 'noisy_topk'}})
    >>> train_section({"epochz": 3}, "training config 'c.yaml'")
    Traceback (most recent call last):
    ...
    ValueError: invalid training config 'c.yaml': field 'epochz': Extra inputs are not permitted (got 3)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from ranking.config import MODEL_KINDS, GateConfig, ModelConfig
from ranking.train.config import FitConfig, LossConfig, LrSchedule, OptimConfig


@dataclass(frozen=True)
class TrainConfig:
    """What ``ranker train`` needs; model-shape fields go through ``model_overrides``."""

    features: Path
    out: Path
    tracking_uri: str
    model: str = "mmoe"
    # How to train: ranking.train's FitConfig, OptimConfig and LossConfig (their defaults, defined there once).
    epochs: int = FitConfig.epochs
    batch_size: int = FitConfig.batch_size
    lr: float = OptimConfig.lr
    weight_decay: float = OptimConfig.weight_decay  # on dense layers only
    embedding_lr: float | None = OptimConfig.embedding_lr  # None = lr (Adam), 0.05 (torchrec fused)
    embedding_weight_decay: float = OptimConfig.embedding_weight_decay  # decoupled, every row, every step
    embedding_l2: float = LossConfig.embedding_l2  # L2 on the embedding rows each batch looks up
    lr_schedule: LrSchedule = OptimConfig.lr_schedule  # "cosine": both learning rates decay to 0 over the run
    warmup_steps: int = OptimConfig.warmup_steps  # linear warm-up of the learning rates over these steps
    loss_weighting: Literal["fixed", "uncertainty"] = LossConfig.weighting
    seed: int = FitConfig.seed
    accelerator: str = FitConfig.accelerator
    devices: int | str = FitConfig.devices
    num_nodes: int = FitConfig.num_nodes  # multi-node DDP: one process per device on every node
    strategy: str = FitConfig.strategy  # "ddp" (gloo on CPU, nccl on GPU) or "torchrec" (sharded tables)
    sharding_type: str | None = FitConfig.sharding_type  # torchrec: table_wise, row_wise, ...; None = planner
    embedding_optimizer: str = FitConfig.embedding_optimizer  # torchrec: fused optimizer of the tables
    precision: str | None = FitConfig.precision  # None: bf16-mixed on GPU, 32-true on CPU
    monitor: str = FitConfig.monitor  # selection and early-stopping metric
    monitor_mode: Literal["min", "max"] = FitConfig.monitor_mode
    early_stopping_patience: int = FitConfig.early_stopping_patience  # 0 = off
    resume: bool = False  # continue from out/checkpoints/last.ckpt when it exists
    experiment: str = "ranker"
    register_as: str | None = "ranker"
    alias: str | None = None  # no alias moves unless asked: the pipeline's gates move the champion
    limit_train_batches: int | float = FitConfig.limit_train_batches
    progress_bar: bool = True  # a bar when stderr is a terminal; a log line per epoch (rows/s) either way
    init_from: Path | None = None  # warm start: an inference artifact folder (e.g. the champion's)
    run_name: str | None = None  # None: <dataset>-<model>-<UTC yyyymmdd-hhmm>, e.g. kuairand-mmoe-20261202-1403
    run_tags: dict[str, str] = field(default_factory=dict)  # e.g. mlflow.parentRunId of a pipeline run
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model not in MODEL_KINDS:
            raise ValueError(f"unknown --model {self.model!r}; available: {list(MODEL_KINDS)}")
        self.fit_config()  # every training field checked where it is defined

    def fit_config(self) -> FitConfig:
        """The training fields as ``ranking.train.fit`` takes them."""
        return FitConfig(
            epochs=self.epochs, batch_size=self.batch_size,
            optim=OptimConfig(lr=self.lr, weight_decay=self.weight_decay, embedding_lr=self.embedding_lr,
                              embedding_weight_decay=self.embedding_weight_decay, lr_schedule=self.lr_schedule,
                              warmup_steps=self.warmup_steps),
            loss=LossConfig(weighting=self.loss_weighting, embedding_l2=self.embedding_l2),
            seed=self.seed, accelerator=self.accelerator, devices=self.devices, num_nodes=self.num_nodes,
            strategy=self.strategy, sharding_type=self.sharding_type, embedding_optimizer=self.embedding_optimizer,
            precision=self.precision, monitor=self.monitor, monitor_mode=self.monitor_mode,
            early_stopping_patience=self.early_stopping_patience, limit_train_batches=self.limit_train_batches,
            progress_bar=True,  # the Progress callback: a bar at a terminal, log lines otherwise
        )


INTERNAL_FIELDS = {"features", "out", "tracking_uri", "model_overrides", "init_from", "run_name", "run_tags"}
PIPELINE_OWNED = {"experiment", "register_as", "alias", "resume"}  # a pipeline sets these itself
MODEL_DERIVED = {"sparse", "dense", "tasks", "position_buckets"}  # from the features folder, never set


def error_line(where: str, error: ValidationError, prefix: str = "") -> str:
    """The first error of a validation as one line: ``invalid <where>: field '<a.b>': <message> (got <value>)``."""
    first = error.errors()[0]
    loc = prefix + ".".join(str(p) for p in first["loc"])
    got = f" (got {first['input']!r})" if first["type"] != "missing" else ""
    return f"invalid {where}: field {loc!r}: {first['msg']}{got}"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


def _schema(name: str, cls: type, skip: set[str], nested: dict[str, Any]) -> type[BaseModel]:
    """A pydantic model of ``cls``'s fields (less ``skip``), each optional: a file names only what it sets."""
    hints = typing.get_type_hints(cls)
    spec: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        spec[f.name] = (nested.get(f.name, hints[f.name]), None)
    return create_model(name, __base__=_Section, **spec)


@functools.cache
def _model_schema() -> type[BaseModel]:
    gate = _schema("gate", GateConfig, set(), {})
    return _schema("model_config", ModelConfig, MODEL_DERIVED, {"gate": gate})


@functools.cache
def _train_schema(pipeline: bool) -> type[BaseModel]:
    skip = INTERNAL_FIELDS | (PIPELINE_OWNED if pipeline else set())
    base = _schema("train", TrainConfig, skip, {})
    extra: Any = {"model_settings": (_model_schema(), Field(None, alias="model_config"))}
    return create_model("train", __base__=base, **extra)


def _given(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(exclude_unset=True, by_alias=True)


def train_section(data: Any, where: str, *, pipeline: bool = False, prefix: str = "") -> tuple[dict[str, Any],
                                                                                               dict[str, Any]]:
    """A mapping of training fields (+ ``model_config``) typed and split into (train fields, model overrides).

    Only the fields given come back, coerced to their types (``"3"`` -> 3, lists -> tuples).
    ``pipeline``: a pipeline's ``train:`` section, which may not set what the pipeline owns.

    Raises:
        ValueError: :func:`error_line` of the first unknown field or wrong value.
    """
    try:
        got = _given(_train_schema(pipeline).model_validate(data if data is not None else {}))
    except ValidationError as e:
        raise ValueError(error_line(where, e, prefix)) from None
    return got, got.pop("model_config", None) or {}


def model_overrides(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Model-config overrides (``--set``) typed the same way: only the fields given, coerced."""
    try:
        return _given(_model_schema().model_validate(data))
    except ValidationError as e:
        raise ValueError(error_line(where, e)) from None


def merge_overrides(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``; nested settings (``gate``) merge field by field.

    Example:
        >>> merge_overrides({"gate": {"kind": "noisy_topk"}, "dropout": 0.1}, {"gate": {"top_k": 1}})
        {'gate': {'kind': 'noisy_topk', 'top_k': 1}, 'dropout': 0.1}
    """
    out = dict(base)
    for k, v in top.items():
        out[k] = merge_overrides(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["num_experts=8", "expert_dims=[64,32]", "gate.kind=noisy_topk"]`` -> a dict (values parsed as
    JSON when they parse; a dotted key sets a field of a nested setting such as ``gate``)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"--set expects key=value, got {pair!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ValueError(f"--set {key}: {p!r} was set to {child!r} before; set its fields, or it, not both")
            node = child
        node[leaf] = tuple(value) if isinstance(value, list) else value
    return out


def load_config_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A YAML file of training fields plus an optional ``model_config:`` mapping of model-config fields.

    Returns ``(train_fields, model_overrides)``, typed by :func:`train_section`.
    """
    import yaml

    if not path.is_file():
        raise ValueError(f"config file not found: {str(path)!r}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    return train_section(data, f"training config {str(path)!r}")


RECIPE_DIR = Path(__file__).parent / "configs" / "train"


def recipe_path(dataset: str) -> Path | None:
    """The bundled training recipe of a dataset (``pipelines/configs/train/<dataset>.yaml``), if it has one."""
    path = RECIPE_DIR / f"{dataset}.yaml"
    return path if path.is_file() else None


def load_recipe(path: Path, model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A bundled training recipe for ``model``: its training fields, and its ``models:`` entry for
    the model as the model overrides (none for a model it has no entry for).

    Returns ``(train_fields, model_overrides)``, typed by :func:`train_section`.

    Example:
        >>> fields, model = load_recipe(recipe_path("census"), "mmoe")
        >>> fields["lr"], fields["monitor"], model["num_experts"]
        (0.003, 'val/auc_mean', 8)
    """
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    models = (data.pop("models", None) or {}) if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise ValueError(f"training recipe {str(path)!r} must hold a mapping with a 'models:' mapping")
    return train_section({**data, "model_config": models.get(model, {})}, f"training recipe {str(path)!r}")


def features_dataset(features: Path) -> str | None:
    """The dataset a features folder was built from (its ``summary.json``), None if it does not say."""
    try:
        name = json.loads((features / "summary.json").read_text()).get("dataset")
    except (OSError, ValueError):
        return None
    return name if isinstance(name, str) else None
