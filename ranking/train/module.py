"""A thin LightningModule around a ranking network: losses, optimiser, per-task metrics, gate and routing health."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryAUROC
from torchmetrics.regression import MeanSquaredError

from ranking.batch import Batch
from ranking.config import ModelConfig
from ranking.gate_health import GateHealth, GateStats
from ranking.models import ModelOutput
from ranking.scores import task_score
from ranking.train.config import FitConfig, OptimConfig
from ranking.train.loss import MultiTaskLoss


def _task_metrics(config: ModelConfig) -> MetricCollection:
    metrics: dict[str, Metric | MetricCollection] = {}  # MetricCollection's own parameter type (dict is invariant)
    for t in config.tasks:
        if t.type == "binary":
            metrics[f"{t.name}/auc"] = BinaryAUROC()
        else:
            metrics[f"{t.name}/rmse"] = MeanSquaredError(squared=False)
    return MetricCollection(metrics)


class RankingModule(L.LightningModule):
    """Trains any network that maps ``(sparse, dense, position)`` to a ``ModelOutput``.

    Args:
        model: the network (see ``ranking.artifact.build_model``).
        config: its config (tasks, loss weights, auxiliary-loss weight).
        training: how it is trained (:class:`~ranking.train.config.FitConfig`); the module reads its
            ``optim`` (the optimiser), ``loss`` (weighting, embedding L2) and ``seed``: training
            randomness (dropout, gate noise) of step ``s`` of epoch ``e`` on rank ``r`` depends on
            ``(seed, e, s, r)`` only, so a resumed run replays an uninterrupted one.

    Logged keys follow ``<split>/<task>/<metric>`` (``val/click/auc``) plus ``<split>/loss``,
    ``<split>/<task>/loss``, ``val/auc_mean`` (mean AUC over binary tasks, the default selection
    metric), gate health under ``val/gate/...`` and routing health (expert load and importance, dropped
    rows, experts per row, specialisation on task, item category and user segment) under
    ``val/routing/...``, every validation pass (keys: :meth:`ranking.gate_health.GateHealth.metrics`).
    """

    def __init__(self, model: nn.Module, config: ModelConfig, training: FitConfig | None = None):
        super().__init__()
        training = training or FitConfig()
        self.model = model
        self.config = config
        self.optim: OptimConfig = training.optim
        self.seed = training.seed
        self.loss = MultiTaskLoss.for_model(config, training.loss)
        self.save_hyperparameters({**asdict(self.optim), "loss_weighting": self.loss.config.weighting,
                                   "embedding_l2": self.loss.config.embedding_l2, "model_config": config.to_dict()})
        self.train_metrics = _task_metrics(config).clone(prefix="train/")
        self.val_metrics = _task_metrics(config).clone(prefix="val/")
        self.gate_stats: GateStats | None = None
        self._sums: dict[str, dict[str, torch.Tensor]] = {}  # split -> key -> sum of rows x batch mean
        self._rows: dict[str, int] = {}  # split -> rows accumulated
        self.last_gate_health: GateHealth | None = None

    def forward(self, batch: Batch) -> Any:
        return self.model(batch.sparse, batch.dense, batch.position)

    def _step(self, batch: Batch, split: str) -> torch.Tensor:
        out: ModelOutput = self(batch)
        parts = self.loss.of_batch(out, batch, self.model if split == "train" else None)
        metrics = self.train_metrics if split == "train" else self.val_metrics
        for t in self.config.tasks:
            logit, y, m = out.logits[t.name], batch.labels[t.name], batch.masks[t.name]
            self._accumulate(split, f"{split}/{t.name}/loss", parts.tasks[t.name], len(batch))
            if m.any():
                pred = task_score(t, logit.float())  # the served score (a probability for binary tasks)
                key = f"{split}/{t.name}/{'auc' if t.type == 'binary' else 'rmse'}"
                target = y[m].long() if t.type == "binary" else y[m]
                metrics[key].update(pred[m].detach(), target)
        if parts.load_balance is not None:
            self._accumulate(split, f"{split}/load_balance", parts.load_balance, len(batch))
        if parts.embedding_l2 is not None:
            self._accumulate(split, "train/embedding_l2", parts.embedding_l2, len(batch))
        if parts.router_z is not None:  # ST-MoE's router z-loss, unweighted (gate.z_loss_weight > 0)
            self._accumulate(split, f"{split}/router_z", parts.router_z, len(batch))
        if split == "val" and out.gates is not None:
            if self.gate_stats is None:  # E from the gates: it counts private experts where there are any
                self.gate_stats = GateStats.for_model(self.config, out.gates.shape[-1])
            self.gate_stats.update(out.gates, self.gate_stats.ids_of(batch.sparse))
        self._accumulate(split, f"{split}/loss", parts.total, len(batch))
        return parts.total

    def _accumulate(self, split: str, key: str, value: torch.Tensor, rows: int) -> None:
        """Add a per-batch mean to the split's running sums (logged as epoch means by ``_log_means``).

        Replaces ``self.log(..., on_epoch=True)`` per step, whose bookkeeping costs more than a small
        model's whole forward pass on CPU; the result is the same row-weighted epoch mean.
        """
        sums = self._sums.setdefault(split, {})
        weighted = value.detach().float() * rows
        sums[key] = weighted if key not in sums else sums[key] + weighted
        self._rows[split] = self._rows.get(split, 0) + (rows if key == f"{split}/loss" else 0)

    def _log_means(self, split: str) -> None:
        """Log the split's epoch means of ``_accumulate``d values (averaged over ranks) and reset."""
        sums, rows = self._sums.pop(split, {}), self._rows.pop(split, 0)
        for key, total in sums.items():
            self.log(key, total / max(rows, 1), prog_bar=key == f"{split}/loss", sync_dist=self.trainer.world_size > 1)

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        # Training randomness (dropout, gate noise, position dropout) depends on (seed, step, rank)
        # only, so a run resumed from a checkpoint replays exactly what an uninterrupted run would.
        seed = hash((self.seed, self.current_epoch, batch_idx, self.global_rank)) % 2**63
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it also queues lazy
        if self.device.type == "cuda":  # seeding of every accelerator backend, ~0.7 ms per step on CPU
            torch.cuda.manual_seed(seed)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def on_train_epoch_end(self) -> None:
        self._log_means("train")
        self.log_dict(self.train_metrics.compute())
        self.train_metrics.reset()
        if self.loss.log_vars is not None:
            for i, t in enumerate(self.config.tasks):
                self.log(f"train/{t.name}/log_var", self.loss.log_vars[i].detach())

    def on_validation_epoch_end(self) -> None:
        self._log_means("val")
        computed = self.val_metrics.compute()
        self.log_dict(computed, prog_bar=True)
        aucs = [v for k, v in computed.items() if k.endswith("/auc")]
        if aucs:
            self.log("val/auc_mean", torch.stack(aucs).mean())
        self.val_metrics.reset()
        if self.gate_stats is not None:
            with torch.no_grad():
                self.last_gate_health = self.gate_stats.compute(self.model)  # with the experts' spread
            self.log_dict(self.last_gate_health.metrics("val"))
            self.gate_stats.reset()

    def transfer_batch_to_device(self, batch: Batch, device: torch.device, dataloader_idx: int) -> Batch:
        return batch.to(device, non_blocking=True)

    def configure_optimizers(self) -> Any:
        """Adam over the dense layers and the tables (:meth:`optimizer`); with a learning-rate
        schedule (``OptimConfig.lr_schedule``, ``warmup_steps``) also its per-step scheduler, over
        the steps the trainer will take."""
        opt = self.optimizer()
        if not self.optim.scheduled:
            return opt
        total = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: self.optim.lr_factor(step, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def optimizer(self) -> torch.optim.Optimizer:
        # Tables a sharding strategy trains with its own fused optimizer in backward are not ours.
        named = [(n, p) for n, p in self.named_parameters() if not hasattr(p, "_in_backward_optimizers")]
        emb = [p for n, p in named if ".embeddings." in f".{n}"]
        rest = [p for n, p in named if ".embeddings." not in f".{n}"]
        groups = [
            {"params": rest, "weight_decay": self.optim.weight_decay},
            {"params": emb, "lr": self.optim.embedding_lr or self.optim.lr,
             "weight_decay": self.optim.embedding_weight_decay,
             "decoupled_weight_decay": True},  # coupled L2 under Adam would move every untouched row
        ]
        # The fused kernel (one pass over all parameters) is ~7x cheaper per step than the
        # per-parameter loop for the many small tensors of experts, gates and towers.
        fused = all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") and p.is_floating_point()
                    for _, p in named)
        return torch.optim.Adam([g for g in groups if g["params"]], lr=self.optim.lr, fused=fused or None)
