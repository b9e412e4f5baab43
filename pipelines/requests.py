"""Build a ranking request (user and context once, candidates column-wise) from a raw impression log."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import polars as pl

from features.build import scan_log
from features.spec import FeatureSpec


@dataclass(frozen=True)
class RawRequest:
    """Raw features of one request, as a client would send them."""

    request_id: str
    user: dict[str, Any]
    context: dict[str, Any]
    candidates: dict[str, list[Any]]  # item-side features except the item id, one value per candidate
    item_ids: list[Any]


def request_from_log(log: str | Path, spec: FeatureSpec, index: int = -1) -> RawRequest:
    """The ``index``-th request of the log in time order (default: the last one)."""
    keys = spec.keys
    # Optional in the spec; a dataset without requests or items (census) reaches Polars as None, which rejects it
    request, item = cast(str, keys.request), cast(str, keys.item)
    lf = scan_log(log)
    ids = lf.select(pl.col(request).unique(maintain_order=True)).collect()[request]
    if ids.len() == 0:
        raise ValueError(f"no requests in log {str(log)!r}")
    if not -ids.len() <= index < ids.len():
        raise ValueError(f"--index {index} out of range: the log holds {ids.len()} requests")
    rid = ids[index]
    rows = lf.filter(pl.col(request) == rid).collect()
    first = rows.row(0, named=True)
    item_cols = [c for c in spec.features_from("item") if c != item]
    return RawRequest(
        request_id=str(rid),
        user={c: first[c] for c in spec.features_from("user")},
        context={c: first[c] for c in spec.features_from("context")},
        candidates={c: rows[c].to_list() for c in item_cols},
        item_ids=rows[item].to_list(),
    )
