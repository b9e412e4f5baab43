"""The feature spec: one declarative file per dataset says what every column is.

Everything downstream (embedding tables, towers, metrics, serving decode, response fields)
derives from it; nothing repeats it.

Example:
    >>> spec = load_spec("synthetic")
    >>> [t.name for t in spec.tasks]
    ['click', 'watch_time', 'like', 'dismiss']
"""

from __future__ import annotations

from datetime import date
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Source = Literal["user", "context", "item"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Keys(_Frozen):
    """Columns that identify an impression; none of them is a model input by itself.

    Any key may be ``null`` for datasets without it (census-income has no requests or items).
    """

    request: str | None = "request_id"
    user: str | None = "user_id"
    item: str | None = "item_id"
    timestamp: str | None = "ts"

    def present(self) -> list[str]:
        return [k for k in (self.request, self.user, self.item, self.timestamp) if k is not None]


class SparseFeature(_Frozen):
    """A categorical id (single-valued) or a list of ids (multi-valued, pooled).

    Ids come from one of: a vocabulary fitted on training rows (default; ``min_count``,
    ``vocab_order``), hashing into ``hash_buckets`` (no vocabulary, for high-cardinality ids),
    training-quantile buckets of a numeric column (``quantiles``), or a vocabulary over the
    combination of other features' raw columns (``cross``). Id 0 is always out-of-vocabulary / null.
    """

    name: str
    source: Source
    column: str | None = None  # raw column; defaults to `name`
    multi: bool = False
    pooling: Literal["sum", "mean"] = "sum"
    max_len: int = Field(default=8, ge=1)  # multi-valued lists are truncated to this length
    min_count: int = Field(default=1, ge=1)  # rarer values map to the out-of-vocabulary id 0
    vocab_order: Literal["frequency", "sorted"] = "frequency"  # id order: most frequent, or sorted values
    hash_buckets: int | None = Field(default=None, ge=1)  # hash ids into this many buckets instead
    quantiles: int | None = Field(default=None, ge=2)  # bucketize a numeric column by training quantiles
    cross: tuple[str, ...] = ()  # raw columns (of other declared features) whose combination is the id
    embedding_dim: int = Field(default=16, ge=1)

    @model_validator(mode="after")
    def _one_id_rule(self) -> SparseFeature:
        rules = [n for n, on in (("hash_buckets", self.hash_buckets), ("quantiles", self.quantiles),
                                 ("cross", self.cross)) if on]
        if len(rules) > 1:
            raise ValueError(f"feature {self.name!r}: choose one of {rules}")
        if self.cross and (self.multi or len(self.cross) < 2):
            raise ValueError(f"feature {self.name!r}: a cross needs >= 2 single-valued columns")
        if self.quantiles and self.multi:
            raise ValueError(f"feature {self.name!r}: quantile buckets apply to a single numeric column")
        return self

    @property
    def raw(self) -> str:
        return self.column or self.name

    @property
    def inputs(self) -> list[str]:
        """Raw columns this feature reads."""
        return list(self.cross) if self.cross else [self.raw]


class DenseFeature(_Frozen):
    """A numeric input; `transform` is applied before standardisation with training statistics."""

    name: str
    source: Source
    column: str | None = None
    fill_null: float | None = None  # value for missing entries, before the transform
    clip_min: float | None = None
    clip_max: float | None = None
    transform: Literal["none", "log1p"] = "none"
    scale: Literal["standard", "minmax", "none"] = "standard"  # with training-window statistics
    valid_min: float | None = None  # raw values below this are quarantined (e.g. negative durations)

    @property
    def raw(self) -> str:
        return self.column or self.name


class Position(_Frozen):
    """Display position (0 = top); used by the position-bias tower in training only."""

    column: str = "position"
    max_position: int = Field(default=31, ge=1)  # larger positions share the last bucket
    # a single-valued sparse feature (e.g. device) crossed with position: one bias per (position, value)
    cross: str | None = None


class Task(_Frozen):
    """One prediction objective."""

    name: str
    type: Literal["binary", "regression"]
    label: str  # raw label column
    threshold: float | None = None  # binary tasks: label = raw > threshold (e.g. watch time > 30 s)
    label_transform: Literal["none", "log1p"] = "none"  # regression target scale
    group: Literal["engagement", "satisfaction"]
    loss_weight: float = Field(default=1.0, ge=0.0)
    serving_weight: float = Field(default=1.0, ge=0.0)
    higher_is_better: bool = True  # False (e.g. dismiss): the combined score subtracts it


class Split(_Frozen):
    """How rows are assigned to train / val / test.

    * ``last_days``: the last ``validation_days`` days of the window are validation, no test;
    * ``dates``: train up to ``train_end``, val up to ``val_end``, the rest test (inclusive dates);
    * ``column``: the adapter wrote the split name (train / val / test) into ``column``.

    Dates are read from ``date_column`` (a Date column) or else the timestamp key.
    """

    kind: Literal["last_days", "dates", "column"] = "last_days"
    validation_days: int = Field(default=1, ge=1)
    train_end: date | None = None
    val_end: date | None = None
    column: str = "split"
    date_column: str | None = None

    @model_validator(mode="after")
    def _dates(self) -> Split:
        if self.kind == "dates":
            if self.train_end is None or self.val_end is None:
                raise ValueError("split kind 'dates' needs train_end and val_end")
            if self.val_end < self.train_end:
                raise ValueError(f"val_end {self.val_end} is before train_end {self.train_end}")
        return self


class Validation(_Frozen):
    """Row-level contract; rows that break it are quarantined with a reason."""

    unique: tuple[str, ...] = ()  # columns that together identify an impression (duplicates quarantined)
    required: tuple[str, ...] = ()  # extra columns that must not be null (keys and labels always are)
    max_bad_fraction: float = Field(default=0.5, ge=0.0, le=1.0)  # above this the build fails


class FeatureSpec(_Frozen):
    """The whole declaration for one dataset."""

    name: str
    keys: Keys = Keys()
    sparse: tuple[SparseFeature, ...]
    dense: tuple[DenseFeature, ...] = ()
    position: Position | None = Position()
    tasks: tuple[Task, ...]
    passthrough: tuple[str, ...] = ()  # carried to model-ready data untouched (e.g. true relevance)
    split: Split = Split()
    validation: Validation = Validation()

    @model_validator(mode="after")
    def _crosses_name_declared_columns(self) -> FeatureSpec:
        declared = {f.raw for f in self.sparse if not f.cross} | {d.raw for d in self.dense}
        for f in self.sparse:
            missing = [c for c in f.cross if c not in declared]
            if missing:
                raise ValueError(f"cross {f.name!r} uses {missing}, which no other feature declares")
        return self

    @model_validator(mode="after")
    def _position_cross_is_a_single_valued_feature(self) -> FeatureSpec:
        if self.position is None or self.position.cross is None:
            return self
        found = next((f for f in self.sparse if f.name == self.position.cross), None)
        if found is None:
            raise ValueError(f"position.cross {self.position.cross!r} names no sparse feature")
        if found.multi:
            raise ValueError(f"position.cross {self.position.cross!r} is multi-valued; it must be single-valued")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> FeatureSpec:
        for kind, names in (
            ("feature", [f.name for f in self.sparse] + [f.name for f in self.dense]),
            ("task", [t.name for t in self.tasks]),
        ):
            seen: set[str] = set()
            for n in names:
                if n in seen:
                    raise ValueError(f"duplicate {kind} name {n!r}")
                seen.add(n)
        if not self.tasks:
            raise ValueError("a spec needs at least one task")
        return self

    def features_from(self, source: Source) -> list[str]:
        """Raw input columns that come from one source (user, context or item)."""
        cols = [f.raw for f in self.sparse if f.source == source and not f.cross]
        cols += [f.raw for f in self.dense if f.source == source]
        return list(dict.fromkeys(cols))

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"unknown task {name!r}; known: {[t.name for t in self.tasks]}")


def load_spec(name_or_path: str | Path) -> FeatureSpec:
    """Load a spec by bundled dataset name (``"synthetic"``) or from a YAML file path.

    Raises:
        ValueError: the file does not exist or breaks the schema; the message names the field.
    """
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"}:
        if not path.is_file():
            raise ValueError(f"spec file not found: {str(path)!r}")
        text = path.read_text()
    else:
        res = resources.files("features") / "specs" / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ValueError(f"unknown dataset spec {str(name_or_path)!r}")
        text = res.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ValueError(f"spec file {str(name_or_path)!r} is not valid YAML: {where}"
                         f"{getattr(e, 'problem', None) or e}") from e
    return parse_spec(data, origin=str(name_or_path))


def parse_spec(data: object, origin: str = "<dict>") -> FeatureSpec:
    """Validate a spec dict; errors name the offending field and value."""
    try:
        return FeatureSpec.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ValueError(
            f"invalid feature spec {origin}: field {loc!r}: {first['msg']} (got {first.get('input')!r})"
        ) from None
