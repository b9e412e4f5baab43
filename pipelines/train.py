"""One training run: features folder -> Lightning fit -> inference artifact -> MLflow run + registry.

In a distributed run (several processes, on one node or several) every process calls :func:`train`
with the same config; only global rank 0 opens the tracking store, logs, exports and registers. The
others train their share and read nothing but their own copy of the features folder, so each node
may keep ``out`` on its own local disk (or all share one folder).
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.entities import Metric

from pipelines import quiet
from pipelines.plots import choice_heatmap, gate_heatmap, routing_heatmap
from pipelines.pyfunc import save_pyfunc
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
from pipelines.train_config import TrainConfig
from ranking.artifact import export_artifact
from ranking.config import ModelConfig
from ranking.train import FitResult, RankingModule, fit, load_features
from ranking.train.fitting import check_launch, launched_as_rank_zero

log = logging.getLogger("pipelines.train")


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    artifact: Path
    metrics: dict[str, float]
    model_version: str | None
    seconds: float
    best_epoch: int | None = None
    primary: bool = True  # False on the non-zero ranks of a distributed run (they log and export nothing)


class GateHeatmaps(L.Callback):
    """After each validation pass, log gate and routing heatmaps to the MLflow run.

    Artifacts, ``<epoch>`` 0-based in three digits: ``gates/gates_epoch_<epoch>.png`` (task x expert
    mean weight), ``routing/routing_epoch_<epoch>.png`` (task x expert load and importance) and, for
    each grouping the model is measured against (``category``, ``segment``),
    ``routing/<grouping>_epoch_<epoch>.png`` (expert x value per task).
    """

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        health = module.last_gate_health if isinstance(module, RankingModule) else None
        if health is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch
        figures = [("gates", gate_heatmap(health, self.out / f"gates_epoch_{epoch:03d}.png",
                                          title=f"epoch {epoch}: mean gate weight")),
                   ("routing", routing_heatmap(health, self.out / f"routing_epoch_{epoch:03d}.png",
                                               title=f"epoch {epoch}: expert load and importance"))]
        for grouping in health.group_choices:
            path = choice_heatmap(health, grouping, self.out / f"{grouping}_epoch_{epoch:03d}.png",
                                  title=f"epoch {epoch}: chosen expert by {grouping}")
            figures.append(("routing", path))
        logger = trainer.logger
        if isinstance(logger, MLFlowLogger):
            for folder, path in figures:
                logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=folder)


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


def train(cfg: TrainConfig) -> TrainResult:
    """Fit (``ranking.train.fit``), export the artifact, log everything to MLflow, register the version.

    The MLflow run is named (``cfg.run_name``, else :func:`default_run_name`), records the training
    data as dataset inputs and, with ``psutil`` installed, the machine's load; an error anywhere
    after the run exists ends it FAILED with the error in a tag, and a resumed run drops that tag.

    The other processes of a distributed run (:func:`~ranking.train.fitting.launched_as_rank_zero`
    false) never open the tracking store: they only train alongside rank 0.

    Raises:
        ValueError: among others, a multi-node launch that could never start
            (:func:`~ranking.train.fitting.check_launch`), checked before anything waits for a peer.
    """
    quiet.install()
    start = time.perf_counter()
    check_launch(cfg.fit_config())
    fitted = load_features(cfg.features)
    mconf = ModelConfig.from_fitted(fitted, model=cfg.model, **cfg.model_overrides)
    out = Path(cfg.out)
    last = out / "checkpoints" / "last.ckpt"
    run_id_file = out / "mlflow_run_id"
    resuming = cfg.resume and last.is_file()
    out.mkdir(parents=True, exist_ok=True)
    if not launched_as_rank_zero():  # on any node: no store, no logger (MLflow's client opens the store)
        return _fit_and_export(cfg, mconf, None, resuming, start)

    uri = check_tracking_uri(cfg.tracking_uri)
    ensure_experiment(uri, cfg.experiment)
    # Named here: MLflow's own random name would come from Python's generator, which fit seeds the same every run.
    logger = MLFlowLogger(experiment_name=cfg.experiment, tracking_uri=uri, log_model=False,
                          run_name=cfg.run_name or default_run_name(fitted.spec.name, cfg.model),
                          tags=dict(cfg.run_tags) or None,
                          run_id=run_id_file.read_text().strip() if resuming and run_id_file.is_file() else None)
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
        result = _fit_and_export(cfg, mconf, logger, resuming, start)
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


def _fit_and_export(cfg: TrainConfig, mconf: ModelConfig, logger: MLFlowLogger | None, resuming: bool,
                    start: float) -> TrainResult:
    """``ranking.train.fit``, then (on rank 0) the final metrics, the artifact and the registered version.

    ``logger`` is None on the other processes of a distributed run (they log nothing).
    """
    out = Path(cfg.out)
    bar = cfg.progress_bar and sys.stderr.isatty()
    result: FitResult = fit(cfg.features, mconf, cfg.fit_config(), out=out, logger=logger or False,
                            callbacks=[GateHeatmaps(out / "plots"), Progress(bar=bar)],
                            init_from=cfg.init_from, resume=resuming)
    metrics = result.metrics
    if result.primary != (logger is not None):  # the launcher's variables and Lightning disagree on who is rank 0
        raise RuntimeError(f"global rank {result.trainer.global_rank}: its launcher's variables said "
                           f"{'another rank' if logger is None else 'rank 0'}; nothing exported")
    if not result.primary or logger is None:
        return TrainResult("", out / "artifact", metrics, None, time.perf_counter() - start, result.best_epoch,
                           False)
    run_id = str(logger.run_id)
    client = logger.experiment
    if result.sharding_plan is not None:
        (out / "sharding_plan.txt").write_text(result.sharding_plan)
        client.log_artifact(run_id, str(out / "sharding_plan.txt"))
    # The final evaluation of the selected weights (fit's final/<split>/... metrics); MLflow rejects NaN.
    final = {k: v for k, v in metrics.items() if k.startswith("final/") and v == v}
    client.log_batch(run_id, metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in final.items()])
    artifact = export_artifact(
        result.model,
        mconf,
        result.fitted,
        out / "artifact",
        {"model_name": cfg.register_as or "", "run_id": run_id, "metrics": metrics, "best_epoch": result.best_epoch},
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    with tempfile.TemporaryDirectory(prefix="ranker-mlmodel-") as tmp:  # an MLflow Model holding the artifact
        client.log_artifacts(run_id, str(save_pyfunc(artifact, Path(tmp) / "model", cfg.features)),
                             artifact_path="model")
    client.log_artifact(run_id, str(out / "metrics.json"))
    version = None
    window = result.fitted.window
    if cfg.register_as:
        how = {"made_by": "ranker train", "gates": "not run",
               "promoted": f"true ({cfg.alias}, by ranker train, no gates)" if cfg.alias else "false"}
        mv = register_artifact(
            check_tracking_uri(cfg.tracking_uri), run_id, "model", cfg.register_as, cfg.alias,
            description=f"{cfg.model} trained on {window.get('start')}..{window.get('end')}",
            tags=how,
        )
        version = str(mv.version)
        client.set_tag(run_id, "registered_version", version)
    return TrainResult(run_id, artifact, metrics, version, time.perf_counter() - start, result.best_epoch)
