"""Raw impression log (date-partitioned Parquet) -> model-ready Parquet + fitted transform.

Layout written to ``out``::

    train.parquet  val.parquet  transform.json  summary.json
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from features.fitted import FittedTransform, label_col
from features.spec import FeatureSpec


@dataclass(frozen=True)
class BuildSummary:
    """What a build produced; printed by the CLI and saved as ``summary.json``."""

    dataset: str
    rows: dict[str, int]
    label_rates: dict[str, dict[str, float]]  # split -> task -> mean label (rate for binary)
    vocab_sizes: dict[str, int]
    train_window: dict[str, str]
    val_window: dict[str, str]
    transform_hash: str
    extra: dict[str, Any] = field(default_factory=dict)


def scan_log(path: str | Path) -> pl.LazyFrame:
    """Scan a Parquet file or a folder of (hive date-partitioned) Parquet files."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise ValueError(f"no Parquet files under input folder {str(path)!r}")
        return pl.scan_parquet(files, hive_partitioning=False)
    if not path.is_file():
        raise ValueError(f"input not found: {str(path)!r}")
    return pl.scan_parquet(path)


def split_dates(lf: pl.LazyFrame, spec: FeatureSpec, train_end: date | None = None) -> tuple[date, date, date]:
    """(first day, last training day, last day); validation = the days after the last training day."""
    ts = pl.col(spec.keys.timestamp)
    row = lf.select(ts.min().dt.date().alias("lo"), ts.max().dt.date().alias("hi")).collect().row(0)
    lo, hi = row
    if lo is None:
        raise ValueError("input log is empty")
    end = train_end if train_end is not None else hi - timedelta(days=spec.split.validation_days)
    if end < lo or end >= hi:
        raise ValueError(
            f"train_end {end} leaves no training or no validation days in the log's window {lo}..{hi}"
        )
    return lo, end, hi


def build(
    input_path: str | Path, spec: FeatureSpec, out: str | Path, train_end: date | None = None
) -> BuildSummary:
    """Split by time, fit on the training window only, transform both splits, write them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lf = scan_log(input_path)
    lo, end, hi = split_dates(lf, spec, train_end)
    day = pl.col(spec.keys.timestamp).dt.date()
    train = lf.filter(day <= end)
    val = lf.filter(day > end)
    fitted = FittedTransform.fit(train, spec)
    fitted.save(out / "transform.json")
    rows, rates = {}, {}
    for name, part in (("train", train), ("val", val)):
        path = out / f"{name}.parquet"
        fitted.transform(part).sink_parquet(path)
        stats = pl.scan_parquet(path).select(
            [pl.len().alias("__rows")] + [pl.col(label_col(t.name)).mean().alias(t.name) for t in spec.tasks]
        ).collect().row(0, named=True)
        rows[name] = int(stats.pop("__rows"))
        rates[name] = {k: round(float(v or 0.0), 5) for k, v in stats.items()}
    summary = BuildSummary(
        dataset=spec.name,
        rows=rows,
        label_rates=rates,
        vocab_sizes={k: v.size for k, v in fitted.vocabs.items()},
        train_window={"start": lo.isoformat(), "end": end.isoformat()},
        val_window={"start": (end + timedelta(days=1)).isoformat(), "end": hi.isoformat()},
        transform_hash=fitted.content_hash,
    )
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary
