"""Exact sums of float columns for a fit: per-exponent integer sums that merge in any order.

A fit needs means and standard deviations (numeric features, label rates) in a form that merges
exactly. A float sum depends on the order of its terms, so a mean or a std merged from per-block
partials (the Ray engine) would differ from a single pass (the Polars engine) in the last bits, and
so would the transform's content hash. Each float64 x is ±m·2**k with an integer m < 2**53;
grouping by k and adding the m (and the limbs of m**2) in Int128 gives the sums with no rounding
at all, whatever the blocking, in plain Polars expressions (no Python loop per row). The mean and
variance are then one exact rational each, rounded once to float64; both engines use this path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import polars as pl

# Queries over the same rows run side by side, each streaming its own scan: a shared subplan would be
# cached in memory whole (the training rows, for a fit), which is what streaming avoids.
STREAM_APART = pl.QueryOptFlags(comm_subplan_elim=False)
_NAN, _POS_INF, _NEG_INF = 2000, 2001, 2002  # moment "exponents" that count the non-finite values
_LIMB = 2**26  # m = hi * 2**26 + lo: hi**2, hi*lo and lo**2 stay below 2**54, and their Int128 sums exact


def moment_partials(lf: pl.LazyFrame, columns: dict[str, pl.Expr], by: tuple[str, ...] = ()) -> pl.LazyFrame:
    """Exact sums of each named (float) column's non-null values, grouped by ``by``, as a small frame.

    Columns: ``*by, name, exp, n, s, h2, hl, l2``: for every binary exponent ``exp`` the values have,
    their count ``n``, the sum ``s`` of their signed 53-bit significands, and the sums of the
    significand's limb products (``h2 = Σ hi²``, ``hl = Σ hi·lo``, ``l2 = Σ lo²``); NaN and the
    infinities are counted under the exponents 2000, 2001 and 2002. Frames of any blocking of the
    same rows concatenate and re-sum (:func:`merge_moments`) to the same frame; :meth:`Moments.of`
    reads the exact mean and variance from it.

    Example:
        >>> lf = pl.LazyFrame({"x": [0.1, 0.2, 0.3, None]})
        >>> Moments.of(moment_partials(lf, {"x": pl.col("x")}).collect())["x"].mean()
        0.2
    """
    keys = [*by, "name", "exp"]
    schema = {**{b: pl.String for b in by}, "name": pl.String, "exp": pl.Int64, "n": pl.Int64,
              "s": pl.Int128, "h2": pl.Int128, "hl": pl.Int128, "l2": pl.Int128}
    if not columns:
        return pl.LazyFrame(schema=schema)
    x = pl.col("__value")
    bits = x.reinterpret(dtype=pl.UInt64)
    field = (bits // 2**52) % 2048  # the biased exponent; 0 for zeros and subnormals
    hidden = pl.when(field > 0).then(pl.lit(2**52, pl.UInt64)).otherwise(pl.lit(0, pl.UInt64))
    m = pl.when(x.is_finite()).then(bits % 2**52 + hidden).otherwise(0).cast(pl.Int64)  # |x| = m * 2**exp
    exp = (
        pl.when(x.is_nan()).then(pl.lit(_NAN, pl.Int64))
        .when(x == float("inf")).then(pl.lit(_POS_INF, pl.Int64))
        .when(x == float("-inf")).then(pl.lit(_NEG_INF, pl.Int64))
        .otherwise(pl.max_horizontal(field.cast(pl.Int64), pl.lit(1, pl.Int64)) - 1075)
    )
    hi, lo = pl.col("m") // _LIMB, pl.col("m") % _LIMB
    sums = ("s", "h2", "hl", "l2")
    parts = [  # one group_by per column: Polars runs them side by side, faster than one over the unpivoted rows
        lf.select(*[pl.col(b) for b in by], e.cast(pl.Float64).alias("__value"))
        .drop_nulls("__value")
        .select(*[pl.col(b) for b in by], pl.lit(name, pl.String).alias("name"), exp.alias("exp"), m.alias("m"),
                (bits >= 2**63).alias("neg"))
        .select(*keys, pl.when(pl.col("neg")).then(-pl.col("m")).otherwise(pl.col("m")).alias("s"),
                (hi * hi).alias("h2"), (hi * lo).alias("hl"), (lo * lo).alias("l2"))  # each below 2**54: Int64
        .group_by(keys)
        .agg(pl.len().cast(pl.Int64).alias("n"), *[pl.col(c).cast(pl.Int128).sum() for c in sums])
        .select([*keys, "n", *sums])
        .cast({c: t for c, t in schema.items() if c not in by})
        for name, e in columns.items()
    ]
    return pl.concat(parts, how="vertical")


def merge_moments(parts: list[pl.DataFrame]) -> pl.DataFrame:
    """Several :func:`moment_partials` frames (same ``by`` columns) -> one, re-summed exactly."""
    whole = pl.concat(parts, how="vertical")
    keys = [c for c in whole.columns if c not in ("n", "s", "h2", "hl", "l2")]
    return whole.group_by(keys).agg(pl.col("n", "s", "h2", "hl", "l2").sum()).sort(keys)


@dataclass(frozen=True)
class Moments:
    """The exact count, sum and sum of squares of one column's non-null values.

    ``total`` and ``total_sq`` are rationals over the finite values; ``nan``, ``pos_inf`` and
    ``neg_inf`` count the others (``n`` includes them), so that :meth:`mean` and :meth:`std`
    follow Polars' rules for them (NaN and opposite infinities give NaN).
    """

    n: int
    total: Fraction
    total_sq: Fraction
    nan: int = 0
    pos_inf: int = 0
    neg_inf: int = 0

    EMPTY: ClassVar[Moments]

    @classmethod
    def of(cls, partials: pl.DataFrame) -> dict[str, Moments]:
        """Column name -> its moments, from a :func:`moment_partials` frame without ``by`` columns."""
        out: dict[str, Moments] = {}
        for name, group in merge_moments([partials]).partition_by("name", as_dict=True).items():
            n, total, total_sq, special = 0, Fraction(0), Fraction(0), {_NAN: 0, _POS_INF: 0, _NEG_INF: 0}
            for exp, count, s, h2, hl, l2 in group.select("exp", "n", "s", "h2", "hl", "l2").iter_rows():
                n += count
                if exp in special:
                    special[exp] += count
                    continue
                squares = h2 * _LIMB * _LIMB + 2 * hl * _LIMB + l2  # Σ m**2, exactly
                total += _scaled_by(s, exp)
                total_sq += _scaled_by(squares, 2 * exp)
            out[str(name[0])] = cls(n, total, total_sq, special[_NAN], special[_POS_INF], special[_NEG_INF])
        return out

    def mean(self) -> float | None:
        """The mean rounded once to float64 (``None`` without values, as Polars)."""
        if self.n == 0:
            return None
        if self.nan or (self.pos_inf and self.neg_inf):
            return float("nan")
        if self.pos_inf or self.neg_inf:
            return float("inf") if self.pos_inf else float("-inf")
        return _float(self.total / self.n)

    def std(self) -> float | None:
        """The sample standard deviation (ddof 1): ``sqrt`` of the exact variance rounded to float64."""
        if self.n < 2:
            return None
        if self.nan or self.pos_inf or self.neg_inf:
            return float("nan")
        var = (self.n * self.total_sq - self.total * self.total) / (self.n * (self.n - 1))
        return math.sqrt(_float(var))


Moments.EMPTY = Moments(0, Fraction(0), Fraction(0))


def _scaled_by(value: int, exp: int) -> Fraction:
    return Fraction(value * 2**exp) if exp >= 0 else Fraction(value, 2**-exp)


def _float(q: Fraction) -> float:
    """``q`` correctly rounded to float64 (Python divides integers exactly); beyond the range, infinity."""
    try:
        return q.numerator / q.denominator
    except OverflowError:
        return float("inf") if q > 0 else float("-inf")
