"""Fit on a training window, then transform any frame (offline or one serving request) identically.

The fitted transform holds vocabularies (value -> id, 0 reserved for out-of-vocabulary and null)
and numeric statistics. It is saved as JSON with a content hash and shipped inside the inference
artifact, so serving applies exactly the expressions training used: one implementation.

A fit reads its training rows through sufficient statistics that merge exactly (:class:`FitPartial`:
value counts, extremes, integer sums for mean and std), so fitting per block and merging (the Ray
engine, :mod:`features.ray_data`) gives the transform, content hash included, of one pass.

Model-ready columns: ``s_<feature>`` (Int64 ids; List(Int64) when multi-valued), ``d_<feature>``
(Float32, standardised), ``y_<task>`` (Float32 on the task's label scale, null if missing),
``position`` (Int64, clipped), plus the spec's keys and passthrough columns.

Example:
    >>> import polars as pl
    >>> from features.spec import load_spec
    >>> from features.synthetic import SynthConfig, generate_day
    >>> spec = load_spec("synthetic")
    >>> raw = generate_day(SynthConfig(users=20, items=50, requests_per_day=10, slate_size=5), 0)
    >>> fitted = FittedTransform.fit(raw.lazy(), spec)
    >>> fitted.transform(raw.lazy()).collect().height
    50
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import polars as pl
from polars.datatypes import DataTypeClass

from features.columns import Jagged
from features.moments import STREAM_APART, Moments, merge_moments, moment_partials
from features.quantiles import cut_points
from features.spec import DenseFeature, FeatureSpec, Source, SparseFeature, parse_spec

FORMAT_VERSION = 1
OOV = 0  # id of out-of-vocabulary and null values in every table


def sparse_col(name: str) -> str:
    return f"s_{name}"


def dense_col(name: str) -> str:
    return f"d_{name}"


def label_col(task: str) -> str:
    return f"y_{task}"


@dataclass(frozen=True)
class Vocab:
    """Raw values in id order; value ``values[i]`` has id ``i + 1``."""

    values: list[Any]

    @property
    def size(self) -> int:
        """Rows the embedding table needs (values plus the OOV id)."""
        return len(self.values) + 1


@dataclass(frozen=True)
class NumericStats:
    """Training-window statistics of a dense feature after its fill/clip/transform."""

    mean: float
    std: float
    min: float = 0.0
    max: float = 1.0


@dataclass(frozen=True)
class FittedTransform:
    """Vocabularies and statistics fitted on one training window, plus the spec they belong to."""

    spec: FeatureSpec
    vocabs: dict[str, Vocab]
    numeric: dict[str, NumericStats]
    window: dict[str, str] = field(default_factory=dict)  # {"start": iso, "end": iso} of the fit data
    rows: int = 0
    raw_types: dict[str, str] = field(default_factory=dict)  # raw input column -> int|float|str|list[...]
    boundaries: dict[str, list[float]] = field(default_factory=dict)  # quantile features -> cut points
    polars_version: str = ""  # hashed ids depend on polars' hash; checked at load

    # ------------------------------------------------------------------ fit
    @classmethod
    def fit(cls, lf: pl.LazyFrame, spec: FeatureSpec) -> FittedTransform:
        """Fit vocabularies (by ``min_count``, most frequent first) and numeric statistics.

        The sufficient statistics (:class:`FitPartial`) are computed over the whole frame in one
        streaming query each; the Ray engine computes the same ones per block and merges them,
        which gives the identical transform (see :class:`FitPartial`).
        """
        schema = lf.collect_schema()
        raw_types = raw_input_types(schema, spec)
        boundaries = {f.name: _fit_boundaries(lf, f) for f in spec.sparse if f.quantiles}
        return cls.from_partial(FitPartial.of(lf, spec), spec, raw_types, boundaries)

    @classmethod
    def from_partial(
        cls, partial: FitPartial, spec: FeatureSpec, raw_types: dict[str, str], boundaries: dict[str, list[float]]
    ) -> FittedTransform:
        """The transform that the (merged) statistics of the training rows determine.

        Args:
            partial: the sufficient statistics of every training row (:meth:`FitPartial.merge` of
                per-block ones, or :meth:`FitPartial.of` of the whole frame).
            raw_types: :func:`raw_input_types` of the training rows' schema.
            boundaries: quantile feature -> its cut points (:func:`cut_points`).
        """
        row = partial.extremes.row(0, named=True)
        moments = Moments.of(partial.moments)
        return cls(
            spec=spec,
            vocabs={f.name: _vocab(partial.vocab_counts[f.name], f) for f in _vocab_features(spec)},
            numeric={d.name: _stats(row, moments.get(d.name, Moments.EMPTY), d.name) for d in spec.dense},
            window={"start": str(row["__start"]), "end": str(row["__end"])} if "__start" in row else {},
            rows=int(row["__rows"]),
            raw_types=raw_types,
            boundaries=boundaries,
            polars_version=pl.__version__ if any(f.hash_buckets for f in spec.sparse) else "",
        )

    def table_size(self, name: str) -> int:
        """Embedding rows feature ``name`` needs, the id 0 (out-of-vocabulary / null) included."""
        f = next(f for f in self.spec.sparse if f.name == name)
        if f.hash_buckets:
            return f.hash_buckets + 1
        if f.quantiles:
            return len(self.boundaries[name]) + 2  # below the first cut, ..., above the last, plus 0
        return self.vocabs[name].size

    # ------------------------------------------------------------ transform
    def expressions(self) -> list[pl.Expr]:
        """Polars expressions from raw columns to model-ready columns (keys not included)."""
        spec = self.spec
        exprs: list[pl.Expr] = []
        for f in spec.sparse:
            exprs.append(self._encode(f).alias(sparse_col(f.name)))
        for d in spec.dense:
            exprs.append(_scaled(d, self.numeric[d.name]).cast(pl.Float32).alias(dense_col(d.name)))
        if spec.position is not None:
            p = spec.position
            pos = pl.col(p.column).cast(pl.Int64).clip(0, p.max_position).fill_null(0)
            if p.cross is not None:  # bucket = position + (max_position + 1) * id of the crossed feature
                cross = next(f for f in spec.sparse if f.name == p.cross)
                pos = pos + (p.max_position + 1) * self._encode(cross).cast(pl.Int64)
            exprs.append(pos.alias("position"))
        return exprs

    def position_buckets(self) -> int:
        """Distinct values of the model-ready ``position`` column (0 when the spec has no position).

        ``max_position + 1`` positions, times the crossed feature's table size when ``position.cross``
        is set.
        """
        p = self.spec.position
        if p is None:
            return 0
        return (p.max_position + 1) * (self.table_size(p.cross) if p.cross is not None else 1)

    def label_expressions(self) -> list[pl.Expr]:
        return label_expressions(self.spec)

    def transform(self, lf: pl.LazyFrame, with_labels: bool = True) -> pl.LazyFrame:
        """Raw impressions -> model-ready rows (keys, features, labels, passthrough)."""
        return lf.select(self.transform_exprs(lf.collect_schema().names(), with_labels))

    def transform_exprs(self, columns: Sequence[str], with_labels: bool = True) -> list[pl.Expr]:
        """The ``select`` of :meth:`transform` for frames with these raw columns: built once, it can be
        applied to many frames (the Ray engine's blocks) without rebuilding the vocabularies' enums."""
        spec = self.spec
        names = set(columns)
        passthrough = [pl.col(c) for c in spec.passthrough if c in names]
        exprs = [pl.col(k) for k in spec.keys.present()] + self.expressions()
        if with_labels:
            exprs += self.label_expressions()
        return exprs + passthrough

    def transform_request(
        self,
        user: dict[str, Any],
        context: dict[str, Any],
        candidates: dict[str, pl.Series | list[Any]],
    ) -> pl.DataFrame:
        """One serving request -> model-ready candidate rows, with no per-candidate Python loop.

        User and context values are given once and broadcast to every candidate; candidate
        features are columns. The same expressions as :meth:`transform` are applied.

        Raises:
            ValueError: a required feature is missing or columns have different lengths.
        """
        return self._request_rows(user, context, candidates).lazy().select(self._serving_expressions).collect()

    def transform_requests(
        self, requests: list[tuple[dict[str, Any], dict[str, Any], dict[str, pl.Series | list[Any]]]]
    ) -> pl.DataFrame:
        """Several requests -> their model-ready rows, stacked in order, in one Polars query.

        Row for row equal to concatenating :meth:`transform_request` of each request (every
        expression works row by row); what the serving batcher runs.

        Raises:
            ValueError: as :meth:`transform_request`, for the first request that breaks the contract.
        """
        raw = pl.concat([self._request_rows(u, c, cands) for u, c, cands in requests], how="vertical")
        return raw.lazy().select(self._serving_expressions).collect()

    def _request_rows(
        self,
        user: dict[str, Any],
        context: dict[str, Any],
        candidates: dict[str, pl.Series | list[Any]],
    ) -> pl.DataFrame:
        """The raw columns of one request, user and context broadcast to every candidate."""
        spec = self.spec
        lengths = {k: len(v) for k, v in candidates.items()}
        n = next(iter(lengths.values()), 0)
        for k, ln in lengths.items():
            if ln != n:
                raise ValueError(f"candidate column {k!r} has {ln} values, expected {n}")
        cols: dict[str, pl.Series] = {}
        once: tuple[tuple[Source, dict[str, Any]], ...] = (("user", user), ("context", context))
        for source, given in once:
            for c in spec.features_from(source):
                if c not in given:
                    raise ValueError(f"missing {source} feature {c!r}")
        for c in spec.features_from("item"):
            if c not in candidates:
                raise ValueError(f"missing candidate feature {c!r}")
            cols[c] = self._typed(c, candidates[c])
        for source, given in once:
            for c in spec.features_from(source):
                cols[c] = self._typed(c, [given[c]]).new_from_index(0, n)  # (n,) one value repeated
        return pl.DataFrame(cols, height=n)

    def _typed(self, column: str, values: pl.Series | list[Any]) -> pl.Series:
        """Values of one raw column in the dtype seen at fit time; a mismatch names the column."""
        kind = self.raw_types[column]
        if isinstance(values, Jagged):
            values = values.to_series()
        try:
            return pl.Series(column, values, strict=False).cast(_DTYPES[kind], strict=True)
        except (pl.exceptions.PolarsError, TypeError, ValueError, OverflowError) as e:
            first = values[0] if len(values) else None
            raise ValueError(f"feature {column!r} expects {kind} values, got {first!r}") from e

    @cached_property
    def columns_by_source(self) -> dict[str, list[str]]:
        """Raw input columns per source (``user``, ``context``, ``item``), computed once per transform."""
        return {s: self.spec.features_from(s) for s in ("user", "context", "item")}

    def expressions_without_position(self) -> list[pl.Expr]:
        """Serving inputs: position is a training-only signal and never reaches the scorer."""
        return [e for e in self.expressions() if e.meta.output_name() != "position"]

    @cached_property
    def _serving_expressions(self) -> list[pl.Expr]:
        # Built once per fitted transform: each vocabulary becomes a pl.Enum of all its values,
        # milliseconds per request for vocabularies of thousands of ids if rebuilt every time.
        return self.expressions_without_position()

    def _encode(self, f: SparseFeature) -> pl.Expr:
        """Raw value -> id (1..n, 0 for unseen and null) by the feature's id rule."""
        if f.quantiles:
            x = pl.col(f.raw).cast(pl.Float64)
            above = pl.sum_horizontal([(x > b).cast(pl.Int64) for b in self.boundaries[f.name]])
            return pl.when(x.is_null() | x.is_nan()).then(pl.lit(OOV, pl.Int64)).otherwise(above + 1)
        if f.hash_buckets:
            n = f.hash_buckets
            if f.multi:
                return pl.col(f.raw).list.head(f.max_len).list.eval(_hash_id(pl.element(), n))
            return _hash_id(pl.col(f.raw), n)
        # Vocabulary: a cast to an Enum of the values (its physical code is the index) runs in the
        # streaming engine in bounded memory; a lookup-table ``replace_strict`` would not.
        enum = pl.Enum([str(v) for v in self.vocabs[f.name].values])
        if f.multi:
            lists = pl.col(f.raw).list.head(f.max_len).cast(pl.List(pl.String))
            return lists.cast(pl.List(enum), strict=False).list.eval(
                pl.element().to_physical().cast(pl.Int64).fill_null(OOV - 1) + 1
            )
        codes = _raw_value(f).cast(enum, strict=False).to_physical().cast(pl.Int64)
        return (codes + 1).fill_null(OOV)

    # ----------------------------------------------------------- save/load
    def to_dict(self) -> dict[str, Any]:
        body = {
            "format_version": FORMAT_VERSION,
            "spec": self.spec.model_dump(mode="json"),
            "vocabs": {k: v.values for k, v in self.vocabs.items()},
            "numeric": {k: asdict(v) for k, v in self.numeric.items()},
            "window": self.window,
            "rows": self.rows,
            "raw_types": self.raw_types,
            "boundaries": self.boundaries,
            "polars_version": self.polars_version,
        }
        body["content_hash"] = _hash(body)
        return body

    @property
    def content_hash(self) -> str:
        return str(self.to_dict()["content_hash"])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), sort_keys=True))
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FittedTransform:
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported fitted transform format_version {data.get('format_version')!r}")
        expected = data.get("content_hash")
        if expected is not None and _hash({k: v for k, v in data.items() if k != "content_hash"}) != expected:
            raise ValueError(f"fitted transform content_hash mismatch (file says {expected!r})")
        hashed_with = data.get("polars_version", "")
        if hashed_with and hashed_with.split(".")[:2] != pl.__version__.split(".")[:2]:
            raise ValueError(
                f"fitted transform hashes ids with polars {hashed_with}, this is polars {pl.__version__}: "
                "hash values may differ; refit the transform or install the same polars"
            )
        return cls(
            spec=parse_spec(data["spec"], origin="fitted transform"),
            vocabs={k: Vocab(list(v)) for k, v in data["vocabs"].items()},
            numeric={k: NumericStats(**v) for k, v in data["numeric"].items()},
            window=dict(data.get("window", {})),
            rows=int(data.get("rows", 0)),
            raw_types=dict(data.get("raw_types", {})),
            boundaries={k: [float(x) for x in v] for k, v in data.get("boundaries", {}).items()},
            polars_version=hashed_with,
        )

    @classmethod
    def load(cls, path: str | Path) -> FittedTransform:
        """Read a saved transform; a file that is not one is a ``ValueError`` naming the file."""
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"fitted transform {str(path)!r} is not valid JSON: {e}") from e
        except (ValueError, KeyError, TypeError) as e:  # a wrong format, hash or field
            raise ValueError(f"fitted transform {str(path)!r}: {type(e).__name__}: {e}") from e


