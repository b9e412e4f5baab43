"""One training run: features folder -> Lightning fit -> inference artifact -> MLflow run + registry."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow.entities import Metric

from pipelines import quiet
from pipelines.plots import gate_heatmap
from pipelines.tracking import (
    check_tracking_uri,
    close_failed,
    ensure_experiment,
    feature_splits,
    log_datasets,
    register_artifact,
    reopen,
    system_metrics,
)
from ranking.artifact import build_model, export_artifact, warm_start
from ranking.config import ModelConfig
from ranking.data import RankingDataModule, load_features
from ranking.evaluate import evaluate, split_table
from ranking.module import RankingModule
from ranking.sharding import TorchRecStrategy

log = logging.getLogger("pipelines.train")
MODELS = ("mmoe", "ple", "omoe", "shared_bottom", "single_task")


@dataclass(frozen=True)
class TrainConfig:
    """What ``ranker train`` needs; model-shape fields go through ``model_overrides``."""

    features: Path
    out: Path
    tracking_uri: str
    model: str = "mmoe"
    epochs: int = 2
    batch_size: int = 1024
    lr: float = 2e-3
    weight_decay: float = 0.0  # on dense layers only
    embedding_lr: float | None = None  # lr of the embedding tables; None = lr (Adam), 0.05 (torchrec fused)
    embedding_weight_decay: float = 0.0  # decoupled (AdamW-style) decay of every embedding row, every step
    embedding_l2: float = 0.0  # L2 on the embedding rows each batch looks up (each distinct row once)
    loss_weighting: Literal["fixed", "uncertainty"] = "fixed"
    seed: int = 0
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1  # multi-node DDP: launch one process per device on every node (torchrun, SLURM)
    strategy: str = "auto"  # "ddp" (gloo on CPU, nccl on GPU) or "torchrec" (sharded embedding tables)
    sharding_type: str | None = None  # torchrec: force table_wise, row_wise, ...; None = TorchRec's planner
    embedding_optimizer: str = "rowwise_adagrad"  # torchrec: fused optimizer of the tables
    precision: str | None = None  # None: bf16-mixed on GPU, 32-true on CPU
    monitor: str = "val/loss"  # selection and early-stopping metric
    monitor_mode: Literal["min", "max"] = "min"
    early_stopping_patience: int = 0  # 0 = off
    resume: bool = False  # continue from out/checkpoints/last.ckpt when it exists
    experiment: str = "ranker"
    register_as: str | None = "ranker"
    alias: str | None = None  # no alias moves unless asked: the pipeline's gates move the champion
    limit_train_batches: int | float = 1.0
    progress_bar: bool = True  # a bar when stderr is a terminal; a log line per epoch (rows/s) either way
    init_from: Path | None = None  # warm start: an inference artifact folder (e.g. the champion's)
    run_name: str | None = None  # None: <dataset>-<model>-<UTC yyyymmdd-hhmm>, e.g. kuairand-mmoe-20261202-1403
    run_tags: dict[str, str] = field(default_factory=dict)  # e.g. mlflow.parentRunId of a pipeline run
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown --model {self.model!r}; available: {list(MODELS)}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.monitor_mode not in ("min", "max"):
            raise ValueError(f"monitor_mode must be 'min' or 'max', got {self.monitor_mode!r}")


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    artifact: Path
    metrics: dict[str, float]
    model_version: str | None
    seconds: float
    best_epoch: int | None = None
    primary: bool = True  # False on the non-zero ranks of a distributed run (they log and export nothing)


INTERNAL_FIELDS = {"features", "out", "tracking_uri", "model_overrides", "init_from", "run_name", "run_tags"}


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["num_experts=8", "expert_dims=[64,32]"]`` -> typed dict (values parsed as JSON when possible)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = tuple(value) if isinstance(value, list) else value
    return out


def load_config_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A YAML file of training fields plus an optional ``model:`` mapping of model-config fields.

    Returns ``(train_fields, model_overrides)``; unknown training fields are an error naming them.
    """
    if not path.is_file():
        raise ValueError(f"config file not found: {str(path)!r}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    model = data.pop("model_config", {}) or {}
    known = {f.name for f in fields(TrainConfig)} - INTERNAL_FIELDS
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown training field(s) {unknown} in {str(path)!r}; known: {sorted(known)}")
    return data, {k: tuple(v) if isinstance(v, list) else v for k, v in model.items()}


def _precision(accelerator: str, precision: str | None) -> str:
    if precision is not None:
        return precision
    gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    return "bf16-mixed" if gpu else "32-true"


class GateHeatmaps(Callback):
    """After each validation pass, log the task x expert gate heatmap to the MLflow run."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        health = getattr(module, "last_gate_health", None)
        if health is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        path = gate_heatmap(health, self.out / f"gates_epoch_{trainer.current_epoch:03d}.png",
                            title=f"epoch {trainer.current_epoch}: mean gate weight")
        logger = trainer.logger
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="gates")


class Progress(TQDMProgressBar):
    """Training progress: a tqdm bar on stderr (epoch, step, loss, rows/s) and one log line per epoch.

    Rows are counted from the batches this process trains on, times the number of processes (the
    data module gives each its own share); rows/s leaves validation time out.

    Args:
        bar: show the bar (:func:`train` sets it when stderr is a terminal); without it, a log line
            every ``heartbeat_s`` seconds says how far a long epoch has got.
        heartbeat_s: seconds between those lines.
    """

    SHOWN = ("train/loss", "val/loss", "val/auc_mean")  # of the metrics the module puts on the bar

    def __init__(self, bar: bool, heartbeat_s: float = 30.0) -> None:
        super().__init__(refresh_rate=1 if bar else 0, leave=True)
        self.heartbeat_s = heartbeat_s
        self.rows = 0
        self.started = self.beat = self.trained = time.perf_counter()

    def rows_per_s(self) -> float:
        """Training rows per second of this epoch so far (validation time excluded)."""
        return self.rows / max(self.trained - self.started, 1e-9)

    def _bar(self, desc: str, position: int, leave: bool) -> Tqdm:
        return Tqdm(desc=desc, position=position, disable=self.is_disabled, leave=leave, dynamic_ncols=True,
                    file=sys.stderr, smoothing=0, bar_format=self.BAR_FORMAT)

    def init_sanity_tqdm(self) -> Tqdm:
        return self._bar(self.sanity_check_description, 2 * self.process_position, False)

    def init_train_tqdm(self) -> Tqdm:
        return self._bar(self.train_description, 2 * self.process_position, True)

    def init_validation_tqdm(self) -> Tqdm:
        has_main_bar = self.trainer.state.fn != "validate"
        return self._bar(self.validation_description, 2 * self.process_position + has_main_bar, not has_main_bar)

    def get_metrics(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> dict[str, int | str | float | dict[str, float]]:
        shown = super().get_metrics(trainer, pl_module)
        out = {k: v for k, v in shown.items() if k in self.SHOWN}
        out["rows/s"] = f"{self.rows_per_s():,.0f}"
        return out

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.rows = 0
        self.started = self.beat = self.trained = time.perf_counter()
        super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.rows += len(batch) * trainer.world_size
        self.trained = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.is_disabled and trainer.is_global_zero and self.trained - self.beat >= self.heartbeat_s:
            self.beat = self.trained
            log.info("epoch %d/%d: step %d/%s, %s rows/s", trainer.current_epoch + 1, trainer.max_epochs,
                     batch_idx + 1, _count(self.total_train_batches), f"{self.rows_per_s():,.0f}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)  # closes this epoch's bar before the line below
        if not trainer.is_global_zero:
            return
        # This epoch's validation ran before this hook; its training metrics are logged after it.
        metrics = trainer.callback_metrics
        shown = [f"{k} {float(metrics[k]):.4f}" for k in ("val/loss", "val/auc_mean") if k in metrics]
        log.info("epoch %d/%d: %d steps, %s rows in %.1f s (%s rows/s), validation %.1f s%s",
                 trainer.current_epoch + 1, trainer.max_epochs, trainer.num_training_batches, f"{self.rows:,}",
                 self.trained - self.started, f"{self.rows_per_s():,.0f}", time.perf_counter() - self.trained,
                 "; " + ", ".join(shown) if shown else "")


def _count(n: float | int) -> str:
    return "?" if n == float("inf") else str(int(n))


def default_run_name(dataset: str, model: str, now: datetime | None = None) -> str:
    """``<dataset>-<model>-<UTC yyyymmdd-hhmm>``: what a plain training run is called in MLflow.

    Example:
        >>> default_run_name("kuairand", "mmoe", datetime(2026, 12, 2, 14, 3, tzinfo=UTC))
        'kuairand-mmoe-20261202-1403'
    """
    return f"{dataset}-{model}-{(now or datetime.now(UTC)):%Y%m%d-%H%M}"


SHARDED_EMBEDDING_LR = 0.05  # the fused row-wise Adagrad default when embedding_lr is unset


def _strategy(cfg: TrainConfig) -> str | TorchRecStrategy:
    """Lightning's strategy name, or the TorchRec sharding strategy for ``strategy="torchrec"``."""
    if cfg.strategy != "torchrec":
        return cfg.strategy
    gpu = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    return TorchRecStrategy(
        sharding_type=cfg.sharding_type,
        embedding_optimizer=cfg.embedding_optimizer,
        embedding_lr=cfg.embedding_lr if cfg.embedding_lr is not None else SHARDED_EMBEDDING_LR,
        process_group_backend="nccl" if gpu else "gloo",
    )


def train(cfg: TrainConfig) -> TrainResult:
    """Fit, select the best epoch, export the artifact, log everything to MLflow, register the version.

    The MLflow run is named (``cfg.run_name``, else :func:`default_run_name`), records the training
    data as dataset inputs and, with ``psutil`` installed, the machine's load; an error anywhere
    after the run exists ends it FAILED with the error in a tag, and a resumed run drops that tag.
    """
    quiet.install()
    start = time.perf_counter()
    uri = check_tracking_uri(cfg.tracking_uri)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    fitted = load_features(cfg.features)
    mconf = ModelConfig.from_fitted(fitted, model=cfg.model, **cfg.model_overrides)
    data = RankingDataModule(cfg.features, mconf, cfg.batch_size, cfg.seed)
    network = build_model(mconf)
    if cfg.init_from is not None:
        copied = warm_start(network, fitted, cfg.init_from)
        log.info("warm start from %s: %s", cfg.init_from, copied)
    module = RankingModule(network, mconf, lr=cfg.lr, weight_decay=cfg.weight_decay,
                           loss_weighting=cfg.loss_weighting, seed=cfg.seed, embedding_lr=cfg.embedding_lr,
                           embedding_weight_decay=cfg.embedding_weight_decay, embedding_l2=cfg.embedding_l2)

    ensure_experiment(uri, cfg.experiment)
    out = Path(cfg.out)
    last = out / "checkpoints" / "last.ckpt"
    run_id_file = out / "mlflow_run_id"
    resuming = cfg.resume and last.is_file()
    # Named here: MLflow's own random name would come from the generator seeded above, the same every run.
    logger = MLFlowLogger(experiment_name=cfg.experiment, tracking_uri=uri, log_model=False,
                          run_name=cfg.run_name or default_run_name(fitted.spec.name, cfg.model),
                          tags=dict(cfg.run_tags) or None,
                          run_id=run_id_file.read_text().strip() if resuming and run_id_file.is_file() else None)
    out.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank != 0:  # type: ignore[attr-defined]  # other processes of a distributed run log nothing
        return _fit_and_export(cfg, fitted, mconf, module, data, logger, resuming, start)
    run_id = str(logger.run_id)  # creates the run (or finds the resumed one)
    run_id_file.write_text(run_id)
    client = logger.experiment
    monitor = None
    try:
        if resuming:
            reopen(client, run_id)
        else:
            logger.log_hyperparams(
                {
                    **{f"train.{k}": v for k, v in asdict(cfg).items() if k not in ("model_overrides", "run_tags")},
                    **{f"model.{k}": v for k, v in mconf.to_dict().items() if k not in ("sparse", "tasks")},
                    "data.transform_hash": fitted.content_hash,
                    "data.train_window": f"{fitted.window.get('start')}..{fitted.window.get('end')}",
                    "data.train_rows": fitted.rows,
                }
            )
            log_datasets(client, run_id, feature_splits(cfg.features, fitted.spec.name, fitted.content_hash))
        monitor = system_metrics(run_id, uri, resume=resuming)
        result = _fit_and_export(cfg, fitted, mconf, module, data, logger, resuming, start)
        if monitor is not None:
            monitor.finish()
            monitor = None
        logger.finalize("success")
        return result
    except BaseException as e:
        if monitor is not None:
            monitor.finish()
        close_failed(client, run_id, e)
        raise


def _fit_and_export(
    cfg: TrainConfig, fitted: Any, mconf: ModelConfig, module: RankingModule, data: RankingDataModule,
    logger: MLFlowLogger, resuming: bool, start: float,
) -> TrainResult:
    """The Lightning fit, then (on rank 0) the final evaluation, the artifact and the registered version."""
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    best = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, monitor=cfg.monitor, mode=cfg.monitor_mode,
                           filename="best-{epoch:03d}")
    bar = cfg.progress_bar and sys.stderr.isatty()
    callbacks: list[Callback] = [best, GateHeatmaps(out / "plots"), Progress(bar=bar)]
    if cfg.early_stopping_patience > 0:
        callbacks.append(EarlyStopping(monitor=cfg.monitor, mode=cfg.monitor_mode,
                                       patience=cfg.early_stopping_patience))
    precision = _precision(cfg.accelerator, cfg.precision)
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=_strategy(cfg),
        precision=precision,  # type: ignore[arg-type]
        logger=logger,
        callbacks=callbacks,
        deterministic=True,
        use_distributed_sampler=False,  # the data module shards its own epoch-seeded batches
        # None is Lightning's "all batches" without its line announcing that all batches will be used
        limit_train_batches=None if cfg.limit_train_batches == 1.0 else cfg.limit_train_batches,
        log_every_n_steps=50,
        enable_model_summary=False,
        enable_progress_bar=True,  # the Progress callback: a bar at a terminal, log lines otherwise
        default_root_dir=out,
    )
    if trainer.is_global_zero:  # in place of Lightning's device banner, which quiet.install() drops
        device = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
        log.info("training %s on %s rows of %s: %d epoch(s), batch %d, %s x%d, %s%s", cfg.model, f"{fitted.rows:,}",
                 fitted.spec.name, cfg.epochs, cfg.batch_size, device, trainer.world_size, precision,
                 ", resuming from the last checkpoint" if resuming else "")
    trainer.fit(module, datamodule=data, ckpt_path="last" if resuming else None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
    best_epoch = None
    if isinstance(trainer.strategy, TorchRecStrategy):
        # The tables are still sharded across the processes; checkpoints hold full tensors, so the
        # selected weights load into a fresh unsharded model that rank 0 can evaluate and export.
        module.model = build_model(mconf)
        if not best.best_model_path:
            raise RuntimeError("a sharded run needs a checkpoint to export from; none was written")
        if trainer.is_global_zero:
            (out / "sharding_plan.txt").write_text(trainer.strategy.plan_text)
            logger.experiment.log_artifact(str(logger.run_id), str(out / "sharding_plan.txt"))
    if best.best_model_path:
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
        best_epoch = int(Path(best.best_model_path).stem.split("epoch=")[-1])
        metrics["best_epoch"] = float(best_epoch)
    if not trainer.is_global_zero:
        return TrainResult("", out / "artifact", metrics, None, time.perf_counter() - start, best_epoch, False)

    run_id = str(logger.run_id)
    # Final evaluation of the selected weights on every split there is: the full metric set.
    final: dict[str, float] = {}
    for split in ("val", "test"):
        if (Path(cfg.features) / f"{split}.parquet").is_file():
            table = split_table(cfg.features, split, mconf, fitted)
            final.update(evaluate(module.model.cpu(), table, mconf, f"final/{split}"))
    finite = {k: v for k, v in final.items() if v == v}  # MLflow rejects NaN metrics
    logger.experiment.log_batch(run_id, metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in finite.items()])
    metrics.update(final)
    artifact = export_artifact(
        module.model,
        mconf,
        fitted,
        out / "artifact",
        {"model_name": cfg.register_as or "", "run_id": run_id, "metrics": metrics, "best_epoch": best_epoch},
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    client = logger.experiment
    client.log_artifacts(run_id, str(artifact), artifact_path="model")
    client.log_artifact(run_id, str(out / "metrics.json"))
    version = None
    if cfg.register_as:
        how = {"made_by": "ranker train", "gates": "not run",
               "promoted": f"true ({cfg.alias}, by ranker train, no gates)" if cfg.alias else "false"}
        mv = register_artifact(
            cfg.tracking_uri, run_id, "model", cfg.register_as, cfg.alias,
            description=f"{cfg.model} trained on {fitted.window.get('start')}..{fitted.window.get('end')}",
            tags=how,
        )
        version = str(mv.version)
        client.set_tag(run_id, "registered_version", version)
    return TrainResult(run_id, artifact, metrics, version, time.perf_counter() - start, best_epoch)
