"""A thin LightningModule around a ranking network: losses, optimiser, per-task metrics."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryAUROC
from torchmetrics.regression import MeanSquaredError

from ranking.batch import Batch
from ranking.config import ModelConfig
from ranking.losses import task_loss


def _task_metrics(config: ModelConfig) -> MetricCollection:
    metrics: dict[str, Metric] = {}
    for t in config.tasks:
        if t.type == "binary":
            metrics[f"{t.name}/auc"] = BinaryAUROC()
        else:
            metrics[f"{t.name}/rmse"] = MeanSquaredError(squared=False)
    return MetricCollection(metrics)


class RankingModule(L.LightningModule):
    """Trains any network that maps ``(sparse, dense, position)`` to a ``ModelOutput``.

    Logged keys follow ``<split>/<task>/<metric>`` (``val/click/auc``) plus ``<split>/loss``
    and ``<split>/<task>/loss``.
    """

    def __init__(self, model: nn.Module, config: ModelConfig, lr: float = 2e-3, weight_decay: float = 0.0):
        super().__init__()
        self.model = model
        self.config = config
        self.lr = lr
        self.weight_decay = weight_decay
        self.save_hyperparameters({"lr": lr, "weight_decay": weight_decay, "model_config": config.to_dict()})
        self.train_metrics = _task_metrics(config).clone(prefix="train/")
        self.val_metrics = _task_metrics(config).clone(prefix="val/")

    def forward(self, batch: Batch) -> Any:
        return self.model(batch.sparse, batch.dense, batch.position)

    def _step(self, batch: Batch, split: str) -> torch.Tensor:
        out = self(batch)
        total = torch.zeros((), device=batch.dense.device)
        metrics = self.train_metrics if split == "train" else self.val_metrics
        for t in self.config.tasks:
            logit, y, m = out.logits[t.name], batch.labels[t.name], batch.masks[t.name]
            loss = task_loss(t, logit, y, m)
            total = total + t.loss_weight * loss
            self.log(f"{split}/{t.name}/loss", loss, on_step=False, on_epoch=True, batch_size=len(batch))
            if m.any():
                pred = torch.sigmoid(logit.float()) if t.type == "binary" else logit.float()
                key = f"{split}/{t.name}/{'auc' if t.type == 'binary' else 'rmse'}"
                target = y[m].long() if t.type == "binary" else y[m]
                metrics[key].update(pred[m].detach(), target)
        self.log(f"{split}/loss", total, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch))
        return total

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def on_train_epoch_end(self) -> None:
        self.log_dict(self.train_metrics.compute())
        self.train_metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()

    def transfer_batch_to_device(self, batch: Batch, device: torch.device, dataloader_idx: int) -> Batch:
        return batch.to(device, non_blocking=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
