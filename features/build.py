"""Raw impressions -> validated, split, model-ready Parquet plus the fitted transform.

Layout written to ``out``::

    train.parquet  val.parquet  [test.parquet]  transform.json  [quarantine.parquet]  summary.json

``quarantine.parquet`` is the build's own check; rows that come checked (``build(..., checked=...)``,
the pipeline's validate step) are not checked again and leave none.

Everything runs on Polars lazy frames and is written with ``sink_parquet`` (streaming), so the
input is never materialised as a whole except where the spec asks for duplicate detection.
The Ray Data engine (:mod:`features.ray_data`, ``--engine ray``) builds the same folder from the
pieces here (:func:`split_rule`, :func:`check_counts`, :class:`SplitTally`, :func:`write_summary`)
and the fitted transform's own per-block statistics (:class:`features.fitted.FitPartial`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from features.fitted import FittedTransform, label_col
from features.moments import STREAM_APART, Moments, moment_partials
from features.spec import FeatureSpec
from features.validate import REASON, CheckCounts, with_reason

SPLITS = ("train", "val", "test")
SPLIT = "__split"


@dataclass(frozen=True)
class BuildSummary:
    """What a build produced; printed by the CLI and saved as ``summary.json``."""

    dataset: str
    rows: dict[str, int]  # split -> rows written
    label_rates: dict[str, dict[str, float]]  # split -> task -> mean label (rate for binary)
    vocab_sizes: dict[str, int]  # feature -> table rows (values + the OOV id 0)
    windows: dict[str, dict[str, str]]  # split -> {"start", "end"} dates, where the data has dates
    transform_hash: str
    rows_in: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)  # reason -> rows
    extra: dict[str, Any] = field(default_factory=dict)


def log_files(path: str | Path) -> list[Path]:
    """The Parquet files of a log: the file itself, or every file under a (date-partitioned) folder."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise ValueError(f"no Parquet files under input folder {str(path)!r}")
        return files
    if not path.is_file():
        raise ValueError(f"input not found: {str(path)!r}")
    return [path]


def scan_log(path: str | Path) -> pl.LazyFrame:
    """Scan a Parquet file or a folder of (date-partitioned) Parquet files as one frame."""
    return pl.scan_parquet(log_files(path), hive_partitioning=False)


def day_expr(spec: FeatureSpec) -> pl.Expr | None:
    """Each row's day (``pl.Date``) by the spec's date column or timestamp key; ``None`` when it has neither."""
    s = spec.split
    if s.date_column is not None:
        return pl.col(s.date_column).cast(pl.Date)
    if spec.keys.timestamp is not None:
        return pl.col(spec.keys.timestamp).dt.date()
    return None


def split_expr(lf: pl.LazyFrame, spec: FeatureSpec, train_end: date | None = None) -> pl.Expr:
    """An expression naming each row's split (train / val / test) by the spec's rule."""

    def day_range() -> tuple[date | None, date | None]:
        day = day_expr(spec)
        assert day is not None  # split_rule asks only once it has checked that rows have days
        lo, hi = lf.select(day.min().alias("lo"), day.max().alias("hi")).collect(engine="streaming").row(0)
        return lo, hi

    return split_rule(spec, train_end, day_range)


def split_rule(
    spec: FeatureSpec, train_end: date | None, day_range: Callable[[], tuple[date | None, date | None]]
) -> pl.Expr:
    """The split expression once the rows' first and last day are known (``day_range``, asked only
    by the ``last_days`` rule): what :func:`split_expr` and the Ray engine's distributed min/max share."""
    s = spec.split
    if s.kind == "column":
        if train_end is not None:
            raise ValueError(f"--train-end does not apply: dataset {spec.name!r} has a fixed split column")
        return pl.col(s.column).cast(pl.String)
    day = day_expr(spec)
    if day is None:
        raise ValueError(f"split kind {s.kind!r} needs a timestamp key or split.date_column")
    if s.kind == "last_days":
        lo, hi = day_range()
        if lo is None or hi is None:
            raise ValueError("input log is empty")
        end = train_end if train_end is not None else hi - timedelta(days=s.validation_days)
        if end < lo or end >= hi:
            raise ValueError(f"train_end {end} leaves no training or no validation days in {lo}..{hi}")
        return pl.when(day <= end).then(pl.lit("train")).otherwise(pl.lit("val"))
    assert s.train_end is not None and s.val_end is not None  # the spec validator guarantees both
    end = train_end if train_end is not None else s.train_end
    val_end = end + (s.val_end - s.train_end)
    return pl.when(day <= end).then(pl.lit("train")).when(day <= val_end).then(pl.lit("val")).otherwise(
        pl.lit("test")
    )


