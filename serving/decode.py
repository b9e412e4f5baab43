"""Decode a ``RankRequest`` into the raw feature dicts that ``FittedTransform.transform_request`` takes.

Candidate columns become numpy arrays (ints, floats, strings) or :class:`features.columns.Jagged`
columns (flattened values + lengths) straight from the repeated fields, with no Python loop per
candidate; the serving plan (``features.plan``) reads them as they are. Every count is checked
before any repeated field is converted, so an oversized request is refused in microseconds. Every check that
needs only the request and the feature spec happens here, so that a malformed request fails with a
message naming the field (``candidates.features['duration_s']: 3 values, expected 5 (one per item
id)``). Ids that the model has never seen are not errors: the transform maps them to id 0.

Shape letters: C candidates in the request, L total entries of a jagged column.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from features.columns import Jagged
from features.fitted import FittedTransform
from protos.ranking.v1 import ranker_pb2 as pb
from serving import defaults

DEFAULT_MAX_CANDIDATES = defaults.MAX_CANDIDATES
_RESPONSE_FORMATS = tuple(pb.ResponseFormat.values())

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
    """Raw features of one request, ready for ``ServingPlan.encode`` (or ``transform_request``)."""

    user: dict[str, Any]  # raw column -> scalar or list
    context: dict[str, Any]
    candidates: dict[str, Any]  # raw column -> (C,) ndarray (ints, floats, str) or Jagged
    item_ids: list[str]  # (C,) ids as the response reports them
    weights: dict[str, float]  # objective weight overrides, already checked (names known, finite, >= 0)


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
    if req.candidates.item_ids.WhichOneof("kind") is None:
        raise DecodeError(f"{ids_field}: no column set (expected the candidates' item ids)")
    n = count_candidates(req)  # before anything is converted: a 100,000-id column is refused at once
    if n == 0:
        raise DecodeError(f"{ids_field}: no candidates; at least one item id is required")
    if n > max_candidates:
        raise DecodeError(f"{ids_field}: {n} candidates, at most {max_candidates} are allowed")
    weights = _weights(req, [t.name for t in spec.tasks])
    if req.response_format not in _RESPONSE_FORMATS:
        known = ", ".join(f"{pb.ResponseFormat.Name(v)} ({v})" for v in _RESPONSE_FORMATS)
        raise DecodeError(f"response_format: unknown value {req.response_format}; expected one of {known}")
    item_kind = fitted.raw_types.get(item_key, "id") if item_key is not None else "id"
    raw_ids = _column(ids_field, req.candidates.item_ids, item_kind, n=None)
    item_ids = _as_strings(raw_ids)

    by_source = fitted.columns_by_source
    user = _values("user", req.user, by_source["user"], fitted.raw_types)
    context = _values("context", req.context, by_source["context"], fitted.raw_types)

    wanted = [c for c in by_source["item"] if c != item_key]
    if item_key in req.candidates.features:
        raise DecodeError(f"candidates.features[{item_key!r}]: the item key is sent in {ids_field}, not as a feature")
    _check_names("candidates.features", req.candidates.features, wanted, "candidate")
    candidates: dict[str, Any] = {
        name: _column(f"candidates.features[{name!r}]", req.candidates.features[name], fitted.raw_types[name], n)
        for name in wanted
    }
    if item_key in by_source["item"]:
        candidates[item_key] = raw_ids
    _check_valid_min(fitted, user, context, candidates)
    return DecodedRequest(user, context, candidates, item_ids, weights)


def count_candidates(req: pb.RankRequest) -> int:
    """Item ids a request carries, read from the field's length alone (0 when unset)."""
    col = req.candidates.item_ids
    kind = col.WhichOneof("kind")
    if kind is None:
        return 0
    part = getattr(col, kind)
    return len(part.lengths) if kind in _LIST_COLUMN_KINDS else len(part.values)


