"""The serving plan: a fitted transform compiled, once per loaded model, into array operations.

:class:`FittedTransform` stays the one definition of the features (its Polars expressions
transform every training and evaluation row). Serving cannot afford a DataFrame per request, so
:meth:`ServingPlan.from_fitted` derives from the same fitted state, at load time, everything a
request needs as plain numpy: a sorted lookup table per vocabulary (ints, strings), the quantile
cut points, the dense formulas with their statistics. :meth:`ServingPlan.encode` then turns a
batch of decoded requests straight into model inputs, with no Polars frame, no padding and no
Python loop per candidate (a loop per request and per feature remains).

User- and context-sourced features are encoded once per request, not once per candidate: the
model looks their embeddings up once and broadcasts them (``ranking.fused``). A feature is
request-side when every raw column it reads is user- or context-sourced.

Equality with the reference transform, value for value, is what ``tests/features/test_plan.py``
checks, on random rows and on real KuaiRand and census rows.

Shape letters: R requests in a batch, N candidates of all of them, L entries of a jagged column.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import polars as pl

from features.columns import Jagged
from features.fitted import OOV, FittedTransform, NumericStats
from features.spec import DenseFeature, SparseFeature

Side = Literal["request", "item"]
RawRequest = tuple[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]]  # user, context, candidates
_CROSS_SEP = "\x1f"
DIRECT_MAX = 1 << 23  # largest int id range held as a direct lookup table (64 MiB of int64)


@dataclass(frozen=True)
class Col:
    """One raw column, normalised: values plus a null mask (None when nothing is null).

    ``values``: int64 or float64 ndarray for numeric kinds, a numpy str array for strings.
    """

    values: np.ndarray
    null: np.ndarray | None = None


@dataclass(frozen=True)
class Lookup:
    """Raw value -> id (1..n, 0 = out of vocabulary) by binary search in the sorted values."""

    keys: np.ndarray  # (V,) sorted int64 or str
    ids: np.ndarray  # (V,) int64 id of keys[i]
    objects: bool  # some vocabulary value has a NUL character: compare as Python objects
    direct: np.ndarray | None = None  # ints in a compact range: id of value ``low + i`` at ``direct[i]``
    low: int = 0

    @classmethod
    def build(cls, values: Sequence[Any], kind: Literal["int", "str"]) -> Lookup:
        if kind == "int":
            keys = np.asarray(values, dtype=np.int64)
            objects = False
        else:
            strs = [str(v) for v in values]
            objects = "\x00" in "".join(strs)
            keys = np.array(strs, dtype=object if objects else str)
        if keys.size == 0:
            keys = keys.astype(np.int64 if kind == "int" else object)
        order = np.argsort(keys, kind="stable")
        direct, low = None, 0
        if kind == "int" and keys.size:
            low, span = int(keys.min()), int(keys.max()) - int(keys.min()) + 1
            if span <= min(DIRECT_MAX, 8 * keys.size + 65536):  # a gather beats a binary search
                direct = np.zeros(span, dtype=np.int64)  # OOV where no value sits
                direct[keys[order] - low] = order + 1
        return cls(keys=keys[order], ids=(order + 1).astype(np.int64), objects=objects, direct=direct, low=low)

    def __call__(self, query: np.ndarray) -> np.ndarray:
        """(n,) raw values -> (n,) int64 ids."""
        if self.keys.size == 0 or query.size == 0:
            return np.full(query.shape, OOV, dtype=np.int64)
        if self.direct is not None and query.dtype.kind in "iu":
            at = query.astype(np.int64, copy=False) - self.low
            inside = (at >= 0) & (at < self.direct.size)
            return np.where(inside, self.direct[np.where(inside, at, 0)], OOV)
        if query.dtype.kind == "U" and (self.objects or self.keys.dtype == object):
            query = query.astype(object)
        elif query.dtype == object and self.keys.dtype.kind == "U":
            # a string with a NUL (an object array keeps it) is in no vocabulary without NULs; the
            # others can take the fixed-width form, which would drop a trailing NUL
            nul = np.fromiter(("\x00" in v for v in query), dtype=bool, count=query.size)
            return np.where(nul, OOV, self(np.where(nul, "", query).astype(str)))
        pos = np.searchsorted(self.keys, query)
        np.minimum(pos, self.keys.size - 1, out=pos)
        hit = self.keys[pos] == query
        return np.where(hit, self.ids[pos], OOV).astype(np.int64, copy=False)


@dataclass(frozen=True)
class SparsePlan:
    """How one sparse feature's id is computed at serving."""

    feature: SparseFeature
    side: Side
    rule: Literal["vocab", "hash", "quantile", "cross"]
    kind: str  # raw type of the (first) input column
    lookup: Lookup | None = None
    cuts: np.ndarray | None = None  # quantile boundaries


