"""Quantile cut points that every engine finds exactly: Polars' ``nearest`` ranks, selected by radix.

The Polars engine takes a feature's boundaries from ``quantile(q, "nearest")`` over the training
rows; an engine that sees the rows in blocks (Ray Data) selects the values at the same ranks
(:func:`quantile_ranks`) with an exact radix selection over an order-preserving 64-bit key
(:func:`select_ranks`, with :func:`digit_counts` per block): no sample, no sketch, the same cut
points (:func:`cut_points`) for any blocking.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence

import polars as pl

_DIGIT = 16  # bits per radix round: four rounds select a 64-bit key


def quantile_ranks(n: int, quantiles: int) -> list[int]:
    """Positions (0-based, among ``n`` sorted non-null values) of the ``quantiles - 1`` cut points.

    Polars' ``quantile(q, "nearest")``: ``(n - 1) * q`` rounded half away from zero, for
    ``q = i / quantiles``, so another engine that selects the values at these ranks exactly gets
    the cut points the Polars engine gets.

    Example:
        >>> quantile_ranks(11, 4)
        [3, 5, 8]
    """
    ranks = []
    for i in range(1, quantiles):
        x = (n - 1) * (i / quantiles)
        whole = math.floor(x)
        ranks.append(whole + (1 if x - whole >= 0.5 else 0))
    return ranks


def cut_points(values: Sequence[float | None]) -> list[float]:
    """The distinct values at the quantile ranks, sorted: a feature's boundaries.

    NaN cuts nothing (``x > NaN`` is never true) and is dropped; ``-0.0`` is written as ``0.0``
    (which of the two equal zeros sits at a rank is up to the sort), so the saved transform is
    one and the same for every engine.
    """
    return sorted({v + 0.0 for v in values if v is not None and not math.isnan(v)})


def quantile_key(column: str) -> pl.Expr:
    """UInt64 keys ordered as the column's float64 values (NaN largest, ``-0.0`` as ``0.0``); null stays null."""
    x = pl.col(column).cast(pl.Float64) + 0.0
    bits = x.reinterpret(dtype=pl.UInt64)
    top = pl.lit(2**64 - 1, pl.UInt64)
    return pl.when(x.is_nan()).then(top).when(bits >= 2**63).then(top - bits).otherwise(bits + pl.lit(2**63, pl.UInt64))


def digit_counts(train: pl.DataFrame, column: str, prefixes: list[int], round_: int) -> pl.DataFrame:
    """Round ``round_`` of the radix selection on one block: ``(p, d, n)``, how many keys with
    higher digits ``p`` (one of ``prefixes``) have ``d`` as their next 16-bit digit."""
    shift = 64 - _DIGIT * (round_ + 1)
    keys = train.select(quantile_key(column).alias("k")).drop_nulls()
    if round_ == 0:
        prefix = pl.lit(0, pl.UInt64)
    else:
        prefix = pl.col("k") // 2 ** (shift + _DIGIT)
        keys = keys.filter(prefix.is_in(prefixes))
    digit = (pl.col("k") // 2**shift) % 2**_DIGIT
    return keys.group_by(prefix.alias("p"), digit.alias("d")).agg(pl.len().cast(pl.Int64).alias("n"))




def select_ranks(
    ranks: dict[str, list[int]], count: Callable[[dict[str, list[int]], int], dict[str, pl.DataFrame]]
) -> dict[str, list[float]]:
    """The values at the given ranks (0-based, among the sorted non-null values) of each column, exactly.

    A radix selection: every value has a 64-bit key ordered as the values (:func:`quantile_key`:
    NaN last, as Polars sorts, ``-0.0`` as ``0.0``). Round r asks ``count(prefixes, r)`` for the
    ``(p, d, n)`` counts of the r-th 16-bit digit ``d`` of the keys whose higher digits are ``p``,
    one of a rank's prefixes so far (:func:`digit_counts` per block, concatenated); the counts say
    each rank's next digit and its rank within the narrower prefix. After four rounds the prefix is
    the whole key, hence the value: exact and independent of the blocking, with at most 65,536
    counts per rank and block in each round, never the values themselves.
    """
    targets = {q: [(0, r) for r in rs] for q, rs in ranks.items() if rs}
    for round_ in range(64 // _DIGIT):
        if not targets:
            break
        found = count({q: sorted({p for p, _ in ts}) for q, ts in targets.items()}, round_)
        for q, ts in targets.items():
            merged = found[q].group_by("p", "d").agg(pl.col("n").sum())
            targets[q] = [_narrow(merged, p, r) for p, r in ts]
    return {q: [_from_key(p) for p, _ in targets.get(q, [])] for q in ranks}


def _narrow(counts: pl.DataFrame, prefix: int, rank: int) -> tuple[int, int]:
    """(prefix, rank within it) -> (prefix with the next digit, rank within that), by the merged counts."""
    digits = counts.filter(pl.col("p") == prefix).sort("d")
    ends = digits["n"].cum_sum()
    i = int((ends > rank).arg_max() or 0)
    before = int(ends[i]) - int(digits["n"][i])
    return (prefix << _DIGIT) | int(digits["d"][i]), rank - before


def _from_key(key: int) -> float:
    """The float64 a :func:`quantile_key` stands for."""
    bits = key - 2**63 if key >= 2**63 else 2**64 - 1 - key
    value: float = struct.unpack("<d", struct.pack("<Q", bits))[0]
    return value