def build(
    source: str | Path | Sequence[Path] | Sequence[pl.LazyFrame] | pl.LazyFrame,
    spec: FeatureSpec,
    out: str | Path,
    train_end: date | None = None,
    checked: CheckCounts | None = None,
) -> BuildSummary:
    """Validate (quarantine) unless ``checked``, split, fit on the training rows only, transform, write each split.

    A path source (a file, a folder, or a list of partition files) is read partition by partition
    (one Parquet file at a time) for the checking pass, so memory stays bounded by the largest
    partition; duplicate keys are then detected within a partition. A list of LazyFrames (an
    adapter's parts, ``features.datasets.scan_parts``) is checked one frame at a time the same way;
    one LazyFrame is checked as a whole.

    Args:
        checked: the source holds only rows that already passed :func:`features.validate.with_reason`
            (the pipeline's validate step, which keeps its own quarantine), and these are that check's
            counts. The build then checks nothing: no quarantine file, no ``max_bad_fraction``; the
            summary reports ``checked``. ``None`` (the default) checks here.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(source, pl.LazyFrame):
        parts = [source]
    elif isinstance(source, Sequence) and source and all(isinstance(p, pl.LazyFrame) for p in source):
        parts = [p for p in source if isinstance(p, pl.LazyFrame)]
    else:
        files = ([Path(f) for f in source if not isinstance(f, pl.LazyFrame)]
                 if isinstance(source, Sequence) and not isinstance(source, str) else log_files(source))
        if not files:
            raise ValueError("no input files given")
        parts = [pl.scan_parquet(f) for f in files]
    whole = pl.concat(parts, how="vertical") if len(parts) > 1 else parts[0]
    split = split_expr(whole, spec, train_end)
    if checked is not None:
        (out / "quarantine.parquet").unlink(missing_ok=True)  # an earlier build's, which these rows never saw
        return _write_splits(whole.with_columns(split.alias(SPLIT)), spec, out, checked)
    # One streaming pass per partition checks every row and names its split; the rest reads it back.
    staged = out / "_staged"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    try:
        for i, part in enumerate(parts):
            with_reason(part, spec).with_columns(split.alias(SPLIT)).sink_parquet(staged / f"part-{i:05d}.parquet")
        rows = pl.scan_parquet(staged / "*.parquet")
        counts = _quarantine(rows, spec, out)
        return _write_splits(rows.filter(pl.col(REASON).is_null()).drop(REASON), spec, out, counts)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _quarantine(staged: pl.LazyFrame, spec: FeatureSpec, out: Path) -> CheckCounts:
    """Write the rows that break the spec to ``quarantine.parquet``; fail above ``max_bad_fraction``."""
    staged.filter(pl.col(REASON).is_not_null()).drop(SPLIT).sink_parquet(out / "quarantine.parquet")
    counts = CheckCounts.of(staged.group_by(REASON).len().collect(engine="streaming"))
    check_counts(counts, spec)
    return counts


def check_counts(counts: CheckCounts, spec: FeatureSpec) -> None:
    """Fail on an empty input, or when more than ``max_bad_fraction`` of the rows break the spec."""
    if counts.rows == 0:
        raise ValueError("input has no rows")
    if counts.bad / counts.rows > spec.validation.max_bad_fraction:
        top = dict(list(counts.quarantined.items())[:3])
        raise ValueError(
            f"{counts.bad} of {counts.rows} rows ({counts.bad / counts.rows:.0%}) break the {spec.name!r} spec, "
            f"more than max_bad_fraction {spec.validation.max_bad_fraction:.0%}; top reasons: {top}"
        )


def check_split_names(first_unknown: object, spec: FeatureSpec) -> None:
    """Fail when a good row names a split other than train / val / test (``None``: none does)."""
    if first_unknown is not None:
        raise ValueError(f"split column {spec.split.column!r} holds {first_unknown!r}; expected one of {SPLITS}")


def check_fitted(fitted: FittedTransform) -> None:
    if fitted.rows == 0:
        raise ValueError("no training rows after the split; check --train-end and the data's dates")


@dataclass(frozen=True)
class SplitTally:
    """What the summary reports of one split: its rows, each task's exact label sums, its first and last day."""

    rows: int
    labels: dict[str, Moments]  # task -> sums of its model-ready label y_<task>
    days: tuple[date | None, date | None] | None  # None: the spec gives rows no day


