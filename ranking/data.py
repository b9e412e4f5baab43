"""Lightning data module over a model-ready features folder (``train.parquet``, ``val.parquet``)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import polars as pl
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from features.fitted import FittedTransform
from ranking.batch import Batch, FeatureTable
from ranking.config import ModelConfig


class _TableDataset(Dataset[Batch]):
    """Indexed by a list of row ids (from a BatchSampler), returns one whole Batch."""

    def __init__(self, table: FeatureTable) -> None:
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, rows: list[int]) -> Batch:  # type: ignore[override]
        return self.table.batch(torch.as_tensor(rows, dtype=torch.int64))


def load_features(features_dir: str | Path) -> FittedTransform:
    """The fitted transform of a features folder, with a clear error when it is not one."""
    path = Path(features_dir) / "transform.json"
    if not path.is_file():
        raise ValueError(f"not a features folder (no transform.json): {str(features_dir)!r}")
    return FittedTransform.load(path)


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
        sampler: torch.utils.data.Sampler[int]
        if shuffle:
            sampler = RandomSampler(range(len(table)), generator=torch.Generator().manual_seed(self.seed))
        else:
            sampler = SequentialSampler(range(len(table)))
        return DataLoader(
            _TableDataset(table),
            sampler=BatchSampler(sampler, self.batch_size, drop_last=False),
            batch_size=None,
        )

    def train_dataloader(self) -> DataLoader[Batch]:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader[Batch]:
        return self._loader("val", shuffle=False)
