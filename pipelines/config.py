"""The pipeline's configuration: one YAML file per pipeline, typed into frozen dataclasses.

A file names the source of raw impressions, the windows (training, validation, holdout), the
training recipe, the promotion gates and where the state and the MLflow store live. Relative
paths are resolved against the working directory (as any command line does); ``${VAR}`` and ``${VAR:-default}``
are expanded from the environment first, so one file serves a laptop and a cluster.

Example:
    >>> cfg = load_pipeline_config(bundled_config("synthetic"))
    >>> cfg.name, cfg.windows.holdout_days, cfg.gates.primary
    ('synthetic', 1, 'click')
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class SourceConfig:
    """Where raw impressions come from.

    ``dataset`` picks the adapter (``synthetic`` reads a folder of Parquet, date-partitioned or
    not; ``kuairand`` reads the published KuaiRand files). ``synthesize`` (synthetic only) writes
    that many days of the generator's log into ``path`` when it holds none: a stand-in for the
    upstream job that lands a partition every day.
    """

    path: Path
    dataset: str = "synthetic"
    synthesize: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WindowConfig:
    """Days, counted back from the as-of date: ``[... train ...][validation][holdout]``.

    The holdout days are never trained on: challenger and champion are compared there. The
    validation days pick the challenger's best epoch. ``train_days`` = 0 uses every day available.
    """

    train_days: int = 0
    validation_days: int = 1
    holdout_days: int = 1

    def __post_init__(self) -> None:
        for name in ("validation_days", "holdout_days"):
            if getattr(self, name) < 1:
                raise ValueError(f"windows.{name} must be >= 1, got {getattr(self, name)}")
        if self.train_days < 0:
            raise ValueError(f"windows.train_days must be >= 0 (0 = all), got {self.train_days}")


@dataclass(frozen=True)
class PromotionGates:
    """When a challenger may replace the champion, both scored on the same holdout rows.

    - ``primary``: the task whose metric must be at least the champion's plus ``primary_min_gain``.
    - ``max_drop``: no task's metric may fall more than this below the champion's.
    - Metrics: ``binary_metric`` for binary tasks and ``regression_metric`` for regression tasks;
      both must be higher-is-better (auc, gauc, r2).
    """

    primary: str = "click"
    primary_min_gain: float = 0.0
    max_drop: float = 0.005
    binary_metric: str = "auc"
    regression_metric: str = "r2"

    def __post_init__(self) -> None:
        allowed = {"auc", "gauc", "r2"}
        for name in ("binary_metric", "regression_metric"):
            if getattr(self, name) not in allowed:
                raise ValueError(f"gates.{name} must be one of {sorted(allowed)}, got {getattr(self, name)!r}")
        if self.max_drop < 0:
            raise ValueError(f"gates.max_drop must be >= 0, got {self.max_drop}")


@dataclass(frozen=True)
class PipelineConfig:
    """Everything one scheduled pipeline needs (see ``pipelines/configs/*.yaml``).

    ``train`` holds :class:`pipelines.train.TrainConfig` fields (``model``, ``epochs``, ``lr``,
    ``accelerator``, ``devices``, ``num_nodes``, ``strategy``, ...) and an optional ``model_config``
    mapping of model-shape fields; ``warm_start`` initialises the challenger from the champion's
    weights (embedding rows matched by raw id across the two vocabularies).
    """

    name: str
    source: SourceConfig
    workdir: Path
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI or the project's .mlflow/ sqlite store
    experiment: str = "ranker-pipeline"
    model_name: str = "ranker"
    alias: str = "champion"
    spec: str | None = None  # feature spec name or YAML path; None = the dataset's own
    windows: WindowConfig = field(default_factory=WindowConfig)
    train: dict[str, Any] = field(default_factory=dict)
    warm_start: bool = False
    gates: PromotionGates = field(default_factory=PromotionGates)
    path: Path | None = None  # the file this came from

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ValueError(f"pipeline name must be letters, digits, '_', '.', '-'; got {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps({k: v for k, v in asdict(self).items() if k != "path"}, default=str))

    @property
    def content_hash(self) -> str:
        """Short hash of the effective configuration (tagged on every run)."""
        body = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(body).hexdigest()[:12]


def bundled_config(name: str) -> Path:
    """Path of a config shipped with the package (``synthetic``, ``kuairand``)."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ValueError(f"no bundled pipeline config {name!r}; bundled: {known}")
    return path


def _expand(value: Any) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            got = os.environ.get(m.group(1))
            if got is None and m.group(2) is None:
                raise ValueError(f"config refers to ${{{m.group(1)}}}, which is not set and has no default")
            return got if got is not None else str(m.group(2))

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def _section(cls: type, data: Any, where: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {data!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in {where}; known: {sorted(known)}")
    return cls(**data)


def load_pipeline_config(path: str | Path, **overrides: Any) -> PipelineConfig:
    """Read, expand and type a pipeline YAML; ``overrides`` replace top-level fields (e.g. ``workdir``).

    Raises:
        ValueError: missing file, unknown fields (named), bad values.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pipeline config not found: {str(path)!r}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"pipeline config {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"pipeline config {str(path)!r} must hold a mapping")
    data = _expand(data)
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(PipelineConfig)} - {"path"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in {str(path)!r}; known: {sorted(known)}")
    for required in ("name", "source", "workdir"):
        if required not in data:
            raise ValueError(f"pipeline config {str(path)!r} lacks {required!r}")
    base = Path.cwd()

    def resolve(p: Any) -> Path:
        p = Path(str(p))
        return p if p.is_absolute() else (base / p).resolve()

    source = dict(data["source"]) if isinstance(data["source"], dict) else {"path": data["source"]}
    if "path" not in source:
        raise ValueError(f"source.path is missing in {str(path)!r}")
    source["path"] = resolve(source["path"])
    data["source"] = _section(SourceConfig, source, "source")
    data["workdir"] = resolve(data["workdir"])
    data["windows"] = _section(WindowConfig, data.get("windows"), "windows")
    data["gates"] = _section(PromotionGates, data.get("gates"), "gates")
    train = data.get("train") or {}
    if not isinstance(train, dict):
        raise ValueError(f"train must be a mapping in {str(path)!r}, got {train!r}")
    data["train"] = train
    spec = data.get("spec")
    if spec is not None and (str(spec).endswith((".yaml", ".yml"))):
        data["spec"] = str(resolve(spec))
    return PipelineConfig(**data, path=path.resolve())
