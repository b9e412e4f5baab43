"""One training run: features folder -> Lightning fit -> inference artifact -> MLflow run + registry."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger

from pipelines.tracking import check_tracking_uri, ensure_experiment, register_artifact
from ranking.artifact import build_model, export_artifact
from ranking.config import ModelConfig
from ranking.data import RankingDataModule, load_features
from ranking.module import RankingModule

log = logging.getLogger("pipelines.train")
MODELS = ("mmoe",)


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
    seed: int = 0
    accelerator: str = "auto"
    precision: str | None = None  # None: bf16-mixed on GPU, 32-true on CPU
    experiment: str = "ranker"
    register_as: str | None = "ranker"
    alias: str | None = "champion"
    limit_train_batches: int | float = 1.0
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown --model {self.model!r}; available: {list(MODELS)}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    artifact: Path
    metrics: dict[str, float]
    model_version: str | None
    seconds: float


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


def _precision(accelerator: str, precision: str | None) -> str:
    if precision is not None:
        return precision
    gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    return "bf16-mixed" if gpu else "32-true"


def train(cfg: TrainConfig) -> TrainResult:
    """Fit, export the artifact, log everything to MLflow and register the version."""
    start = time.perf_counter()
    uri = check_tracking_uri(cfg.tracking_uri)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    fitted = load_features(cfg.features)
    mconf = ModelConfig.from_fitted(fitted, model=cfg.model, **cfg.model_overrides)
    data = RankingDataModule(cfg.features, mconf, cfg.batch_size, cfg.seed)
    module = RankingModule(build_model(mconf), mconf, lr=cfg.lr)

    ensure_experiment(uri, cfg.experiment)
    logger = MLFlowLogger(experiment_name=cfg.experiment, tracking_uri=uri, log_model=False)
    logger.log_hyperparams(
        {
            **{f"train.{k}": v for k, v in asdict(cfg).items() if k != "model_overrides"},
            **{f"model.{k}": v for k, v in mconf.to_dict().items() if k not in ("sparse", "tasks")},
            "data.transform_hash": fitted.content_hash,
            "data.train_window": f"{fitted.window.get('start')}..{fitted.window.get('end')}",
            "data.train_rows": fitted.rows,
        }
    )
    out = Path(cfg.out)
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        accelerator=cfg.accelerator,
        devices=1,
        precision=_precision(cfg.accelerator, cfg.precision),  # type: ignore[arg-type]
        logger=logger,
        callbacks=[ModelCheckpoint(dirpath=out / "checkpoints", save_last=True)],
        deterministic=True,
        limit_train_batches=cfg.limit_train_batches,
        log_every_n_steps=50,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(module, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}

    run_id = str(logger.run_id)
    artifact = export_artifact(
        module.model,
        mconf,
        fitted,
        out / "artifact",
        {"model_name": cfg.register_as or "", "run_id": run_id, "metrics": metrics},
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    client = logger.experiment
    client.log_artifacts(run_id, str(artifact), artifact_path="model")
    client.log_artifact(run_id, str(out / "metrics.json"))
    version = None
    if cfg.register_as:
        mv = register_artifact(
            uri, run_id, "model", cfg.register_as, cfg.alias,
            description=f"{cfg.model} trained on {fitted.window.get('start')}..{fitted.window.get('end')}",
        )
        version = str(mv.version)
        client.set_tag(run_id, "registered_version", version)
    logger.finalize("success")
    return TrainResult(run_id, artifact, metrics, version, time.perf_counter() - start)
