"""Dataset adapters: a dataset's files -> one lazy frame of raw rows that its spec describes.

Each adapter takes a path and returns a ``pl.LazyFrame`` whose columns the dataset's spec
(``features/specs/<name>.yaml``) names: keys, raw inputs, labels and, where the split is fixed by
the data, a split column. Nothing is collected until the build runs.

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
from pathlib import Path

import polars as pl

from features.datasets import census, kuairand


def _synthetic(path: str | Path) -> pl.LazyFrame:
    """The synthetic log (a Parquet file or a folder of them), as written by ``ranker data synth``."""
    from features.build import scan_log  # lazily: features.build imports this registry

    return scan_log(path)


ADAPTERS: dict[str, Callable[[str | Path], pl.LazyFrame]] = {
    "synthetic": _synthetic,
    "kuairand": kuairand.scan,
    "census": census.scan,
}


def scan_dataset(name: str, path: str | Path) -> pl.LazyFrame:
    """Scan ``path`` with the adapter registered as ``name``.

    Raises:
        ValueError: ``name`` is not a registered dataset, or the adapter rejects the files.
    """
    if name not in ADAPTERS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(ADAPTERS)}")
    return ADAPTERS[name](path)


__all__ = ["ADAPTERS", "scan_dataset"]
