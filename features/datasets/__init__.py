"""Dataset adapters: a dataset's files -> one lazy frame of raw rows that its spec describes.

Each adapter (``features/datasets/<name>.py``) has a ``scan(path)`` that returns a
``pl.LazyFrame`` whose columns the dataset's spec (``features/specs/<name>.yaml``) names: keys,
raw inputs, labels and, where the split is fixed by the data, a split column. Nothing is collected
until the build runs. :func:`scan_partitions` gives any of them as days (:class:`Partitions`),
which is how the pipeline's lake reads a source whatever the dataset.

Example:
    >>> sorted(ADAPTERS)
    ['census', 'kuairand', 'synthetic']
    >>> scan_dataset("movielens", "data/")
    Traceback (most recent call last):
    ...
    ValueError: unknown dataset 'movielens'; known: ['census', 'kuairand', 'synthetic']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import polars as pl

from features.build import day_expr
from features.datasets import census, kuairand, synthetic
from features.spec import FeatureSpec

ADAPTERS: dict[str, Callable[[str | Path], pl.LazyFrame]] = {
    "synthetic": synthetic.scan,
    "kuairand": kuairand.scan,
    "census": census.scan,
}
# Adapters whose files split into parts the build checks one at a time (bounded memory); the others
# give one frame.
PARTS: dict[str, Callable[[str | Path], list[pl.LazyFrame]]] = {"synthetic": synthetic.parts}
_DAY = "__day"


@dataclass(frozen=True)
class Partitions:
    """A source's rows by day: every raw row as one lazy frame, and the expression naming each row's day.

    Example:
        >>> from datetime import datetime
        >>> rows = pl.LazyFrame({"ts": [datetime(2026, 1, 2, 9), datetime(2026, 1, 1, 8), datetime(2026, 1, 2)]})
        >>> parts = Partitions(rows, pl.col("ts").dt.date())
        >>> parts.days()
        [datetime.date(2026, 1, 1), datetime.date(2026, 1, 2)]
        >>> parts.on(date(2026, 1, 2)).select(pl.len()).collect().item()
        2
    """

    frame: pl.LazyFrame
    day: pl.Expr  # pl.Date

    def days(self) -> list[date]:
        """Every day the rows hold, oldest first (rows without a day belong to none)."""
        got = self.frame.select(self.day.unique().alias(_DAY)).collect(engine="streaming")
        return sorted(d for d in got[_DAY].to_list() if d is not None)

    def on(self, day: date) -> pl.LazyFrame:
        """The rows of one day."""
        return self.frame.filter(self.day == day)


def scan_dataset(name: str, path: str | Path) -> pl.LazyFrame:
    """Scan ``path`` with the adapter registered as ``name``.

    Raises:
        ValueError: ``name`` is not a registered dataset, or the adapter rejects the files.
    """
    return _adapter(name)(path)


def scan_partitions(name: str, path: str | Path, spec: FeatureSpec) -> Partitions:
    """Scan ``path`` with the adapter ``name``, cut into days by ``spec`` (its date column or timestamp key).

    Raises:
        ValueError: ``name`` is not a registered dataset, the adapter rejects the files, or the
            spec gives rows no day (a dataset with a fixed split column, such as census).
    """
    scan = _adapter(name)
    day = day_expr(spec)
    if day is None:
        raise ValueError(f"dataset {spec.name!r} has no date column or timestamp key: its rows have no day")
    return Partitions(scan(path), day)


def scan_parts(name: str, path: str | Path) -> list[pl.LazyFrame]:
    """The source as the parts ``features.build.build`` checks one at a time: an adapter's own split
    (the synthetic log: one per Parquet file), else the one frame of :func:`scan_dataset`.

    Raises:
        ValueError: as :func:`scan_dataset`.
    """
    _adapter(name)
    return PARTS[name](path) if name in PARTS else [scan_dataset(name, path)]


def _adapter(name: str) -> Callable[[str | Path], pl.LazyFrame]:
    if name not in ADAPTERS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(ADAPTERS)}")
    return ADAPTERS[name]


__all__ = ["ADAPTERS", "PARTS", "Partitions", "scan_dataset", "scan_partitions", "scan_parts"]
