"""How a model is trained: the plain settings of ``fit``, the optimiser and the loss (standard library only).

Importing this module imports neither torch nor Lightning, so the command line reads its defaults
(``ranker train --help``) from here at no cost: every training default is defined once, below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

LossWeighting = Literal["fixed", "uncertainty"]
LrSchedule = Literal["constant", "cosine"]


@dataclass(frozen=True)
class LossConfig:
    """How the task losses are weighted and which extra terms are added.

    Args:
        weighting: ``"fixed"`` uses each task's ``loss_weight``; ``"uncertainty"`` learns one
            log-variance per task (Kendall et al. 2018).
        embedding_l2: weight of :func:`touched_rows_l2` in the training loss (L2 on the rows the
            batch looks up, each distinct row once); 0 = off.
    """

    weighting: LossWeighting = "fixed"
    embedding_l2: float = 0.0

    def __post_init__(self) -> None:
        if self.weighting not in ("fixed", "uncertainty"):
            raise ValueError(f"loss_weighting must be 'fixed' or 'uncertainty', got {self.weighting!r}")
        if not self.embedding_l2 >= 0:
            raise ValueError(f"embedding_l2 must be >= 0, got {self.embedding_l2}")


@dataclass(frozen=True)
class OptimConfig:
    """The optimiser of the dense layers and the embedding tables (Adam, two parameter groups).

    Args:
        lr, weight_decay: Adam settings of the dense layers (weight decay never on embeddings).
        embedding_lr: Adam learning rate of the embedding tables; None = ``lr``.
        embedding_weight_decay: decoupled (AdamW-style) weight decay of the embedding tables: every
            row shrinks by ``lr * wd`` per step, touched or not. 0 = off.
        lr_schedule: ``"constant"``, or ``"cosine"``: both groups' learning rates follow a half
            cosine from their value down to 0 over every training step of the run (stepped per batch).
        warmup_steps: the first steps' learning rates rise linearly from ``1 / warmup_steps`` of
            their value; 0 = off.
    """

    lr: float = 2e-3
    weight_decay: float = 0.0
    embedding_lr: float | None = None
    embedding_weight_decay: float = 0.0
    lr_schedule: LrSchedule = "constant"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.embedding_lr is not None and not self.embedding_lr > 0:
            raise ValueError(f"embedding_lr must be > 0 or None, got {self.embedding_lr}")
        for name in ("weight_decay", "embedding_weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")

    @property
    def scheduled(self) -> bool:
        """Whether the learning rate changes during training."""
        return self.lr_schedule != "constant" or self.warmup_steps > 0

    def lr_factor(self, step: int, total: int) -> float:
        """The multiple of each group's learning rate at ``step`` (0-based) of ``total`` steps.

        Example:
            >>> o = OptimConfig(lr_schedule="cosine", warmup_steps=2)
            >>> [round(o.lr_factor(s, 5), 3) for s in range(5)]
            [0.5, 0.905, 0.655, 0.345, 0.095]
        """
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.lr_schedule == "cosine":
            return warm * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
        return warm


@dataclass(frozen=True)
class FitConfig:
    """How one model is trained; every field has the default ``ranker train`` uses.

    Args:
        epochs, batch_size: passes over the training split and rows per step.
        optim: the optimiser (:class:`OptimConfig`).
        loss: the loss's weighting and embedding L2 (:class:`LossConfig`).
        seed: seeds the initialisation, the batch order and every step's randomness.
        accelerator, devices, num_nodes: Lightning's; multi-node DDP launches one process per
            device on every node (torchrun, SLURM).
        strategy: ``"auto"``, ``"ddp"`` (gloo on CPU, nccl on GPU) or ``"torchrec"`` (sharded tables).
        sharding_type: torchrec only: force table_wise, row_wise, ...; None = TorchRec's planner.
        embedding_optimizer: torchrec only: the tables' fused optimizer.
        precision: None = bf16-mixed on a GPU, 32-true on CPU.
        monitor, monitor_mode: the best-epoch (and early-stopping) metric.
        early_stopping_patience: epochs without improvement before stopping; 0 = never stop early.
        limit_train_batches: Lightning's (a fraction or a count of batches per epoch).
        validate: run the validation split each epoch (needed for selection and early stopping).
        final_eval: evaluate the selected weights on each of ``val`` and ``test`` the folder holds
            (``final/<split>/...`` metrics).
        progress_bar: let Lightning show its progress bar (a callback of the caller's decides its form).
        log_every_n_steps: Lightning's step-logging interval.
    """

    epochs: int = 2
    batch_size: int = 1024
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    seed: int = 0
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    sharding_type: str | None = None
    embedding_optimizer: str = "rowwise_adagrad"
    precision: str | None = None
    monitor: str = "val/loss"
    monitor_mode: Literal["min", "max"] = "min"
    early_stopping_patience: int = 0
    limit_train_batches: int | float = 1.0
    validate: bool = True
    final_eval: bool = True
    progress_bar: bool = False
    log_every_n_steps: int = 50

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.monitor_mode not in ("min", "max"):
            raise ValueError(f"monitor_mode must be 'min' or 'max', got {self.monitor_mode!r}")
        if self.early_stopping_patience < 0:
            raise ValueError(f"early_stopping_patience must be >= 0, got {self.early_stopping_patience}")
        if self.early_stopping_patience and not self.validate:
            raise ValueError("early_stopping_patience needs validate=True (it watches a validation metric)")