def _hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


_DTYPES: dict[str, pl.DataType] = {
    "int": pl.Int64(),
    "float": pl.Float64(),
    "str": pl.String(),
    "list[int]": pl.List(pl.Int64),
    "list[str]": pl.List(pl.String),
}


def _kind(dtype: pl.DataType | DataTypeClass) -> str:  # a List's inner type may be either
    if isinstance(dtype, pl.List):
        inner = _kind(dtype.inner)
        if inner not in ("int", "str"):
            raise ValueError(f"list columns must hold ints or strings, got {dtype}")
        return f"list[{inner}]"
    if dtype.is_integer():
        return "int"
    if dtype.is_float():
        return "float"
    if dtype == pl.String or dtype == pl.Categorical:
        return "str"
    raise ValueError(f"unsupported raw column dtype {dtype}")


def _dense_pre(d: DenseFeature) -> pl.Expr:
    """Fill, clip and transform a raw numeric column (before scaling)."""
    x = pl.col(d.raw).cast(pl.Float64)
    if d.fill_null is not None:
        x = x.fill_null(d.fill_null)
    if d.clip_min is not None or d.clip_max is not None:
        x = x.clip(lower_bound=d.clip_min, upper_bound=d.clip_max)
    if d.transform == "log1p":
        x = x.clip(lower_bound=0.0).log1p()
    return x


