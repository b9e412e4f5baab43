"""Lightning data module over a model-ready features folder (``train.parquet``, ``val.parquet``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lightning as L
import polars as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from features.fitted import FittedTransform
from ranking.batch import Batch, FeatureTable
from ranking.config import ModelConfig


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled row batches, reproducible per epoch and shardable across processes.

    The permutation of epoch ``e`` depends only on ``(seed, e)``, so a run resumed from a
    checkpoint sees exactly the batches an uninterrupted run would. With ``num_replicas > 1`` each
    rank takes every ``num_replicas``-th row of the permutation (DistributedSampler semantics, the
    tail padded by wrapping so every rank runs the same number of steps).
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def _rows(self) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        if self.num_replicas > 1:
            per_rank = -(-self.n // self.num_replicas)  # ceil
            order = order.repeat(2)[: per_rank * self.num_replicas] if self.n else order
            order = order[self.rank :: self.num_replicas]
        return order

    def __iter__(self) -> Iterator[list[int]]:
        rows = self._rows()
        for start in range(0, len(rows), self.batch_size):
            yield rows[start : start + self.batch_size].tolist()

    def __len__(self) -> int:
        per_rank = -(-self.n // self.num_replicas)
        return -(-per_rank // self.batch_size)


class _TableDataset(Dataset[Batch]):
    """Indexed by a list of row ids (from a BatchSampler), returns one whole Batch."""

    def __init__(self, table: FeatureTable) -> None:
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, rows: list[int]) -> Batch:
        return self.table.batch(torch.as_tensor(rows, dtype=torch.int64))


def features_transform_path(features_dir: str | Path) -> Path:
    """``features_dir/transform.json``, with a clear error when the folder is not a features folder."""
    path = Path(features_dir) / "transform.json"
    if not path.is_file():
        raise ValueError(f"not a features folder (no transform.json): {str(features_dir)!r}")
    return path


def load_features(features_dir: str | Path) -> FittedTransform:
    """The fitted transform of a features folder, with a clear error when it is not one."""
    return FittedTransform.load(features_transform_path(features_dir))


class RankingDataModule(L.LightningDataModule):
    """Loads both splits into memory once and serves shuffled training batches.

    Args:
        features_dir: output of ``ranker features build``.
        config: model config (decides which columns become tensors).
        batch_size: rows per batch.
        seed: shuffling seed.
    """

    def __init__(self, features_dir: str | Path, config: ModelConfig, batch_size: int = 1024, seed: int = 0):
        super().__init__()
        self.dir = Path(features_dir)
        self.config = config
        self.batch_size = batch_size
        self.seed = seed
        self.tables: dict[str, FeatureTable] = {}

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val"):
            if split not in self.tables:
                path = self.dir / f"{split}.parquet"
                if not path.is_file():
                    raise ValueError(f"features folder {str(self.dir)!r} lacks {split}.parquet")
                self.tables[split] = FeatureTable(pl.read_parquet(path), self.config)

    def _loader(self, split: str, shuffle: bool) -> DataLoader[Batch]:
        table = self.tables[split]
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if not shuffle:  # evaluation: every rank sees the whole split (metrics need all rows)
            replicas, rank = 1, 0
        sampler = EpochBatchSampler(len(table), self.batch_size, shuffle, self.seed, replicas, rank)
        return DataLoader(_TableDataset(table), sampler=sampler, batch_size=None)

    def train_dataloader(self) -> DataLoader[Batch]:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader[Batch]:
        return self._loader("val", shuffle=False)