@dataclass(frozen=True)
class DensePlan:
    """One dense feature's formula with its training statistics."""

    feature: DenseFeature
    side: Side
    stats: NumericStats


@dataclass
class EncodedBatch:
    """Model inputs of R requests, request-side features once per request.

    Attributes:
        sizes: (R,) candidates of each request; request ``r`` owns the next ``sizes[r]`` rows.
        request_ids: request-side single-valued sparse features -> (R,) int64 ids.
        item_ids: item-side single-valued sparse features -> (N,) int64 ids.
        lists: multi-valued features -> :class:`Jagged` of int64 ids, one list per request
            (request-side) or per candidate (item-side), truncated to ``max_len``.
        request_dense: (R, Dr) float32, the plan's ``request_dense`` order.
        item_dense: (N, Di) float32, the plan's ``item_dense`` order.
    """

    sizes: np.ndarray
    request_ids: dict[str, np.ndarray]
    item_ids: dict[str, np.ndarray]
    lists: dict[str, Jagged]
    request_dense: np.ndarray
    item_dense: np.ndarray

    @property
    def n_candidates(self) -> int:
        return int(self.sizes.sum())


class ServingPlan:
    """A fitted transform compiled into array operations (see the module docstring).

    Args:
        fitted: the loaded model's fitted transform.

    Example:
        >>> from features.spec import load_spec
        >>> from features.synthetic import SynthConfig, generate_day
        >>> raw = generate_day(SynthConfig(users=20, items=50, requests_per_day=10, slate_size=5), 0)
        >>> plan = ServingPlan.from_fitted(FittedTransform.fit(raw.lazy(), load_spec("synthetic")))
        >>> plan.request_sparse, plan.item_dense
        (['user_id', 'device', 'surface', 'hour'], ['duration_s', 'item_age_days'])
        >>> batch = plan.encode([({"user_id": 3}, {"device": "ios", "surface": "home", "hour": 20},
        ...                       {"item_id": np.array([1, 2]), "creator_id": np.array([5, 6]),
        ...                        "category": ["cat_1", "nope"], "tags": Jagged(["tag_1"], np.array([1, 0])),
        ...                        "duration_s": np.array([30.0, 60.0]), "item_age_days": np.array([1.0, 2.0])})])
        >>> batch.item_dense.shape, batch.lists["tags"].lengths.tolist(), int(batch.item_ids["category"][1])
        ((2, 2), [1, 0], 0)
    """

    def __init__(self, fitted: FittedTransform) -> None:
        spec = fitted.spec
        self.fitted = fitted
        self.raw_types = dict(fitted.raw_types)
        self.request_columns = [*spec.features_from("user"), *spec.features_from("context")]
        self.item_columns = spec.features_from("item")
        request = set(self.request_columns)
        self.sparse: list[SparsePlan] = []
        for f in spec.sparse:
            side: Side = "request" if all(c in request for c in f.inputs) else "item"
            kind = self.raw_types[f.inputs[0]]
            if f.quantiles:
                cuts = np.asarray(fitted.boundaries[f.name], dtype=np.float64)
                self.sparse.append(SparsePlan(f, side, "quantile", kind, cuts=cuts))
            elif f.hash_buckets:
                self.sparse.append(SparsePlan(f, side, "hash", kind))
            elif f.cross:
                lookup = Lookup.build(fitted.vocabs[f.name].values, "str")
                self.sparse.append(SparsePlan(f, side, "cross", kind, lookup))
            else:
                by: Literal["int", "str"] = "int" if kind in ("int", "list[int]") else "str"
                self.sparse.append(SparsePlan(f, side, "vocab", kind, Lookup.build(fitted.vocabs[f.name].values, by)))
        self.dense = [
            DensePlan(d, "request" if d.raw in request else "item", fitted.numeric[d.name]) for d in spec.dense
        ]
        # request-side vocabularies of int and str columns as dicts: R values of a batch are looked up
        # one by one, cheaper than building arrays for a binary search when R is a handful of requests
        self._scalar_ids: dict[str, dict[Any, int]] = {
            p.feature.name: dict(zip(p.lookup.keys.tolist(), p.lookup.ids.tolist(), strict=True))
            for p in self.sparse
            if p.side == "request" and p.rule == "vocab" and p.kind in ("int", "str") and p.lookup is not None
        }
        self.request_sparse = [p.feature.name for p in self.sparse if p.side == "request" and not p.feature.multi]
        self.item_sparse = [p.feature.name for p in self.sparse if p.side == "item" and not p.feature.multi]
        self.request_dense = [p.feature.name for p in self.dense if p.side == "request"]
        self.item_dense = [p.feature.name for p in self.dense if p.side == "item"]

    @classmethod
    def from_fitted(cls, fitted: FittedTransform) -> ServingPlan:
        return cls(fitted)

    def side(self, feature: str) -> Side:
        """Whether a sparse or dense feature is computed once per request or once per candidate."""
        for p in self.sparse:
            if p.feature.name == feature:
                return p.side
        for d in self.dense:
            if d.feature.name == feature:
                return d.side
        raise KeyError(f"unknown feature {feature!r}")

    # ------------------------------------------------------------------ encode
    def encode(self, requests: Sequence[RawRequest]) -> EncodedBatch:
        """Raw features of R requests (user, context once; candidates column-wise) -> model inputs.

        Args:
            requests: ``(user, context, candidates)`` per request. User and context map raw
                columns to one value each (a list for list columns); candidates map raw columns
                to C values: an ndarray, a list, or a :class:`Jagged` for list columns (a list of
                lists or a Polars list Series is converted). Python ``None`` is a null, as in a
                Parquet row.

        Returns:
            the :class:`EncodedBatch`.

        Raises:
            ValueError: a required raw column is missing, or candidate columns differ in length.
        """
        if not requests:
            raise ValueError("encode needs at least one request")
        sizes = np.array([_n_candidates(cands, self.item_columns) for _, _, cands in requests], dtype=np.int64)
        given: dict[str, list[Any]] = {}  # request column -> its R raw values
        for c in self.request_columns:
            values = []
            for user, context, _ in requests:
                src = user if c in user else context
                if c not in src:
                    raise ValueError(f"missing user/context feature {c!r}")
                values.append(src[c])
            given[c] = values
        # each column converted (and checked) when first read; those only dict-looked-up are checked there
        request_raw = _LazyColumns(given, self.raw_types)
        item_raw: dict[str, Col | Jagged] = {}
        for c in self.item_columns:
            parts = []
            for (_, _, cands), n in zip(requests, sizes.tolist(), strict=True):
                if c not in cands:
                    raise ValueError(f"missing candidate feature {c!r}")
                part = cands[c]
                if len(part) != n:
                    raise ValueError(f"candidate column {c!r} has {len(part)} values, expected {n}")
                parts.append(part)
            item_raw[c] = _concat(c, self.raw_types[c], parts)

        def column(name: str, side: Side) -> Col | Jagged:
            if name in item_raw:
                return item_raw[name]
            col = request_raw[name]
            return col if side == "request" else _repeat(col, sizes)  # broadcast into a per-candidate cross

        request_ids: dict[str, np.ndarray] = {}
        item_ids: dict[str, np.ndarray] = {}
        lists: dict[str, Jagged] = {}
        for p in self.sparse:
            f = p.feature
            if p.rule == "cross":
                assert p.lookup is not None  # a cross plan always has its lookup
                crossed = [cast(Col, column(c, p.side)) for c in f.cross]  # never lists: the fit rejects them
                ids = p.lookup(_cross_keys(crossed, [self.raw_types[c] for c in f.cross]))
            elif (table := self._scalar_ids.get(f.name)) is not None and (
                    fast := _scalar_ids(table, p.kind, given[f.raw])) is not None:
                ids = fast
            else:
                raw = column(f.raw, p.side)
                if isinstance(raw, Jagged):
                    lists[f.name] = self._encode_list(p, raw)
                    continue
                ids = self._encode_single(p, raw)
            (request_ids if p.side == "request" else item_ids)[f.name] = ids
        request_dense = _dense_matrix([d for d in self.dense if d.side == "request"], request_raw, len(requests))
        item_dense = _dense_matrix([d for d in self.dense if d.side == "item"], item_raw, int(sizes.sum()))
        return EncodedBatch(sizes, request_ids, item_ids, lists, request_dense, item_dense)

    def _encode_single(self, p: SparsePlan, raw: Col) -> np.ndarray:
        if p.rule == "quantile":
            x = raw.values.astype(np.float64, copy=False)
            assert p.cuts is not None  # a quantile plan always has its cuts
            ids = np.searchsorted(p.cuts, x, side="left").astype(np.int64) + 1
            bad = np.isnan(x) if raw.null is None else (np.isnan(x) | raw.null)
            return np.where(bad, OOV, ids)
        if p.rule == "hash":
            return _hash_ids(_as_strings(raw, p.kind), raw.null, p.feature.hash_buckets or 1)
        assert p.lookup is not None
        query = _as_strings(raw, p.kind) if p.kind == "float" else raw.values
        ids = p.lookup(query)
        return ids if raw.null is None else np.where(raw.null, OOV, ids)

    def _encode_list(self, p: SparsePlan, raw: Jagged) -> Jagged:
        """Truncate every list to ``max_len``, then map its entries to ids (null entries -> 0)."""
        f = p.feature
        lengths = np.minimum(raw.lengths, f.max_len)  # (C,)
        starts = raw.offsets()[:-1]
        within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # (L',)
        keep = np.repeat(starts, lengths) + within  # (L',) the entries each truncated list keeps
        values = raw.values
        if isinstance(values, np.ndarray):
            flat = values[keep]
            null = None
        else:
            taken = [values[i] for i in keep.tolist()] if len(keep) != len(values) else values
            null_list = [v is None for v in taken]
            null = np.array(null_list, dtype=bool) if any(null_list) else None
            flat = _str_array(["" if v is None else v for v in taken] if null is not None else taken)
            if flat.size == 0:
                flat = np.zeros(0, dtype=np.int64 if p.kind == "list[int]" else str)
        if p.rule == "hash":
            ids = _hash_ids(flat.astype(str) if flat.dtype.kind in "iu" else flat, null, f.hash_buckets or 1)
        else:
            assert p.lookup is not None
            if flat.dtype.kind in "iu" and p.lookup.keys.dtype.kind != "i":
                flat = flat.astype(str)  # an int list against a string vocabulary
            elif flat.dtype.kind == "U" and p.lookup.keys.dtype.kind == "i":
                flat = _parse_ints(flat)
            ids = p.lookup(flat)
            if null is not None:
                ids = np.where(null, OOV, ids)
        return Jagged(ids.astype(np.int64, copy=False), lengths.astype(np.int64, copy=False))