def _scaled(d: DenseFeature, st: NumericStats) -> pl.Expr:
    """Scale with training statistics; missing values land on 0 (the mean, or the minimum)."""
    x = _dense_pre(d)
    if d.scale == "standard":
        x = (x - st.mean) / (st.std or 1.0)
    elif d.scale == "minmax":
        x = (x - st.min) / ((st.max - st.min) or 1.0)
    return x.fill_null(0.0).fill_nan(0.0)


def _stats(row: dict[str, Any], m: Moments, name: str) -> NumericStats:
    """One dense feature's statistics: mean and std from its exact sums, min and max from the extremes."""

    def get(value: float | None, default: float) -> float:
        return default if value is None else float(value)

    return NumericStats(mean=get(m.mean(), 0.0), std=get(m.std(), 1.0), min=get(row[f"{name}.min"], 0.0),
                        max=get(row[f"{name}.max"], 1.0))


def _raw_value(f: SparseFeature) -> pl.Expr:
    """The string a single-valued feature's id is looked up by (a cross joins its columns)."""
    if f.cross:
        return pl.concat_str([pl.col(c).cast(pl.String).fill_null("") for c in f.cross], separator="\x1f")
    return pl.col(f.raw).cast(pl.String)


def _hash_id(x: pl.Expr, buckets: int) -> pl.Expr:
    h = (x.cast(pl.String).hash(seed=0) % buckets).cast(pl.Int64) + 1
    return pl.when(x.is_null()).then(pl.lit(OOV, pl.Int64)).otherwise(h)


def label_expressions(spec: FeatureSpec) -> list[pl.Expr]:
    """Raw label columns -> model-ready ``y_<task>`` (Float32; thresholded, log1p where the task says)."""
    out = []
    for t in spec.tasks:
        y = pl.col(t.label).cast(pl.Float32)
        if t.threshold is not None:
            y = (y > t.threshold).cast(pl.Float32)
        if t.label_transform == "log1p":
            y = y.clip(lower_bound=0.0).log1p()
        out.append(y.alias(label_col(t.name)))
    return out


def raw_input_types(schema: pl.Schema, spec: FeatureSpec) -> dict[str, str]:
    """Raw input column -> its kind (``int``, ``float``, ``str``, ``list[...]``), checked against the spec.

    Raises:
        ValueError: a column the spec reads is missing or of an unsupported type, or a cross
            combines list columns.
    """
    inputs = list(dict.fromkeys([c for f in spec.sparse for c in f.inputs] + [d.raw for d in spec.dense]))
    missing = [c for c in inputs if c not in schema]
    if missing:
        raise ValueError(f"input lacks column(s) {missing} that the {spec.name!r} spec reads")
    raw_types = {c: _kind(schema[c]) for c in inputs}
    for f in spec.sparse:
        lists = [c for c in f.cross if raw_types[c].startswith("list")]
        if lists:
            raise ValueError(f"cross {f.name!r}: column(s) {lists} are lists; crosses take single values")
    return raw_types


