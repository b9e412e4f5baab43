"""A thin LightningModule around a ranking network: losses, optimiser, per-task metrics, gate health."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryAUROC
from torchmetrics.regression import MeanSquaredError
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor

from ranking.batch import Batch
from ranking.config import ModelConfig
from ranking.gate_health import GateHealth, GateStats
from ranking.losses import task_loss

LossWeighting = Literal["fixed", "uncertainty"]


def _task_metrics(config: ModelConfig) -> MetricCollection:
    metrics: dict[str, Metric] = {}
    for t in config.tasks:
        if t.type == "binary":
            metrics[f"{t.name}/auc"] = BinaryAUROC()
        else:
            metrics[f"{t.name}/rmse"] = MeanSquaredError(squared=False)
    return MetricCollection(metrics)


def touched_rows_l2(model: nn.Module, sparse: KeyedJaggedTensor) -> torch.Tensor:
    """Sum of squared embedding rows looked up in this batch, each distinct row counted once.

    The sparse counterpart of L2 weight decay: only rows a batch touches are penalised, when they
    are touched, so rows never seen (the OOV row 0) keep their initial value and the rule ports to
    TorchRec's fused row-wise optimisers. Since every distinct row pays the same price however
    often it occurs, while its data gradient grows with its frequency, rare ids (most users and
    videos) are pulled to zero hardest: the ones that overfit first.

    Args:
        model: any module holding ``EmbeddingBagCollection``s (every one is searched).
        sparse: the batch's ids; keys are feature names of those collections.

    Returns:
        A scalar: ``sum_tables sum_{r in unique ids} ||W[r]||^2``.

    Example:
        >>> from torchrec import EmbeddingBagConfig
        >>> ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=2,
        ...     num_embeddings=4, feature_names=["f"])], device=torch.device("cpu"))
        >>> with torch.no_grad():
        ...     _ = ebc.embedding_bags["t"].weight.copy_(torch.arange(8.0).view(4, 2))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor([1, 1, 3]), torch.tensor([1, 1, 1]))
        >>> float(touched_rows_l2(ebc, kjt).detach())  # rows 1 and 3: (4 + 9) + (36 + 49)
        98.0
    """
    total = torch.zeros(())
    present = set(sparse.keys())
    for ebc in (m for m in model.modules() if isinstance(m, EmbeddingBagCollection)):
        for table in ebc.embedding_bag_configs():
            weight = ebc.embedding_bags[table.name].weight  # (rows, D)
            for feature in table.feature_names:
                if feature in present:
                    rows = torch.unique(sparse[feature].values())  # (R,) distinct ids of this batch
                    total = total.to(weight.device) + weight[rows].pow(2).sum()
    return total


class RankingModule(L.LightningModule):
    """Trains any network that maps ``(sparse, dense, position)`` to a ``ModelOutput``.

    Args:
        model: the network (see ``ranking.artifact.build_model``).
        config: its config (tasks, loss weights, auxiliary-loss weight).
        lr, weight_decay: Adam settings (weight decay on the dense layers only, never on embeddings).
        embedding_lr: Adam learning rate of the embedding tables; None = ``lr``.
        embedding_weight_decay: decoupled (AdamW-style) weight decay of the embedding tables: every
            row shrinks by ``lr * wd`` per step, touched or not. 0 = off.
        embedding_l2: weight of :func:`touched_rows_l2` added to the training loss (L2 on the rows
            the batch looks up, each distinct row once). 0 = off.
        loss_weighting: ``"fixed"`` uses the spec's loss weights; ``"uncertainty"`` learns one
            log-variance per task (Kendall et al. 2018): ``sum_t exp(-s_t) * L_t + s_t``.

    Logged keys follow ``<split>/<task>/<metric>`` (``val/click/auc``) plus ``<split>/loss``,
    ``<split>/<task>/loss``, ``val/auc_mean`` (mean AUC over binary tasks, the default selection
    metric) and gate health under ``val/gate/...``.
    """

    def __init__(self, model: nn.Module, config: ModelConfig, lr: float = 2e-3, weight_decay: float = 0.0,
                 loss_weighting: LossWeighting = "fixed", seed: int = 0, embedding_lr: float | None = None,
                 embedding_weight_decay: float = 0.0, embedding_l2: float = 0.0):
        super().__init__()
        if loss_weighting not in ("fixed", "uncertainty"):
            raise ValueError(f"loss_weighting must be 'fixed' or 'uncertainty', got {loss_weighting!r}")
        if embedding_lr is not None and not embedding_lr > 0:
            raise ValueError(f"embedding_lr must be > 0 or None, got {embedding_lr}")
        for name, value in (("embedding_weight_decay", embedding_weight_decay), ("embedding_l2", embedding_l2)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.model = model
        self.config = config
        self.lr = lr
        self.weight_decay = weight_decay
        self.embedding_lr = embedding_lr
        self.embedding_weight_decay = embedding_weight_decay
        self.embedding_l2 = embedding_l2
        self.loss_weighting = loss_weighting
        self.seed = seed
        self.log_vars = nn.Parameter(torch.zeros(len(config.tasks))) if loss_weighting == "uncertainty" else None
        self.save_hyperparameters({"lr": lr, "weight_decay": weight_decay, "loss_weighting": loss_weighting,
                                   "embedding_lr": embedding_lr, "embedding_weight_decay": embedding_weight_decay,
                                   "embedding_l2": embedding_l2, "model_config": config.to_dict()})
        self.train_metrics = _task_metrics(config).clone(prefix="train/")
        self.val_metrics = _task_metrics(config).clone(prefix="val/")
        self.gate_stats: GateStats | None = None
        self._sums: dict[str, dict[str, torch.Tensor]] = {}  # split -> key -> sum of rows x batch mean
        self._rows: dict[str, int] = {}  # split -> rows accumulated
        self.last_gate_health: GateHealth | None = None

    def forward(self, batch: Batch) -> Any:
        return self.model(batch.sparse, batch.dense, batch.position)

    def _step(self, batch: Batch, split: str) -> torch.Tensor:
        out = self(batch)
        total = torch.zeros((), device=batch.dense.device)
        metrics = self.train_metrics if split == "train" else self.val_metrics
        for i, t in enumerate(self.config.tasks):
            logit, y, m = out.logits[t.name], batch.labels[t.name], batch.masks[t.name]
            loss = task_loss(t, logit, y, m)
            if self.log_vars is not None:
                total = total + torch.exp(-self.log_vars[i]) * loss + self.log_vars[i]
            else:
                total = total + t.loss_weight * loss
            self._accumulate(split, f"{split}/{t.name}/loss", loss, len(batch))
            if m.any():
                pred = torch.sigmoid(logit.float()) if t.type == "binary" else logit.float()
                key = f"{split}/{t.name}/{'auc' if t.type == 'binary' else 'rmse'}"
                target = y[m].long() if t.type == "binary" else y[m]
                metrics[key].update(pred[m].detach(), target)
        aux = getattr(out, "aux", None) or {}
        balance_weight = float(getattr(self.config, "load_balance_weight", 0.0))
        if "load_balance" in aux and balance_weight > 0:
            total = total + balance_weight * aux["load_balance"]
            self._accumulate(split, f"{split}/load_balance", aux["load_balance"], len(batch))
        if split == "train" and self.embedding_l2 > 0:
            penalty = touched_rows_l2(self.model, batch.sparse)
            total = total + self.embedding_l2 * penalty
            self._accumulate(split, "train/embedding_l2", penalty, len(batch))
        if split == "val" and getattr(out, "gates", None) is not None:
            if self.gate_stats is None:
                self.gate_stats = GateStats([t.name for t in self.config.tasks], out.gates.shape[-1])
            self.gate_stats.update(out.gates)
        self._accumulate(split, f"{split}/loss", total, len(batch))
        return total

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
        torch.random.default_generator.manual_seed(seed)  # not torch.manual_seed: it also queues lazy
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
        if self.log_vars is not None:
            for i, t in enumerate(self.config.tasks):
                self.log(f"train/{t.name}/log_var", self.log_vars[i].detach())

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

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Tables a sharding strategy trains with its own fused optimizer in backward are not ours.
        named = [(n, p) for n, p in self.named_parameters() if not hasattr(p, "_in_backward_optimizers")]
        emb = [p for n, p in named if ".embeddings." in f".{n}"]
        rest = [p for n, p in named if ".embeddings." not in f".{n}"]
        groups = [
            {"params": rest, "weight_decay": self.weight_decay},
            {"params": emb, "lr": self.embedding_lr or self.lr, "weight_decay": self.embedding_weight_decay,
             "decoupled_weight_decay": True},  # coupled L2 under Adam would move every untouched row
        ]
        # The fused kernel (one pass over all parameters) is ~7x cheaper per step than the
        # per-parameter loop for the many small tensors of experts, gates and towers.
        fused = all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") and p.is_floating_point()
                    for _, p in named)
        return torch.optim.Adam([g for g in groups if g["params"]], lr=self.lr, fused=fused or None)
