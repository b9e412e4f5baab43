"""Column types a serving request's candidate features arrive in, without a DataFrame.

A decoded request holds each candidate feature as a flat column: a numpy array (ints, floats), a
list of strings, or a :class:`Jagged` column (multi-valued features: flattened values plus one
length per candidate, as the API sends them). The serving plan (``features.plan``) reads these
directly; the Polars reference transform (``FittedTransform.transform_request``) turns a
:class:`Jagged` into a list Series first.

Shape letters: C candidates, L total entries of a jagged column.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa


class Jagged(NamedTuple):
    """A multi-valued column: candidate ``i`` owns ``values[offsets[i]:offsets[i + 1]]``.

    Attributes:
        values: (L,) int64 ndarray, or a list of L strings.
        lengths: (C,) int64 ndarray, summing to L.

    Example:
        >>> col = Jagged(np.array([3, 4, 5]), np.array([2, 0, 1]))
        >>> col.to_series().to_list()
        [[3, 4], [], [5]]
        >>> len(col)
        3
    """

    values: np.ndarray | list[str]  # int64, or str (a numpy str array from the decoder, or a list)
    lengths: np.ndarray

    def __len__(self) -> int:  # a column's length is its candidates
        return len(self.lengths)

    def offsets(self) -> np.ndarray:
        """(C + 1,) start of each candidate's list, and the end."""
        out = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=out[1:])
        return out

    def to_series(self) -> pl.Series:
        """The column as a Polars list Series (what the reference transform takes)."""
        strings = not isinstance(self.values, np.ndarray) or self.values.dtype.kind in "OUS"
        inner = pa.string() if strings else pa.int64()
        values = self.values.tolist() if isinstance(self.values, np.ndarray) else list(self.values)
        flat = pa.array(values, type=inner)  # (L,)
        return pl.Series(pa.LargeListArray.from_arrays(pa.array(self.offsets(), type=pa.int64()), flat))

    @classmethod
    def from_lists(cls, lists: Any) -> Jagged:
        """A list of lists (or a Polars list Series) -> Jagged; a null list becomes an empty one.

        For callers outside the hot path (tests, the CLI); the API sends columns already flat.
        """
        s = lists if isinstance(lists, pl.Series) else pl.Series(list(lists))
        lengths = s.list.len().fill_null(0).cast(pl.Int64).to_numpy()
        flat = s.explode(empty_as_null=False, keep_nulls=False)
        if flat.dtype == pl.String:
            return cls(flat.to_list(), lengths)
        return cls(flat.cast(pl.Int64).to_numpy(), lengths)
