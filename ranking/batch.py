"""The batch type and a columnar in-memory table that slices model-ready data into batches.

One path builds batches for training, validation and serving: a :class:`FeatureTable` made from a
model-ready Polars frame (``s_*``, ``d_*``, ``y_*``, ``position`` columns, see ``features.fitted``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch
from torchrec import KeyedJaggedTensor

from features.fitted import dense_col, label_col, sparse_col
from ranking.config import ModelConfig


@dataclass
class Batch:
    """Model inputs and training targets for B rows.

    Attributes:
        sparse: ids per sparse feature, keys in config order.
        dense: (B, Dd) standardised numerics.
        position: (B,) display position, or None (serving).
        labels: task -> (B,) float targets (0 where missing; see ``masks``).
        masks: task -> (B,) bool, True where the label is present.
        extra: evaluation-only columns, e.g. ``"user"``/``"request"`` (B,) int64 group ids and
            passthrough floats such as ``"true_relevance"``; empty in training.
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    position: torch.Tensor | None
    labels: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            sparse=self.sparse.to(torch.device(device), non_blocking=non_blocking),
            dense=self.dense.to(device, non_blocking=non_blocking),
            position=None if self.position is None else self.position.to(device, non_blocking=non_blocking),
            labels={k: v.to(device, non_blocking=non_blocking) for k, v in self.labels.items()},
            masks={k: v.to(device, non_blocking=non_blocking) for k, v in self.masks.items()},
            extra=self.extra,  # evaluation bookkeeping stays on the CPU
        )

    def __len__(self) -> int:
        return int(self.dense.shape[0])


class FeatureTable:
    """Model-ready rows held as tensors; ``batch(idx)`` gathers rows into a :class:`Batch`.

    Multi-valued features are stored padded with -1 to their ``max_len`` so a random gather is one
    indexing op; padding is removed when the KeyedJaggedTensor is built.

    Example:
        >>> import polars as pl
        >>> from ranking.config import SparseSlot, TaskHead
        >>> cfg = ModelConfig(sparse=(SparseSlot("u", 5, 2), SparseSlot("tags", 5, 2, multi=True, max_len=3)),
        ...                   dense=(), tasks=(TaskHead("click", "binary", "engagement"),))
        >>> df = pl.DataFrame({"s_u": [1, 2], "s_tags": [[1, 2], []], "y_click": [1.0, None]})
        >>> b = FeatureTable(df, cfg).batch(torch.tensor([0, 1]))
        >>> b.sparse["tags"].lengths().tolist(), b.masks["click"].tolist()
        ([2, 0], [True, False])
    """

    def __init__(self, frame: pl.DataFrame, config: ModelConfig, extra: dict[str, str] | None = None) -> None:
        """``extra`` maps a name to a column to carry for evaluation: ids (any type) become dense
        int64 group ids, float columns stay floats (e.g. ``{"user": "user_id", "request": "request_id"}``).
        """
        self.config = config
        self.keys = [s.name for s in config.sparse]
        self.n = frame.height
        self.single_names = [s.name for s in config.sparse if not s.multi]
        self.single = torch.from_numpy(
            np.ascontiguousarray(_int_matrix(frame, [sparse_col(n) for n in self.single_names]).T)
        )  # (F_single, N), key-major: a batch's ids are then already in KeyedJaggedTensor order
        self.multi = {
            s.name: torch.from_numpy(_padded(frame[sparse_col(s.name)], s.max_len))  # (N, L)
            for s in config.sparse
            if s.multi
        }
        self.dense = torch.from_numpy(
            frame.select([pl.col(dense_col(d)).cast(pl.Float32) for d in config.dense])
            .to_numpy()
            .reshape(self.n, len(config.dense))
            .astype(np.float32, order="C", copy=True)
        )  # (N, Dd), row-major
        self.position = (
            torch.from_numpy(frame["position"].cast(pl.Int64).to_numpy().copy())
            if "position" in frame.columns
            else None
        )
        self.extra: dict[str, torch.Tensor] = {}
        for name, col in (extra or {}).items():
            if col not in frame.columns:
                continue
            series = frame[col]
            if series.dtype.is_float():
                self.extra[name] = torch.from_numpy(series.cast(pl.Float64).to_numpy().copy())
            else:
                self.extra[name] = torch.from_numpy(series.rank("dense").cast(pl.Int64).to_numpy().copy())
        self.labels: dict[str, torch.Tensor] = {}
        for t in config.tasks:
            c = label_col(t.name)
            if c in frame.columns:
                self.labels[t.name] = torch.from_numpy(
                    frame[c].cast(pl.Float32).to_numpy(allow_copy=True).astype(np.float32, copy=True)
                )

    def __len__(self) -> int:
        return self.n

    def batch(self, idx: torch.Tensor) -> Batch:
        """Gather rows ``idx`` (B,) into a Batch."""
        b = idx.shape[0]
        # index_select, not tensor[idx]: the advanced-indexing kernel is several times slower on CPU
        single = self.single.index_select(1, idx)  # (F_single, B)
        if not self.multi:  # every feature single-valued, keys in row order: no per-key loop
            sparse = KeyedJaggedTensor(keys=self.keys, values=single.reshape(-1),  # key-major
                                       lengths=torch.ones(b * len(self.keys), dtype=torch.int64))
        else:
            values, lengths = [], []
            col = {n: j for j, n in enumerate(self.single_names)}
            for k in self.keys:
                if k in col:
                    values.append(single[col[k]])
                    lengths.append(torch.ones(b, dtype=torch.int64))
                else:
                    padded = self.multi[k].index_select(0, idx)  # (B, L), -1 = padding
                    keep = padded >= 0
                    values.append(padded[keep])
                    lengths.append(keep.sum(dim=1))
            sparse = KeyedJaggedTensor(keys=self.keys, values=torch.cat(values), lengths=torch.cat(lengths))
        labels, masks = {}, {}
        for t, y in self.labels.items():
            yb = y.index_select(0, idx)
            present = ~torch.isnan(yb)
            labels[t] = torch.where(present, yb, torch.zeros_like(yb))
            masks[t] = present
        return Batch(
            sparse=sparse,
            dense=self.dense.index_select(0, idx),
            position=None if self.position is None else self.position.index_select(0, idx),
            labels=labels,
            masks=masks,
            extra={k: v.index_select(0, idx) for k, v in self.extra.items()},
        )

    def all(self) -> Batch:
        return self.batch(torch.arange(self.n))


def _int_matrix(frame: pl.DataFrame, cols: list[str]) -> np.ndarray:
    if not cols:
        return np.zeros((frame.height, 0), dtype=np.int64)
    return frame.select([pl.col(c).cast(pl.Int64) for c in cols]).to_numpy().astype(np.int64, copy=True)  # (N, F)


def _padded(series: pl.Series, max_len: int) -> np.ndarray:
    """List column -> (N, max_len) int64 matrix padded with -1, built without a Python row loop."""
    s = series.list.head(max_len)
    lengths = s.list.len().fill_null(0).to_numpy().astype(np.int64)
    flat = s.explode(empty_as_null=False, keep_nulls=False).fill_null(0).cast(pl.Int64).to_numpy()
    out = np.full((len(s), max_len), -1, dtype=np.int64)
    rows = np.repeat(np.arange(len(s)), lengths)
    starts = np.cumsum(lengths) - lengths
    cols = np.arange(lengths.sum()) - np.repeat(starts, lengths)
    out[rows, cols] = flat
    return out
