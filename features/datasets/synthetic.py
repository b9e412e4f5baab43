"""Synthetic adapter: the generator's impression log (``ranker data synth``) -> one lazy frame.

The log is Parquet already in the spec's raw columns (``features/specs/synthetic.yaml``): one file,
or a folder of them, date-partitioned (``date=YYYY-MM-DD/part-0.parquet``, as
:func:`features.synthetic.write_log` writes it) or not. The folder names are not read as columns;
each row's day is its timestamp's.

Example:
    >>> scan("path/to/log").select("request_id", "item_id").head(1).collect().rows()  # doctest: +SKIP
    [(0, 4711)]
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from features.build import log_files, scan_log


def scan(path: str | Path) -> pl.LazyFrame:
    """Scan a synthetic log: a Parquet file, or every Parquet file under a folder.

    Raises:
        ValueError: the path does not exist, or the folder holds no Parquet file.
    """
    return scan_log(path)


def parts(path: str | Path) -> list[pl.LazyFrame]:
    """The log one Parquet file at a time: what ``features.build.build`` checks part by part, so its
    memory stays bounded by the largest file (duplicate keys are then found within a file)."""
    return [pl.scan_parquet(f) for f in log_files(path)]