def _weights(req: pb.RankRequest, tasks: list[str]) -> dict[str, float]:
    """Objective weight overrides, checked before any feature is converted."""
    out: dict[str, float] = {}
    for name, value in req.objective_weights.items():
        if name not in tasks:
            raise DecodeError(f"objective_weights: unknown objective {_clip(name)!r}; known: {tasks}")
        if not math.isfinite(value) or value < 0:
            raise DecodeError(f"objective_weights: objective weight for {name!r} must be finite and >= 0, got {value}")
        out[name] = float(value)
    return out


def _check_valid_min(fitted: FittedTransform, user: dict[str, Any], context: dict[str, Any],
                     candidates: dict[str, Any]) -> None:
    """A dense value below the spec's ``valid_min`` is refused, naming field, index and value.

    Training quarantines such rows (``features.validate``: e.g. a negative duration); scoring
    them would silently give them another meaning (``log1p`` clips them to 0), so serving refuses
    them the same way.
    """
    for d in fitted.spec.dense:
        if d.valid_min is None:
            continue
        if d.source == "item":
            values = candidates[d.raw]
            bad = np.flatnonzero(values < d.valid_min)
            if bad.size:
                i = int(bad[0])
                raise DecodeError(
                    f"candidates.features[{d.raw!r}]: value {values[i]} at index {i} is below the "
                    f"minimum {d.valid_min:g} of the feature's contract ({bad.size} such values)"
                )
        else:
            given = user if d.source == "user" else context
            if given[d.raw] < d.valid_min:
                raise DecodeError(
                    f"{d.source}[{d.raw!r}]: value {given[d.raw]} is below the minimum {d.valid_min:g} "
                    "of the feature's contract"
                )


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
        return _strings(part.values)
    dtype = np.float64 if raw_type == "float" else np.int64
    values = np.asarray(part.values, dtype=dtype)  # (C,)
    if kind == "floats":
        _check_finite(field, values)
    return values


def _jagged(field: str, part: Any, raw_type: str, n: int | None) -> Jagged:
    """Flattened values + per-candidate lengths -> a :class:`Jagged` column (C lists, L values)."""
    if n is not None and len(part.lengths) != n:
        raise DecodeError(f"{field}.lengths: {len(part.lengths)} entries, expected {n} (one per item id)")
    lengths = np.asarray(part.lengths, dtype=np.int64)  # (C,)
    total = int(lengths.sum())
    if total != len(part.values):
        raise DecodeError(f"{field}: lengths sum to {total} but {len(part.values)} values were given")
    if raw_type == "list[int]":
        if part.values and isinstance(part.values[0], str):
            return Jagged(np.zeros(0, dtype=np.int64), lengths)  # only an all-empty string column gets here
        return Jagged(np.asarray(part.values, dtype=np.int64), lengths)  # (L,)
    if not isinstance(part.values[0] if part.values else "", str):
        return Jagged(np.zeros(0, dtype=str), lengths)  # an all-empty int column for a string feature
    return Jagged(_strings(part.values), lengths)  # (L,)


def _strings(values: Any) -> np.ndarray:
    """Repeated strings -> a numpy str array; object dtype when one holds a NUL character, which
    fixed-width numpy strings would drop from its end."""
    items = list(values)
    if "\x00" in "".join(items):
        return np.array(items, dtype=object)
    return np.array(items, dtype=str) if items else np.zeros(0, dtype=str)


# ------------------------------------------------------------------------------- helpers
def _check_names(field: str, given: Any, wanted: list[str], source: str) -> None:
    if len(given) == len(wanted) and all(c in given for c in wanted):
        return  # the common case: exactly the wanted names
    unknown = sorted(set(given) - set(wanted))
    if unknown:
        raise DecodeError(f"{field}[{_clip(unknown[0])!r}]: unknown {source} feature; known: {wanted}")
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
        return values.astype(str).tolist() if values.dtype != object else list(values)
    return list(values)


_MAX_QUOTED = 200  # characters of a caller-sent name quoted in an error


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_QUOTED else f"{text[:_MAX_QUOTED]}... ({len(text)} characters)"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"