def _vocab_features(spec: FeatureSpec) -> list[SparseFeature]:
    return [f for f in spec.sparse if not (f.hash_buckets or f.quantiles)]


def _vocab_counts(lf: pl.LazyFrame, f: SparseFeature) -> pl.LazyFrame:
    """Every non-null value of a vocabulary feature with its count (before ``min_count``)."""
    col = _raw_value(f) if f.cross else pl.col(f.raw)
    if f.multi:
        col = col.list.head(f.max_len).explode()
    return lf.select(col.alias("v")).drop_nulls().group_by("v").agg(pl.len().cast(pl.Int64).alias("n"))


def _vocab(counts: pl.DataFrame, f: SparseFeature) -> Vocab:
    """The vocabulary of merged value counts: values seen ``min_count`` times, in the spec's id order."""
    kept = counts.filter(pl.col("n") >= f.min_count)
    # "sorted": byte order for strings (polars sorts UTF-8 lexicographically), numeric order otherwise
    by = ("v", False) if f.vocab_order == "sorted" else (["n", "v"], [True, False])
    return Vocab(kept.sort(by[0], descending=by[1])["v"].to_list())


@dataclass(frozen=True)
class FitPartial:
    """The sufficient statistics of a fit over some training rows, exactly mergeable across blocks.

    ``vocab_counts``: vocabulary feature -> frame ``(v, n)`` of its values and their counts (no
    ``min_count`` yet: a value rare in every block may be common overall); ``moments``:
    :func:`moment_partials` of the dense features after fill/clip/transform; ``extremes``: one row of
    ``__rows``, each dense feature's ``<name>.min`` / ``<name>.max`` and the timestamp key's
    ``__start`` / ``__end``. Counts and integer sums add, extremes take the min/max, so the
    :meth:`merge` of the partials of any blocking of the rows equals the partial of all of them, and
    :meth:`FittedTransform.from_partial` gives the same transform, content hash included.

    Quantile cut points are not here: they need the sorted values, which no small partial holds
    (the Polars engine asks Polars for them; the Ray engine selects them exactly by radix, in
    :mod:`features.ray_data`).
    """

    vocab_counts: dict[str, pl.DataFrame]
    moments: pl.DataFrame
    extremes: pl.DataFrame

    @classmethod
    def of(cls, lf: pl.LazyFrame, spec: FeatureSpec) -> FitPartial:
        """The statistics of every row of ``lf`` (streaming queries, run together)."""
        extremes = [pl.len().cast(pl.Int64).alias("__rows")]
        for d in spec.dense:
            x = _dense_pre(d)
            extremes += [x.min().alias(f"{d.name}.min"), x.max().alias(f"{d.name}.max")]
        if spec.keys.timestamp is not None:
            ts = pl.col(spec.keys.timestamp)
            extremes += [ts.min().alias("__start"), ts.max().alias("__end")]
        vocab = _vocab_features(spec)
        queries = [_vocab_counts(lf, f) for f in vocab]
        queries += [moment_partials(lf, {d.name: _dense_pre(d) for d in spec.dense}), lf.select(extremes)]
        *counts, moments, ext = pl.collect_all(queries, engine="streaming", optimizations=STREAM_APART)
        return cls({f.name: c for f, c in zip(vocab, counts, strict=True)}, moments, ext)

    @classmethod
    def merge(cls, parts: list[FitPartial]) -> FitPartial:
        """One partial for the union of the parts' rows (associative and order-free)."""
        if len(parts) == 1:
            return parts[0]
        counts = {
            name: pl.concat([p.vocab_counts[name] for p in parts], how="vertical")
            .group_by("v").agg(pl.col("n").sum())
            for name in parts[0].vocab_counts
        }
        whole = pl.concat([p.extremes for p in parts], how="vertical")

        def combine(c: str) -> pl.Expr:
            if c == "__rows":
                return pl.col(c).sum()
            return pl.col(c).max() if c.endswith((".max", "__end")) else pl.col(c).min()

        return cls(counts, merge_moments([p.moments for p in parts]), whole.select(combine(c) for c in whole.columns))


def _fit_boundaries(lf: pl.LazyFrame, f: SparseFeature) -> list[float]:
    """Distinct training quantiles cutting the column into (at most) ``f.quantiles`` buckets."""
    n = f.quantiles or 2
    x = pl.col(f.raw).cast(pl.Float64)
    qs = [i / n for i in range(1, n)]
    row = lf.select([x.quantile(q).alias(str(i)) for i, q in enumerate(qs)]).collect(engine="streaming").row(0)
    return cut_points(list(row))