# ------------------------------------------------------------------------------ raw columns
_INT64 = (-(1 << 63), 1 << 63)


def _scalar_ids(table: dict[Any, int], kind: str, values: list[Any]) -> np.ndarray | None:
    """(R,) ids of one request-side column by dict lookup (nulls -> OOV); None when a value is not
    a plain ``str`` (str columns) or an in-range ``int`` (int columns): the general path decides."""
    out = []
    for v in values:
        if v is None:
            out.append(OOV)
        elif type(v) is str if kind == "str" else (type(v) is int and _INT64[0] <= v < _INT64[1]):
            out.append(table.get(v, OOV))
        else:
            return None
    return np.array(out, dtype=np.int64)


class _LazyColumns(dict[str, "Col | Jagged"]):
    """Request columns, each converted by :func:`_normalise` when first read."""

    def __init__(self, given: dict[str, list[Any]], raw_types: Mapping[str, str]) -> None:
        super().__init__()
        self._given, self._types = given, raw_types

    def __missing__(self, name: str) -> Col | Jagged:
        col = self[name] = _normalise(name, self._types[name], self._given[name])
        return col



def _n_candidates(cands: Mapping[str, Any], item_columns: list[str]) -> int:
    for c in item_columns:
        if c in cands:
            return len(cands[c])
    return len(next(iter(cands.values()), ()))


def _normalise(name: str, kind: str, values: Sequence[Any]) -> Col | Jagged:
    """Python values of one raw column (one per request) -> a column."""
    if kind.startswith("list"):
        return _as_jagged(name, kind, values)
    null_list = [v is None for v in values]
    null = np.array(null_list, dtype=bool) if any(null_list) else None
    if kind == "str":
        vals = [("" if v is None else v) for v in values] if null is not None else list(values)
        _check_kind(name, kind, vals)
        return Col(_str_array(vals), null)
    dtype = np.float64 if kind == "float" else np.int64
    nums = [(0 if v is None else v) for v in values] if null is not None else values
    _check_kind(name, kind, nums)
    try:
        return Col(np.asarray(nums, dtype=dtype), null)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"feature {name!r} expects {kind} values, got {values[0]!r}") from e


def _check_kind(name: str, kind: str, values: Sequence[Any]) -> None:
    """Reject a value of the wrong kind (a string for an int column, ...), as the reference's strict cast does."""
    if not values:
        return
    first = values[0]
    if isinstance(values, np.ndarray):
        ok = values.dtype.kind in ("U", "O") if kind == "str" else values.dtype.kind in "iuf"
    elif kind == "str":
        ok = all(isinstance(v, str) for v in values)
    else:
        ok = all(isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) for v in values)
        if ok and kind == "int":
            ok = all(float(v).is_integer() for v in values if isinstance(v, float | np.floating))
    if not ok:
        raise ValueError(f"feature {name!r} expects {kind} values, got {first!r}")


