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

from features.build import scan_log


def scan(path: str | Path) -> pl.LazyFrame:
    """Scan a synthetic log: a Parquet file, or every Parquet file under a folder.

    Raises:
        ValueError: the path does not exist, or the folder holds no Parquet file.
    """
    return scan_log(path)
