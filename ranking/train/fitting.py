"""One training run of a ranking model on a features folder: ``fit(features, model_config, fit_config)``.

``fit`` owns everything between a features folder and a trained, unsharded network with its best
epoch's weights: seeding, the data module, the network and its warm start, the loss and the
optimiser (through :class:`~ranking.train.module.RankingModule`), the Lightning ``Trainer`` and its
strategy (DDP, or TorchRec sharding of the tables), checkpoints and the best-epoch selection,
un-sharding, and the final evaluation of the selected weights on every split the folder holds.
Tracking, export and registration are the caller's (``pipelines.train`` adds MLflow around it).

    >>> from ranking.train import FitConfig, fit, load_features  # doctest: +SKIP
    >>> config = ModelConfig.from_fitted(load_features("features/"), model="mmoe")  # doctest: +SKIP
    >>> result = fit("features/", config, FitConfig(epochs=2), out="runs/one")  # doctest: +SKIP
    >>> result.metrics["final/test/click/auc"]  # doctest: +SKIP
    0.71...
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn

from features.fitted import FittedTransform
from ranking.artifact import build_model, warm_start
from ranking.config import ModelConfig
from ranking.evaluate import evaluate, split_table
from ranking.train.config import FitConfig
from ranking.train.data import RankingDataModule, load_features
from ranking.train.module import RankingModule
from ranking.train.sharding import TorchRecStrategy

if TYPE_CHECKING:
    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT

log = logging.getLogger("ranking.train")

SHARDED_EMBEDDING_LR = 0.05  # the fused row-wise Adagrad default when embedding_lr is unset


@dataclass
class FitResult:
    """What one :func:`fit` leaves.

    Attributes:
        model: the trained network, unsharded on CPU or the training device, with the best epoch's
            weights when checkpoints were written (else the last epoch's).
        module: the Lightning module that trained it (``module.model is model``; gate health of the
            last validation in ``module.last_gate_health``).
        fitted: the features folder's fitted transform.
        metrics: the trainer's last ``train/`` and ``val/`` values, ``best_epoch`` and, with
            ``final_eval``, ``final/<split>/...`` of the selected weights (rank 0 only).
        best_epoch: the selected epoch (0-based), or None without checkpoints.
        trainer: the Lightning trainer (its ``world_size``, ``is_global_zero``, callbacks ...).
        precision: the precision it trained in.
        sharding_plan: TorchRec's plan as text for a sharded run, else None.
        seconds: wall time of the call.
    """

    model: nn.Module
    module: RankingModule
    fitted: FittedTransform
    metrics: dict[str, float]
    best_epoch: int | None
    trainer: L.Trainer
    precision: str
    sharding_plan: str | None
    seconds: float

    @property
    def primary(self) -> bool:
        """False on the non-zero ranks of a distributed run (they evaluate, export and log nothing)."""
        return bool(self.trainer.is_global_zero)


def default_precision(accelerator: str, precision: str | None = None) -> str:
    """``precision`` when given, else bf16-mixed on a GPU and 32-true on CPU."""
    if precision is not None:
        return precision
    gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    return "bf16-mixed" if gpu else "32-true"


def strategy_for(cfg: FitConfig) -> str | TorchRecStrategy:
    """Lightning's strategy name, or the TorchRec sharding strategy for ``strategy="torchrec"``."""
    if cfg.strategy != "torchrec":
        return cfg.strategy
    gpu = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    return TorchRecStrategy(
        sharding_type=cfg.sharding_type,
        embedding_optimizer=cfg.embedding_optimizer,
        embedding_lr=cfg.optim.embedding_lr if cfg.optim.embedding_lr is not None else SHARDED_EMBEDDING_LR,
        process_group_backend="nccl" if gpu else "gloo",
    )


def fit(
    features_dir: str | Path,
    model_config: ModelConfig,
    fit_config: FitConfig | None = None,
    *,
    out: str | Path | None = None,
    logger: Logger | bool = False,
    callbacks: Sequence[Callback] = (),
    init_from: str | Path | None = None,
    resume: bool = False,
) -> FitResult:
    """Train ``model_config``'s network on the folder's ``train`` split, select on ``val``, evaluate.

    Args:
        features_dir: output of ``ranker features build`` (``transform.json``, ``train.parquet``,
            ``val.parquet``, optionally ``test.parquet``).
        model_config: the network (``ModelConfig.from_fitted(load_features(features_dir), ...)``).
        fit_config: how to train (:class:`FitConfig`; its defaults are ``ranker train``'s).
        out: folder for checkpoints (``out/checkpoints``: the best epoch's and ``last.ckpt``) and
            Lightning's files; None = no checkpoints, the last epoch's weights are returned.
        logger: a Lightning logger (e.g. ``MLFlowLogger``), or False for none.
        callbacks: more Lightning callbacks (progress, plots ...), after the checkpointing ones.
        init_from: warm start: an inference artifact folder whose matching weights are copied in.
        resume: continue from ``out/checkpoints/last.ckpt`` (which must exist).

    Returns:
        :class:`FitResult`; on the non-zero ranks of a distributed run without its final metrics.

    Raises:
        ValueError: not a features folder, a split missing, ``resume`` without a checkpoint.
    """
    cfg = fit_config or FitConfig()
    if resume and (out is None or not (Path(out) / "checkpoints" / "last.ckpt").is_file()):
        raise ValueError(f"resume: no checkpoint to resume from in {str(out)!r} (checkpoints/last.ckpt)")
    start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    fitted = load_features(features_dir)
    data = RankingDataModule(features_dir, model_config, cfg.batch_size, cfg.seed)
    network = build_model(model_config)
    if init_from is not None:
        copied = warm_start(network, fitted, init_from)
        log.info("warm start from %s: %s", init_from, copied)
    module = RankingModule(network, model_config, cfg)

    best: ModelCheckpoint | None = None
    own: list[Callback] = []
    if out is not None:
        best = ModelCheckpoint(dirpath=Path(out) / "checkpoints", save_last=True, filename="best-{epoch:03d}",
                               monitor=cfg.monitor if cfg.validate else None, mode=cfg.monitor_mode)
        own.append(best)
    if cfg.early_stopping_patience > 0:
        own.append(EarlyStopping(monitor=cfg.monitor, mode=cfg.monitor_mode, patience=cfg.early_stopping_patience))
    precision = default_precision(cfg.accelerator, cfg.precision)
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=strategy_for(cfg),
        precision=cast("_PRECISION_INPUT", precision),  # a config string: Lightning checks it at run time
        logger=logger,
        callbacks=[*own, *callbacks],
        enable_checkpointing=out is not None,
        deterministic=True,
        use_distributed_sampler=False,  # the data module shards its own epoch-seeded batches
        # None is Lightning's "all batches" without its line announcing that all batches will be used
        limit_train_batches=None if cfg.limit_train_batches == 1.0 else cfg.limit_train_batches,
        limit_val_batches=None if cfg.validate else 0,
        num_sanity_val_steps=None if cfg.validate else 0,
        log_every_n_steps=cfg.log_every_n_steps,
        enable_model_summary=False,
        enable_progress_bar=cfg.progress_bar,
        default_root_dir=out,
    )
    if trainer.is_global_zero:  # in place of Lightning's device banner
        device = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
        log.info("training %s on %s rows of %s: %d epoch(s), batch %d, %s x%d, %s%s", model_config.model,
                 f"{fitted.rows:,}", fitted.spec.name, cfg.epochs, cfg.batch_size, device, trainer.world_size,
                 precision, ", resuming from the last checkpoint" if resume else "")
    trainer.fit(module, datamodule=data, ckpt_path="last" if resume else None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}

    plan = None
    if isinstance(trainer.strategy, TorchRecStrategy):
        # The tables are still sharded across the processes; checkpoints hold full tensors, so the
        # selected weights load into a fresh unsharded model that rank 0 can evaluate and export.
        module.model = build_model(model_config)
        if best is None or not best.best_model_path:
            raise RuntimeError("a sharded run needs a checkpoint to take its weights from; give fit an out folder")
        plan = trainer.strategy.plan_text
    best_epoch = None
    if best is not None and best.best_model_path:
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
        best_epoch = int(Path(best.best_model_path).stem.split("epoch=")[-1])
        metrics["best_epoch"] = float(best_epoch)
    if cfg.final_eval and trainer.is_global_zero:
        metrics.update(final_metrics(module.model, features_dir, model_config, fitted))
    return FitResult(module.model, module, fitted, metrics, best_epoch, trainer, precision, plan,
                     time.perf_counter() - start)


def final_metrics(model: nn.Module, features_dir: str | Path, config: ModelConfig,
                  fitted: FittedTransform) -> dict[str, Any]:
    """The full metric set of ``model`` on each of the folder's ``val`` and ``test`` splits (``final/<split>/...``)."""
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        if (Path(features_dir) / f"{split}.parquet").is_file():
            table = split_table(features_dir, split, config, fitted)
            out.update(evaluate(model.cpu(), table, config, f"final/{split}"))
    return out
