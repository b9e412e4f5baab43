"""The pipeline's lake: raw impressions copied in one date partition at a time, and the windows cut from it.

Layout under ``<workdir>/lake``::

    date=YYYY-MM-DD/part-0.parquet   one file per day, written atomically (tmp file + rename)

Ingest only adds days the lake lacks, so re-running it is free; a day is never rewritten
(a corrected upstream day needs ``--force``, which re-ingests the run's window).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import polars as pl

from features.datasets import Partitions, scan_partitions
from features.spec import FeatureSpec
from pipelines.config import PipelineConfig


def scan_source(cfg: PipelineConfig, spec: FeatureSpec) -> Partitions:
    """The raw source by day, through the dataset's adapter."""
    return scan_partitions(cfg.source.dataset, cfg.source.path, spec)


def synthesize_if_empty(cfg: PipelineConfig) -> int:
    """Write the generator's log into an empty synthetic source folder (``source.synthesize``); days written."""
    if not cfg.source.synthesize:
        return 0
    if cfg.source.dataset != "synthetic":
        raise ValueError(f"source.synthesize applies to the synthetic dataset only, not {cfg.source.dataset!r}")
    path = cfg.source.path
    if path.is_dir() and any(path.rglob("*.parquet")):
        return 0
    from features.synthetic import config_with, write_log

    synth = config_with(**cfg.source.synthesize)
    write_log(synth, path)
    return synth.days


def source_days(cfg: PipelineConfig, spec: FeatureSpec) -> list[date]:
    """Every day the source holds, oldest first."""
    return scan_source(cfg, spec).days()


def lake_days(lake: Path) -> list[date]:
    """Days already in the lake, oldest first."""
    if not lake.is_dir():
        return []
    days = []
    for part in lake.glob("date=*"):
        if (part / "part-0.parquet").is_file():
            try:
                days.append(date.fromisoformat(part.name.removeprefix("date=")))
            except ValueError:
                continue
    return sorted(days)


def partition(lake: Path, day: date) -> Path:
    return lake / f"date={day.isoformat()}" / "part-0.parquet"


@dataclass(frozen=True)
class IngestResult:
    new_days: list[date]
    rows: dict[str, int]  # iso day -> rows written this time


def ingest(
    cfg: PipelineConfig, spec: FeatureSpec, lake: Path, days: list[date], overwrite: bool = False
) -> IngestResult:
    """Copy the source's ``days`` the lake lacks (all of them when ``overwrite``) into the lake."""
    have = set(lake_days(lake))
    todo = [d for d in days if overwrite or d not in have]
    rows: dict[str, int] = {}
    source = scan_source(cfg, spec)
    for d in todo:
        target = partition(lake, d)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".parquet.tmp")
        source.on(d).sink_parquet(tmp)
        rows[d.isoformat()] = pl.scan_parquet(tmp).select(pl.len()).collect().item()
        os.replace(tmp, target)  # a killed ingest leaves a .tmp, never a half partition
    return IngestResult(todo, rows)


@dataclass(frozen=True)
class Windows:
    """The days of one run: train, validation (epoch selection) and holdout (challenger vs champion)."""

    as_of: date
    train: list[date]
    validation: list[date]
    holdout: list[date]

    def span(self, name: str) -> str:
        days: list[date] = getattr(self, name)
        return f"{days[0].isoformat()}..{days[-1].isoformat()}"

    def to_dict(self) -> dict[str, str]:
        spans = {name: self.span(name) for name in ("train", "validation", "holdout")}
        return spans | {"as_of": self.as_of.isoformat()}


def cut_windows(available: list[date], as_of: date, cfg: PipelineConfig) -> Windows:
    """Split the days up to ``as_of`` into the configured windows.

    Raises:
        ValueError: ``as_of`` has no data, or too few days for one training day plus the
            validation and holdout days.
    """
    days = sorted(d for d in available if d <= as_of)
    if as_of not in days:
        newest = max(available).isoformat() if available else "none"
        raise ValueError(f"--as-of {as_of.isoformat()} has no data in the source (newest day: {newest})")
    w = cfg.windows
    need = 1 + w.validation_days + w.holdout_days
    if len(days) < need:
        raise ValueError(
            f"as-of {as_of.isoformat()}: {len(days)} day(s) of data up to then, need at least {need} "
            f"(1 training + {w.validation_days} validation + {w.holdout_days} holdout)"
        )
    holdout = days[-w.holdout_days:]
    validation = days[-w.holdout_days - w.validation_days:-w.holdout_days]
    train = days[: -w.holdout_days - w.validation_days]
    if w.train_days:
        train = train[-w.train_days:]
    return Windows(as_of, train, validation, holdout)


def files(lake: Path, days: list[date]) -> list[Path]:
    return [partition(lake, d) for d in days]