def split_tally(model_ready: pl.LazyFrame, raw: pl.LazyFrame, spec: FeatureSpec) -> SplitTally:
    """One written split's tally: rows and label sums from its model-ready rows, days from its raw rows."""
    labels = {t.name: pl.col(label_col(t.name)) for t in spec.tasks}
    sums, n = pl.collect_all([moment_partials(model_ready, labels), model_ready.select(pl.len())], engine="streaming",
                             optimizations=STREAM_APART)
    day = day_expr(spec)
    days = None
    if day is not None:
        days = raw.select(day.min().alias("lo"), day.max().alias("hi")).collect(engine="streaming").row(0)
    found = Moments.of(sums)
    return SplitTally(int(n.item()), {t: found.get(t, Moments.EMPTY) for t in labels}, days)


def _write_splits(good: pl.LazyFrame, spec: FeatureSpec, out: Path, counts: CheckCounts) -> BuildSummary:
    """Good rows (each with its split in ``SPLIT``) -> the fitted transform, every split's Parquet, the summary."""
    unknown = good.filter(~pl.col(SPLIT).is_in(SPLITS)).select(pl.col(SPLIT).first()).collect(engine="streaming")
    check_split_names(unknown.item() if unknown.height else None, spec)

    fitted = FittedTransform.fit(good.filter(pl.col(SPLIT) == "train"), spec)
    check_fitted(fitted)
    fitted.save(out / "transform.json")

    tallies = {}
    for name in SPLITS:
        part = good.filter(pl.col(SPLIT) == name)
        path = out / f"{name}.parquet"
        path.unlink(missing_ok=True)
        fitted.transform(part).sink_parquet(path)
        tallies[name] = split_tally(pl.scan_parquet(path), part, spec)
    return write_summary(out, spec, fitted, tallies, counts)


def write_summary(
    out: Path, spec: FeatureSpec, fitted: FittedTransform, tallies: dict[str, SplitTally], counts: CheckCounts
) -> BuildSummary:
    """The build's summary from every split's tally, saved as ``summary.json`` (an empty test split's file goes).

    Label rates are the exact means (:class:`features.moments.Moments`) rounded to 5 places, so they
    do not depend on the order rows were summed in (the Ray engine sums per block).
    """
    rows, rates, windows = {}, {}, {}
    for name in SPLITS:
        tally = tallies[name]
        if tally.rows == 0 and name == "test":
            (out / f"{name}.parquet").unlink(missing_ok=True)
            continue
        rows[name] = tally.rows
        rates[name] = {t.name: round(float(tally.labels[t.name].mean() or 0.0), 5) for t in spec.tasks}
        if tally.days is not None:
            lo, hi = tally.days
            windows[name] = {"start": str(lo), "end": str(hi)}
    summary = BuildSummary(
        dataset=spec.name,
        rows=rows,
        label_rates=rates,
        vocab_sizes={f.name: fitted.table_size(f.name) for f in spec.sparse},
        windows=windows,
        transform_hash=fitted.content_hash,
        rows_in=counts.rows,
        quarantined=counts.quarantined,
    )
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary
