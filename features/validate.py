"""Row-level contract checks: rows that break the spec go to quarantine with a reason.

Each rule is a (reason, expression) pair; the first rule a row breaks is its reason. Nothing is
dropped silently: ``build`` writes quarantined rows to ``quarantine.parquet`` and counts them
(:class:`CheckCounts`); rows checked once upstream reach ``build`` with their counts instead.

Example:
    >>> import polars as pl
    >>> from features.spec import load_spec
    >>> spec = load_spec("synthetic")
    >>> lf = pl.LazyFrame({"watch_time_s": [1.0, -2.0, None], "click": [1, 3, 0]})
    >>> with_reason(lf, spec).collect()[REASON].to_list()
    [None, 'click not in {0, 1}', 'null watch_time_s']
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class CheckCounts:
    """What one check of some rows found: how many rows it saw, and the quarantined ones by reason.

    Example:
        >>> checked = pl.DataFrame({REASON: [None, "null user_id", "x < 0"], "len": [7, 2, 1]})
        >>> counts = CheckCounts.of(checked)
        >>> counts.rows, counts.quarantined, counts.bad
        (10, {'null user_id': 2, 'x < 0': 1}, 3)
        >>> (counts + counts).quarantined
        {'null user_id': 4, 'x < 0': 2}
    """

    rows: int
    quarantined: dict[str, int]  # reason -> rows, most frequent first (ties by name)

    @classmethod
    def of(cls, counts: pl.DataFrame) -> CheckCounts:
        """From ``group_by(REASON).len()`` of checked rows (``REASON`` null: the good rows)."""
        bad = counts.filter(pl.col(REASON).is_not_null()).sort(["len", REASON], descending=[True, False])
        return cls(int(counts["len"].sum()), {str(r): int(n) for r, n in bad.select(REASON, "len").iter_rows()})

    @property
    def bad(self) -> int:
        return sum(self.quarantined.values())

    def __add__(self, other: CheckCounts) -> CheckCounts:
        merged = dict(self.quarantined)
        for reason, n in other.quarantined.items():
            merged[reason] = merged.get(reason, 0) + n
        return CheckCounts(self.rows + other.rows, dict(sorted(merged.items(), key=lambda kv: (-kv[1], kv[0]))))
