"""The pipeline's configuration: one YAML file per pipeline, typed into frozen pydantic models.

A file names the source of raw impressions, the windows (training, validation, holdout), the
training recipe, the promotion gates and where the state and the MLflow store live. It is typed
with pydantic like the feature spec: an unknown key or a wrong value is one error line naming the
field (``invalid pipeline config 'p.yaml': field 'windows.holdout_days': Input should be greater
than or equal to 1 (got 0)``). Relative
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
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.train_config import error_line, train_section

CONFIG_DIR = Path(__file__).parent / "configs"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Section(BaseModel):
    """A typed part of the file: unknown keys and wrong types are errors naming the field."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class SourceConfig(_Section):
    """Where raw impressions come from.

    ``dataset`` picks the adapter (``synthetic`` reads a folder of Parquet, date-partitioned or
    not; ``kuairand`` reads the published KuaiRand files). ``synthesize`` (synthetic only) writes
    that many days of the generator's log into ``path`` when it holds none: a stand-in for the
    upstream job that lands a partition every day.
    """

    path: Path
    dataset: str = "synthetic"
    synthesize: dict[str, Any] = Field(default_factory=dict)


class WindowConfig(_Section):
    """Days, counted back from the as-of date: ``[... train ...][validation][holdout]``.

    The holdout days are never trained on: challenger and champion are compared there. The
    validation days pick the challenger's best epoch. ``train_days`` = 0 uses every day available.
    """

    train_days: Annotated[int, Field(ge=0)] = 0
    validation_days: Annotated[int, Field(ge=1)] = 1
    holdout_days: Annotated[int, Field(ge=1)] = 1


PromotionMetric = Literal["auc", "gauc", "r2"]  # higher is better, each


class PromotionGates(_Section):
    """When a challenger may replace the champion, both scored on the same holdout rows.

    - ``primary``: the task whose metric must be at least the champion's plus ``primary_min_gain``.
    - ``max_drop``: no task's metric may fall more than this below the champion's.
    - Metrics: ``binary_metric`` for binary tasks and ``regression_metric`` for regression tasks;
      both must be higher-is-better (auc, gauc, r2).
    """

    primary: str = "click"
    primary_min_gain: float = 0.0
    max_drop: Annotated[float, Field(ge=0)] = 0.005
    binary_metric: PromotionMetric = "auc"
    regression_metric: PromotionMetric = "r2"


class PipelineConfig(_Section):
    """Everything one scheduled pipeline needs (see ``pipelines/configs/*.yaml``).

    ``train`` holds :class:`pipelines.train_config.TrainConfig` fields (``model``, ``epochs``, ``lr``,
    ``accelerator``, ``devices``, ``num_nodes``, ``strategy``, ...) and an optional ``model_config``
    mapping of model-shape fields, typed by the schema ``ranker train --config`` uses
    (:func:`pipelines.train_config.train_section`: only the fields given, coerced); ``warm_start``
    initialises the challenger from the champion's weights (embedding rows matched by raw id
    across the two vocabularies).
    """

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]  # letters, digits, '_', '.', '-'
    source: SourceConfig
    workdir: Path
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI or the project's .mlflow/ sqlite store
    experiment: str = "ranker-pipeline"
    model_name: str = "ranker"
    alias: str = "champion"
    spec: str | None = None  # feature spec name or YAML path; None = the dataset's own
    windows: WindowConfig = WindowConfig()  # frozen: one shared default is safe
    train: dict[str, Any] = Field(default_factory=dict)
    warm_start: bool = False
    gates: PromotionGates = PromotionGates()
    path: Path | None = None  # the file this came from

    def to_dict(self) -> dict[str, Any]:
        """The effective configuration as JSON values (paths as strings), without ``path``."""
        return self.model_dump(mode="json", exclude={"path"})

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
    if "path" in data:
        raise ValueError(f"invalid pipeline config {str(path)!r}: field 'path': set by the loader, not in the file")
    data.update({k: v for k, v in overrides.items() if v is not None})
    base = Path.cwd()

    def resolve(p: Any) -> Any:
        if not isinstance(p, str | Path):
            return p  # the schema names the field and its type
        p = Path(p)
        return p if p.is_absolute() else (base / p).resolve()

    if isinstance(data.get("source"), str | Path):
        data["source"] = {"path": data["source"]}
    if isinstance(data.get("source"), dict) and "path" in data["source"]:
        data["source"] = {**data["source"], "path": resolve(data["source"]["path"])}
    if "workdir" in data:
        data["workdir"] = resolve(data["workdir"])
    for section in ("source", "windows", "gates", "train"):
        if section in data and data[section] is None:
            del data[section]  # an empty section in YAML is not given: the defaults (source has none)
    spec = data.get("spec")
    if isinstance(spec, str) and spec.endswith((".yaml", ".yml")):
        data["spec"] = str(resolve(spec))
    where = f"pipeline config {str(path)!r}"
    try:
        cfg = PipelineConfig.model_validate({**data, "path": path.resolve()})
    except ValidationError as e:
        raise ValueError(error_line(where, e)) from None
    # The train: section through the same schema as `ranker train --config` (typed, only what is given).
    fields, model = train_section(cfg.train, where, pipeline=True, prefix="train.")
    return cfg.model_copy(update={"train": {**fields, **({"model_config": model} if model else {})}})
