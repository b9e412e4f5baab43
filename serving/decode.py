"""Decode a ``RankRequest`` into the raw feature dicts that ``FittedTransform.transform_request`` takes.

Candidate columns become numpy arrays, Python lists (strings) or Polars list Series (jagged
columns) straight from the repeated fields, with no Python loop per candidate. Every check that
needs only the request and the feature spec happens here, so that a malformed request fails with a
message naming the field (``candidates.features['duration_s']: 3 values, expected 5 (one per item
id)``). Ids that the model has never seen are not errors: the transform maps them to id 0.

Shape letters: C candidates in the request, L total entries of a jagged column.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa

from features.fitted import FittedTransform
from protos.ranking.v1 import ranker_pb2 as pb

DEFAULT_MAX_CANDIDATES = 1000

# Oneof kinds a raw type accepts; an empty list of either kind is accepted for any list type.
_VALUE_KINDS: dict[str, tuple[str, ...]] = {
    "int": ("int_value",),
    "float": ("float_value", "int_value"),
    "str": ("string_value",),
    "list[int]": ("int_list",),
    "list[str]": ("string_list",),
}
_COLUMN_KINDS: dict[str, tuple[str, ...]] = {
    "int": ("ints",),
    "float": ("floats", "ints"),
    "str": ("strings",),
    "list[int]": ("int_lists",),
    "list[str]": ("string_lists",),
    "id": ("ints", "strings"),  # item ids when the item key is not a model feature
}
_LIST_VALUE_KINDS = ("int_list", "string_list")
_LIST_COLUMN_KINDS = ("int_lists", "string_lists")


class DecodeError(ValueError):
    """A request that cannot be decoded; the message starts with the offending field."""


class DecodedRequest(NamedTuple):
    """Raw features of one request, ready for ``transform_request``."""

    user: dict[str, Any]  # raw column -> scalar or list
    context: dict[str, Any]
    candidates: dict[str, Any]  # raw column -> (C,) ndarray, list[str] or pl.Series of lists
    item_ids: list[str]  # (C,) ids as the response reports them


def decode_request(
    req: pb.RankRequest, fitted: FittedTransform, max_candidates: int = DEFAULT_MAX_CANDIDATES
) -> DecodedRequest:
    """Check a request against the fitted transform's spec and turn it into raw feature dicts.

    Args:
        req: the request as received.
        fitted: the loaded model's fitted transform (its spec names the features, its
            ``raw_types`` their kinds).
        max_candidates: the most candidates one request may carry.

    Returns:
        ``(user, context, candidates, item_ids)``; ``candidates`` includes the item key column
        (e.g. ``item_id``) filled from ``req.candidates.item_ids``.

    Raises:
        DecodeError: the message names the field (``user['device']``, ``candidates.item_ids``,
            ``candidates.features['tags'].lengths`` ...) and the offending value.
    """
    spec = fitted.spec
    item_key = spec.keys.item
    ids_field = "candidates.item_ids"
    item_kind = fitted.raw_types.get(item_key, "id")
    raw_ids = _column(ids_field, req.candidates.item_ids, item_kind, n=None)
    n = len(raw_ids)
    if n == 0:
        raise DecodeError(f"{ids_field}: no candidates; at least one item id is required")
    if n > max_candidates:
        raise DecodeError(f"{ids_field}: {n} candidates, at most {max_candidates} are allowed")
    item_ids = _as_strings(raw_ids)

    user = _values("user", req.user, spec.features_from("user"), fitted.raw_types)
    context = _values("context", req.context, spec.features_from("context"), fitted.raw_types)

    wanted = [c for c in spec.features_from("item") if c != item_key]
    if item_key in req.candidates.features:
        raise DecodeError(f"candidates.features[{item_key!r}]: the item key is sent in {ids_field}, not as a feature")
    _check_names("candidates.features", req.candidates.features, wanted, "candidate")
    candidates: dict[str, Any] = {
        name: _column(f"candidates.features[{name!r}]", req.candidates.features[name], fitted.raw_types[name], n)
        for name in wanted
    }
    if item_key in spec.features_from("item"):
        candidates[item_key] = raw_ids
    return DecodedRequest(user, context, candidates, item_ids)


# ----------------------------------------------------------------- user / context values
def _values(source: str, given: Any, wanted: list[str], raw_types: dict[str, str]) -> dict[str, Any]:
    """A user or context map -> {raw column: Python value}, every wanted name present, no other."""
    _check_names(source, given, wanted, source)
    return {name: _value(f"{source}[{name!r}]", given[name], raw_types[name]) for name in wanted}


def _value(field: str, v: pb.FeatureValue, raw_type: str) -> Any:
    kind = v.WhichOneof("kind")
    if kind is None:
        raise DecodeError(f"{field}: no value set (expected {raw_type})")
    empty_list = kind in _LIST_VALUE_KINDS and not getattr(v, kind).values
    if kind not in _VALUE_KINDS[raw_type] and not (empty_list and raw_type.startswith("list")):
        raise DecodeError(f"{field}: {kind} given, expected {_article(raw_type)} {raw_type} value")
    if kind == "float_value" and not np.isfinite(v.float_value):
        raise DecodeError(f"{field}: {v.float_value} is not finite")
    if kind in _LIST_VALUE_KINDS:
        return list(getattr(v, kind).values)
    value = getattr(v, kind)
    return float(value) if raw_type == "float" else value


# ----------------------------------------------------------------------- candidate columns
def _column(field: str, col: pb.FeatureColumn, raw_type: str, n: int | None) -> Any:
    """One column -> (C,) ndarray / list[str] / pl.Series of lists; ``n`` is the expected length."""
    kind = col.WhichOneof("kind")
    if kind is None:
        raise DecodeError(f"{field}: no column set (expected {raw_type} values)")
    part = getattr(col, kind)
    empty_lists = kind in _LIST_COLUMN_KINDS and not part.values
    if kind not in _COLUMN_KINDS[raw_type] and not (empty_lists and raw_type.startswith("list")):
        raise DecodeError(f"{field}: {kind} given, expected {raw_type} values")
    if kind in _LIST_COLUMN_KINDS:
        return _jagged(field, part, raw_type, n)
    count = len(part.values)
    if n is not None and count != n:
        raise DecodeError(f"{field}: {count} values, expected {n} (one per item id)")
    if kind == "strings":
        return list(part.values)
    dtype = np.float64 if raw_type == "float" else np.int64
    values = np.asarray(part.values, dtype=dtype)  # (C,)
    if kind == "floats":
        _check_finite(field, values)
    return values


def _jagged(field: str, part: Any, raw_type: str, n: int | None) -> pl.Series:
    """Flattened values + per-candidate lengths -> a (C,) Series of lists, built from offsets."""
    lengths = np.asarray(part.lengths, dtype=np.int64)  # (C,)
    if n is not None and len(lengths) != n:
        raise DecodeError(f"{field}.lengths: {len(lengths)} entries, expected {n} (one per item id)")
    total = int(lengths.sum())
    if total != len(part.values):
        raise DecodeError(f"{field}: lengths sum to {total} but {len(part.values)} values were given")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)  # (C + 1,)
    np.cumsum(lengths, out=offsets[1:])
    inner = pa.int64() if raw_type == "list[int]" else pa.string()
    flat = pa.array(list(part.values), type=inner)  # (L,)
    return pl.Series(pa.LargeListArray.from_arrays(pa.array(offsets, type=pa.int64()), flat))


# ------------------------------------------------------------------------------- helpers
def _check_names(field: str, given: Any, wanted: list[str], source: str) -> None:
    unknown = sorted(set(given) - set(wanted))
    if unknown:
        raise DecodeError(f"{field}[{unknown[0]!r}]: unknown {source} feature; known: {wanted}")
    missing = [c for c in wanted if c not in given]
    if missing:
        raise DecodeError(f"{field}[{missing[0]!r}]: missing {source} feature; required: {wanted}")


def _check_finite(field: str, values: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        raise DecodeError(f"{field}: value {values[i]} at index {i} is not finite")


def _as_strings(values: Any) -> list[str]:
    """Item ids as strings, vectorised (ints are rendered in decimal)."""
    if isinstance(values, np.ndarray):
        return values.astype(str).tolist()  # type: ignore[no-any-return]
    return list(values)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"
