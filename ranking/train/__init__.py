"""Training a ranking model: ``fit(features_dir, model_config, fit_config) -> FitResult``.

The parts, each usable on its own: :class:`~ranking.train.config.FitConfig` with
:class:`~ranking.train.config.OptimConfig` and :class:`~ranking.train.config.LossConfig` (plain
settings, standard library only), :class:`~ranking.train.data.RankingDataModule` (batches of a
features folder), :class:`~ranking.train.loss.MultiTaskLoss` (a plain ``nn.Module``),
:class:`~ranking.train.module.RankingModule` (the thin LightningModule: loss, optimiser, metrics,
gate health) and :class:`~ranking.train.sharding.TorchRecStrategy` (sharded embedding tables).

Names load on first use: ``from ranking.train.config import FitConfig`` costs no torch import,
``from ranking.train import fit`` imports Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ranking.train.config import FitConfig, LossConfig, OptimConfig
    from ranking.train.data import EpochBatchSampler, RankingDataModule, load_features
    from ranking.train.fitting import FitResult, fit
    from ranking.train.loss import LossParts, MultiTaskLoss, task_loss, touched_rows_l2
    from ranking.train.module import RankingModule
    from ranking.train.sharding import TorchRecStrategy

_WHERE = {
    "FitConfig": "config", "LossConfig": "config", "OptimConfig": "config",
    "EpochBatchSampler": "data", "RankingDataModule": "data", "load_features": "data",
    "FitResult": "fitting", "fit": "fitting",
    "LossParts": "loss", "MultiTaskLoss": "loss", "task_loss": "loss", "touched_rows_l2": "loss",
    "RankingModule": "module",
    "TorchRecStrategy": "sharding",
}

__all__ = [
    "EpochBatchSampler",
    "FitConfig",
    "FitResult",
    "LossConfig",
    "LossParts",
    "MultiTaskLoss",
    "OptimConfig",
    "RankingDataModule",
    "RankingModule",
    "TorchRecStrategy",
    "fit",
    "load_features",
    "task_loss",
    "touched_rows_l2",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'ranking.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ranking.train.{_WHERE[name]}"), name)
    globals()[name] = value  # once: later lookups skip this function
    return value