def _as_jagged(name: str, kind: str, lists: Sequence[Any]) -> Jagged:
    """One list per request (user/context list features) -> Jagged."""
    lengths = np.array([0 if v is None else len(v) for v in lists], dtype=np.int64)
    flat = list(itertools.chain.from_iterable(v for v in lists if v is not None))
    if kind == "list[int]":
        if any(v is None for v in flat):
            raise ValueError(f"feature {name!r}: null entries inside int lists are not supported")
        return Jagged(np.asarray(flat, dtype=np.int64), lengths)
    return Jagged(flat, lengths)


def _concat(name: str, kind: str, parts: list[Any]) -> Col | Jagged:
    """Candidate columns of several requests -> one column of N values."""
    if kind.startswith("list"):
        dtype = pl.List(pl.Int64 if kind == "list[int]" else pl.String)  # typed: [None] alone is no list
        jagged = [p if isinstance(p, Jagged) else Jagged.from_lists(p if isinstance(p, pl.Series)
                                                                     else pl.Series(p, dtype=dtype)) for p in parts]
        lengths = np.concatenate([j.lengths for j in jagged])
        if all(isinstance(j.values, np.ndarray) and j.values.dtype.kind in "iuU" for j in jagged):
            return Jagged(np.concatenate([j.values for j in jagged]), lengths)
        values: list[Any] = list(itertools.chain.from_iterable(
            j.values.tolist() if isinstance(j.values, np.ndarray) else j.values for j in jagged))
        if kind == "list[int]":
            ints = np.asarray(values)
            if ints.dtype.kind == "f" and np.isnan(ints).any():  # from_lists turns a null entry into NaN
                raise ValueError(f"feature {name!r}: null entries inside int lists are not supported")
            return Jagged(ints.astype(np.int64), lengths)
        return Jagged(values, lengths)
    if kind == "str" and all(isinstance(p, np.ndarray) and p.dtype.kind == "U" for p in parts):
        return Col(parts[0] if len(parts) == 1 else np.concatenate(parts))  # decoded: strings, no nulls
    if kind != "str" and all(isinstance(p, np.ndarray) for p in parts):
        return _normalise_array(name, kind, parts[0] if len(parts) == 1 else np.concatenate(parts))
    flat = list(itertools.chain.from_iterable(p.to_list() if isinstance(p, pl.Series) else p for p in parts))
    return _normalise(name, kind, flat)


def _normalise_array(name: str, kind: str, values: np.ndarray) -> Col:
    if values.dtype.kind not in "iuf" or (kind == "int" and values.dtype.kind == "f"):
        return cast(Col, _normalise(name, kind, values.tolist()))  # a single-valued kind: a Col
    return Col(values.astype(np.float64 if kind == "float" else np.int64, copy=False))


