"""Training a ranking model: ``fit(features_dir, model_config, fit_config) -> FitResult``.

The parts, each usable on its own: :class:`~ranking.train.data.RankingDataModule` (batches of a
features folder), :class:`~ranking.train.loss.MultiTaskLoss` (a plain ``nn.Module``),
:class:`~ranking.train.module.RankingModule` (the thin LightningModule: loss, optimiser, metrics,
gate health) and :class:`~ranking.train.sharding.TorchRecStrategy` (sharded embedding tables).
This package imports Lightning; ``ranking`` itself and the inference parts do not.
"""

from ranking.train.data import EpochBatchSampler, RankingDataModule, load_features
from ranking.train.fit import FitConfig, FitResult, fit
from ranking.train.loss import LossConfig, LossParts, MultiTaskLoss, task_loss, touched_rows_l2
from ranking.train.module import OptimConfig, RankingModule
from ranking.train.sharding import TorchRecStrategy

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
