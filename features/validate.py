"""Row-level contract checks: rows that break the spec go to quarantine with a reason.

Each rule is a (reason, expression) pair; the first rule a row breaks is its reason. Nothing is
dropped silently: ``build`` writes quarantined rows to ``quarantine.parquet`` and counts them.

Example:
    >>> import polars as pl
    >>> from features.spec import load_spec
    >>> spec = load_spec("synthetic")
    >>> lf = pl.LazyFrame({"watch_time_s": [1.0, -2.0, None], "click": [1, 3, 0]})
    >>> with_reason(lf, spec).collect()[REASON].to_list()
    [None, 'click not in {0, 1}', 'null watch_time_s']
"""

from __future__ import annotations

import polars as pl
from polars.expr.whenthen import ChainedThen, Then

from features.spec import FeatureSpec

REASON = "quarantine_reason"


def rules(spec: FeatureSpec, columns: list[str]) -> list[tuple[str, pl.Expr]]:
    """The spec's row rules that apply to the given raw columns."""
    have = set(columns)
    out: list[tuple[str, pl.Expr]] = []
    required = [*spec.keys.present(), *(t.label for t in spec.tasks), *spec.validation.required]
    for c in dict.fromkeys(required):
        if c in have:
            out.append((f"null {c}", pl.col(c).is_null()))
    for t in spec.tasks:
        if t.label not in have:
            continue
        y = pl.col(t.label).cast(pl.Float64, strict=False)
        out.append((f"{t.label} not numeric", y.is_null() & pl.col(t.label).is_not_null()))
        if t.type == "binary" and t.threshold is None:
            out.append((f"{t.label} not in {{0, 1}}", ~y.is_in([0.0, 1.0])))
        if t.type == "regression" and t.label_transform == "log1p":
            out.append((f"{t.label} < 0", y < 0))
    for d in spec.dense:
        if d.raw not in have:
            continue
        x = pl.col(d.raw).cast(pl.Float64, strict=False)
        out.append((f"{d.raw} not numeric", x.is_null() & pl.col(d.raw).is_not_null()))
        out.append((f"{d.raw} not finite", x.is_infinite() | x.is_nan()))
        if d.valid_min is not None:
            out.append((f"{d.raw} < {d.valid_min:g}", x < d.valid_min))
    unique = [c for c in spec.validation.unique if c in have]
    if unique:
        # the first occurrence of a key is kept, later ones are duplicates
        out.append((f"duplicate ({', '.join(unique)})", pl.int_range(pl.len()).over(unique) > 0))
    return out


def with_reason(lf: pl.LazyFrame, spec: FeatureSpec) -> pl.LazyFrame:
    """Add a ``quarantine_reason`` column: null for good rows, else the first broken rule."""
    checks = rules(spec, lf.collect_schema().names())
    if not checks:
        return lf.with_columns(pl.lit(None, dtype=pl.String).alias(REASON))
    expr: Then | ChainedThen = pl.when(checks[0][1].fill_null(False)).then(pl.lit(checks[0][0]))
    for reason, bad in checks[1:]:
        expr = expr.when(bad.fill_null(False)).then(pl.lit(reason))
    return lf.with_columns(expr.otherwise(pl.lit(None, dtype=pl.String)).alias(REASON))