def _repeat(col: Col | Jagged, sizes: np.ndarray) -> Col:
    if isinstance(col, Jagged):
        raise ValueError("a list column cannot be part of a cross")
    return Col(np.repeat(col.values, sizes), None if col.null is None else np.repeat(col.null, sizes))


def _as_strings(col: Col, kind: str) -> np.ndarray:
    """The string a raw value is hashed or looked up by: Polars' rendering of the value."""
    if kind in ("str", "list[str]"):
        return col.values
    if kind == "float":  # Polars and Python print floats differently (1e-05 vs 0.00001): ask Polars
        return pl.Series(col.values, dtype=pl.Float64).cast(pl.String).to_numpy().astype(str)
    return col.values.astype(str)


def _str_array(values: Sequence[str]) -> np.ndarray:
    """Strings -> a numpy str array; object dtype when one holds a NUL character, which
    fixed-width numpy strings would drop from its end (as ``serving.decode`` does)."""
    if not len(values):
        return np.zeros(0, dtype=str)
    return np.array(values, dtype=object if "\x00" in "".join(values) else str)


def _parse_ints(values: np.ndarray) -> np.ndarray:
    return values.astype(np.int64)


def _cross_keys(cols: list[Col], kinds: list[str]) -> np.ndarray:
    """The crossed columns' strings joined by the unit separator, null parts as ""."""
    parts = []
    for col, kind in zip(cols, kinds, strict=True):
        s = _as_strings(col, kind)
        parts.append(s if col.null is None else np.where(col.null, "", s))
    if any(s.dtype == object for s in parts):  # a part holds a NUL: join as Python strings, keep it
        return np.array([_CROSS_SEP.join(t) for t in zip(*(s.tolist() for s in parts), strict=True)], dtype=object)
    out = parts[0]
    for s in parts[1:]:
        out = np.char.add(np.char.add(out, _CROSS_SEP), s)
    return out


def _hash_ids(strings: np.ndarray, null: np.ndarray | None, buckets: int) -> np.ndarray:
    """Polars' string hash (seed 0) into ``buckets``, shifted past the OOV id; nulls -> OOV."""
    if strings.size == 0:
        return np.zeros(0, dtype=np.int64)
    h = pl.Series(strings.tolist(), dtype=pl.String).hash(seed=0).to_numpy()  # (n,) uint64
    ids = (h % np.uint64(buckets)).astype(np.int64) + 1
    return ids if null is None else np.where(null, OOV, ids)


def _dense_matrix(plans: list[DensePlan], raw: Mapping[str, Col | Jagged], n: int) -> np.ndarray:
    """(n, len(plans)) float32: each dense feature's fill, clip, log1p and scaling."""
    out = np.empty((n, len(plans)), dtype=np.float32)
    for j, p in enumerate(plans):
        col = raw[p.feature.raw]
        assert isinstance(col, Col)
        out[:, j] = dense_values(p.feature, p.stats, col.values, col.null)
    return out


def dense_values(d: DenseFeature, st: NumericStats, values: np.ndarray, null: np.ndarray | None = None) -> np.ndarray:
    """The reference's ``_scaled`` expression in numpy: raw (n,) -> standardised (n,) float32.

    Null entries take ``fill_null`` when the spec sets one, else end on 0, like the reference.

    Example:
        >>> d = DenseFeature(name="x", source="item", transform="log1p")
        >>> dense_values(d, NumericStats(mean=1.0, std=2.0), np.array([np.e - 1, -5.0])).tolist()
        [0.0, -0.5]
    """
    x = values.astype(np.float64, copy=True)  # (n,)
    missing = null
    if null is not None and d.fill_null is not None:
        x[null] = d.fill_null
        missing = None
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if d.clip_min is not None:
            x = np.where(np.isnan(x), x, np.maximum(x, d.clip_min))
        if d.clip_max is not None:
            x = np.where(np.isnan(x), x, np.minimum(x, d.clip_max))
        if d.transform == "log1p":
            x = np.log1p(np.where(np.isnan(x), x, np.maximum(x, 0.0)))
        if d.scale == "standard":
            x = (x - st.mean) / (st.std or 1.0)
        elif d.scale == "minmax":
            x = (x - st.min) / ((st.max - st.min) or 1.0)
        x[np.isnan(x)] = 0.0
        if missing is not None:
            x[missing] = 0.0
        return x.astype(np.float32)
