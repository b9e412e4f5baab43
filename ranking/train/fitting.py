"""One training run of a ranking model on a features folder: ``fit(features, model_config, fit_config)``.

``fit`` owns everything between a features folder and a trained, unsharded network with its best
epoch's weights: seeding, the data module, the network and its warm start, the loss and the
optimiser (through :class:`~ranking.train.module.RankingModule`), the Lightning ``Trainer`` and its
strategy (DDP, or TorchRec sharding of the tables), checkpoints and the best-epoch selection,
un-sharding, and the final evaluation of the selected weights on every split the folder holds.
Tracking, export and registration are the caller's (``pipelines.train`` adds MLflow around it).

Several processes, on one machine or several (``num_nodes``), each run ``fit`` with the same
arguments: started by Lightning's own launcher (``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``
on each node), by torchrun or by SLURM. :func:`check_launch` refuses a launch that could never
start; only global rank 0 reads checkpoints back and evaluates, so another node's ``out`` folder
may be its own local disk.

    >>> from ranking.train import FitConfig, fit, load_features  # doctest: +SKIP
    >>> config = ModelConfig.from_fitted(load_features("features/"), model="mmoe")  # doctest: +SKIP
    >>> result = fit("features/", config, FitConfig(epochs=2), out="runs/one")  # doctest: +SKIP
    >>> result.metrics["final/test/click/auc"]  # doctest: +SKIP
    0.71...
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
from lightning.fabric.plugins.environments.lsf import LSFEnvironment
from lightning.fabric.plugins.environments.slurm import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import DDPStrategy
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
# Any of these non-zero: a launcher made this process some rank other than global rank 0.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
LIGHTNING_LAUNCH = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK")  # each node's, for Lightning's own launcher
DIST_TIMEOUT_ENV = "RANKER_DIST_TIMEOUT_S"  # seconds a process waits for the others: to join, at every collective


@dataclass
class FitResult:
    """What one :func:`fit` leaves.

    Attributes:
        model: the trained network, unsharded on CPU or the training device, with the best epoch's
            weights when checkpoints were written (else the last epoch's). On the non-zero ranks of
            a distributed run, which export nothing, not the selected weights: the last epoch's
            (DDP) or a fresh network (sharded tables).
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


def launched_as_rank_zero(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is (or, once its Trainer starts, will be) global rank 0, from its launcher's variables.

    Known before any Trainer exists, so a caller can decide who opens the tracking store. Lightning's
    own ``rank_zero_only.rank`` is read at import from ``RANK`` or ``LOCAL_RANK`` alone: the first
    process of a second node started by Lightning's launcher (``NODE_RANK=1``, no ``LOCAL_RANK``)
    takes itself for rank 0 until the Trainer sets it up. Here any non-zero :data:`RANK_VARIABLES`
    (torchrun's ``RANK`` and ``GROUP_RANK``, Lightning's ``LOCAL_RANK`` and ``NODE_RANK``, SLURM's
    ``SLURM_PROCID``) means another rank.

    Example:
        >>> launched_as_rank_zero({}), launched_as_rank_zero({"NODE_RANK": "1"}), launched_as_rank_zero({"RANK": "0"})
        (True, False, True)
    """
    env = os.environ if env is None else env
    return all(env.get(name, "0").strip() in ("", "0") for name in RANK_VARIABLES)


def check_launch(cfg: FitConfig, env: Mapping[str, str] | None = None) -> str:
    """The launcher that started this process, or a ``ValueError`` for a launch that could never start.

    With ``num_nodes > 1`` the processes meet at an address nobody but the launcher knows: torchrun
    (its ``WORLD_SIZE`` must be ``num_nodes x devices``), SLURM, LSF, or Lightning's own
    launcher, which needs ``MASTER_ADDR``, ``MASTER_PORT`` and this node's ``NODE_RANK`` on every node.
    Without one, the first process would wait for peers that nobody started; the error comes instead,
    before any waiting.

    Returns:
        ``"torchelastic"``, ``"slurm"``, ``"lsf"``, ``"lightning"`` (several nodes
        under Lightning's launcher) or ``"local"`` (one node, Lightning starts its processes).

    Raises:
        ValueError: ``num_nodes`` below 1; several nodes without a launcher's variables; a
            ``NODE_RANK`` outside ``0..num_nodes-1``; a torchrun world that is not ``num_nodes x devices``.

    Example:
        >>> check_launch(FitConfig(num_nodes=2), {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "NODE_RANK": "1"})
        'lightning'
        >>> check_launch(FitConfig(num_nodes=2), {"MASTER_ADDR": "10.0.0.1"})
        Traceback (most recent call last):
        ...
        ValueError: --num-nodes 2 needs a launcher to meet the other nodes: ...
    """
    env = os.environ if env is None else env
    nodes = cfg.num_nodes
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"--num-nodes must be an integer >= 1, got {nodes!r}")
    if "TORCHELASTIC_RUN_ID" in env:  # what TorchElasticEnvironment.detect() reads: torchrun started it
        world, local = int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_WORLD_SIZE", "1"))
        started = world // max(local, 1)
        if isinstance(cfg.devices, int) and local != cfg.devices:
            raise ValueError(f"--devices {cfg.devices}, but torchrun started {local} process(es) on this node: "
                             f"give torchrun --nproc-per-node {cfg.devices}, or --devices {local}")
        if started != nodes:
            raise ValueError(f"--num-nodes {nodes}, but torchrun started {started} node(s) of {local} process(es) "
                             f"(WORLD_SIZE {world}): give torchrun --nnodes {nodes}, or --num-nodes {started}")
        return "torchelastic"
    if env is os.environ:  # these read os.environ themselves
        for name, kind in (("slurm", SLURMEnvironment), ("lsf", LSFEnvironment)):
            if kind.detect():
                return name  # Lightning checks their world size against devices x num_nodes
    if nodes == 1:
        return "local"
    missing = [name for name in LIGHTNING_LAUNCH if not env.get(name, "").strip()]
    if missing:
        raise ValueError(
            f"--num-nodes {nodes} needs a launcher to meet the other nodes: set MASTER_ADDR, MASTER_PORT and "
            f"NODE_RANK (0..{nodes - 1}) on every node, or start each node under torchrun --nnodes {nodes} "
            f"(or srun); {', '.join(missing)} not set")
    node = env["NODE_RANK"].strip()
    if not node.isdigit() or int(node) >= nodes:
        raise ValueError(f"NODE_RANK must be one of 0..{nodes - 1} with --num-nodes {nodes}, got {node!r}")
    return "lightning"


def dist_timeout(env: Mapping[str, str] | None = None) -> timedelta:
    """How long a process waits for the others: to join the run, and at every collective after.

    ``RANKER_DIST_TIMEOUT_S`` seconds, else PyTorch's default (30 minutes). A node that never comes
    thus ends the others' wait with :func:`join_error`'s line instead of a silent hang.

    Raises:
        ValueError: the variable is not a positive number.
    """
    env = os.environ if env is None else env
    raw = env.get(DIST_TIMEOUT_ENV, "").strip()
    if not raw:
        return timedelta(minutes=30)  # torch.distributed's default_pg_timeout for gloo and NCCL
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{DIST_TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return timedelta(seconds=seconds)


def join_error(cfg: FitConfig, error: BaseException, env: Mapping[str, str] | None = None) -> ValueError:
    """The one line for a process that could not join the others (a node never started, or a wrong address)."""
    env = os.environ if env is None else env
    where = f"{env.get('MASTER_ADDR', '127.0.0.1')}:{env.get('MASTER_PORT', '?')}"
    node = env.get("NODE_RANK") or env.get("GROUP_RANK") or "0"
    why = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return ValueError(
        f"--num-nodes {cfg.num_nodes} --devices {cfg.devices}: node {node} could not join the other processes at "
        f"{where} within {dist_timeout(env).total_seconds():.0f} s ({why}); start the same command on every node "
        f"(each its own NODE_RANK, the same MASTER_ADDR and MASTER_PORT), or wait longer with {DIST_TIMEOUT_ENV}")


class SameResumePoint(Callback):
    """Stop every process with one line when some resume from a checkpoint and others start afresh.

    Lightning restores ``ckpt_path`` on every process, each from its own disk. With each node its
    own ``out`` folder only rank 0's holds ``checkpoints/last.ckpt``: a node that starts afresh
    beside a resuming rank 0 would train other epochs and leave the rest waiting at a collective.
    The check is a collective right after the processes join, before any checkpoint is read.

    Args:
        resume: whether this process resumes.
    """

    def __init__(self, resume: bool) -> None:
        self.resume = resume

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        every = trainer.strategy.reduce_boolean_decision(self.resume, all=True)
        some = trainer.strategy.reduce_boolean_decision(self.resume, all=False)
        if some and not every:
            raise ValueError(
                f"--resume: global rank {trainer.global_rank} {'resumes' if self.resume else 'has no checkpoint'} "
                f"but another {'has none' if self.resume else 'resumes'}: every node needs its own copy of rank 0's "
                "OUT/checkpoints/last.ckpt (copy it to each node's --out, or give every node one shared --out)")


def default_precision(accelerator: str, precision: str | None = None) -> str:
    """``precision`` when given, else bf16-mixed on a GPU and 32-true on CPU."""
    if precision is not None:
        return precision
    gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    return "bf16-mixed" if gpu else "32-true"


def strategy_for(cfg: FitConfig) -> str | DDPStrategy:
    """Lightning's strategy: the TorchRec sharding strategy for ``strategy="torchrec"``, DDP for
    ``"ddp"`` (and for ``"auto"`` on several nodes), both waiting :func:`dist_timeout` for the
    others; any other name as Lightning's."""
    if cfg.strategy == "ddp" or (cfg.strategy == "auto" and cfg.num_nodes > 1):
        return DDPStrategy(timeout=dist_timeout())
    if cfg.strategy != "torchrec":
        return cfg.strategy
    gpu = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    return TorchRecStrategy(
        sharding_type=cfg.sharding_type,
        embedding_optimizer=cfg.embedding_optimizer,
        embedding_lr=cfg.optim.embedding_lr if cfg.optim.embedding_lr is not None else SHARDED_EMBEDDING_LR,
        process_group_backend="nccl" if gpu else "gloo",
        timeout=dist_timeout(),
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
        ValueError: not a features folder, a split missing, ``resume`` without a checkpoint, a
            launch that cannot start (:func:`check_launch`) or a node that could not join the
            others (:func:`join_error`).
    """
    cfg = fit_config or FitConfig()
    check_launch(cfg)
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
    own.append(SameResumePoint(resume))
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
    if launched_as_rank_zero():  # in place of Lightning's device banner (is_global_zero: not known before fit)
        device = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
        log.info("training %s on %s rows of %s: %d epoch(s), batch %d, %s x%d, %s%s", model_config.model,
                 f"{fitted.rows:,}", fitted.spec.name, cfg.epochs, cfg.batch_size, device, trainer.world_size,
                 precision, ", resuming from the last checkpoint" if resume else "")
    try:
        trainer.fit(module, datamodule=data, ckpt_path="last" if resume else None)
    except torch.distributed.DistError as e:
        if torch.distributed.is_initialized():  # joined, then lost a peer: PyTorch's own error says which
            raise
        raise join_error(cfg, e) from e
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
    if best is not None and best.best_model_path:  # the same path on every rank; the file only on rank 0's disk
        best_epoch = int(Path(best.best_model_path).stem.split("epoch=")[-1])
        metrics["best_epoch"] = float(best_epoch)
        if trainer.is_global_zero:  # the others export nothing: another node need not hold rank 0's files
            state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
            module.load_state_dict(state)
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
