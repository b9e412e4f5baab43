"""``ranker pipeline run``: one night's work, resumable step by step.

ingest → validate → features → train → evaluate → register → promote → report

- **Idempotent.** A run is keyed by (pipeline, as-of day). A key already done (its state file, or
  a finished parent run in MLflow) is a no-op unless ``force``.
- **Resumable.** Each step's outputs go to ``<workdir>/runs/<as-of>/state.json`` when it ends;
  a rerun skips finished steps, training continues from its last checkpoint, and a version
  already registered for the run is found again instead of registered twice.
- **Rows checked once.** The validate step checks each row of the window against the spec, keeps
  the run's one quarantine and threshold, and writes the good rows; features and evaluate read those.
- **One at a time.** An OS file lock per pipeline (released by the kernel if the holder dies).
- **No half promotion.** The alias moves in one registry call, after the version and its tags
  exist, and only when every gate passes.
- **MLflow.** One parent run per pipeline run (named ``<pipeline> as-of <day>``) and a child run
  per step (``mlflow.parentRunId``); tags on the parent: data windows, fitted-transform hash, code
  version, config hash, status, decision and registered version; its metrics are each task's
  holdout gate metric, so the runs list reads at a glance (a saved view of the experiment,
  ``pipeline-<name>``, selects those columns); its dataset inputs are the train, validation and
  holdout data. A run that fails ends FAILED with its error in a tag; a resumed run drops the tag.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import polars as pl
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from features.spec import FeatureSpec, load_spec
from features.validate import REASON, CheckCounts, with_reason
from pipelines import lake, quiet, ui
from pipelines.champion import GateCheck, HoldoutScore, check_gates, key_metrics, score_holdout
from pipelines.config import PipelineConfig
from pipelines.lock import RunLock
from pipelines.plots import roc_and_calibration
from pipelines.report import decision_text, render
from pipelines.tracking import (
    RUN_NAME_COLUMN,
    ParquetSplit,
    check_reachable,
    check_tracking_uri,
    close_failed,
    default_tracking_uri,
    ensure_experiment,
    feature_splits,
    log_datasets,
    register_artifact,
    reopen,
    runs_page,
    save_runs_view,
)

log = logging.getLogger("pipelines.pipeline")
STEPS = ("ingest", "validate", "features", "train", "evaluate", "register", "promote", "report")
TAG = "pipeline."
ROWS = "rows"  # validate/rows/<window>.parquet: the window's good rows, the later steps' input


@dataclass(frozen=True)
class PipelineResult:
    """What one invocation did: ``done`` (this call finished the run) or ``noop`` (nothing to do)."""

    status: str
    message: str
    as_of: date | None = None
    parent_run_id: str | None = None
    version: str | None = None
    promoted: bool = False
    report: Path | None = None
    resumed_from: str | None = None  # first step this call ran when it continued an interrupted run
    checks: list[GateCheck] = field(default_factory=list)
    runs_url: str | None = None  # the experiment's runs list in the MLflow UI, decision and metric columns shown


class RunState:
    """The run's progress file: written atomically after every step."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"steps": {}}

    @property
    def status(self) -> str | None:
        return self.data.get("status")

    def done(self, step: str) -> bool:
        return step in self.data["steps"]

    def out(self, step: str) -> dict[str, Any]:
        return dict(self.data["steps"][step])

    def set(self, **values: Any) -> None:
        self.data.update(values)
        self.save()

    def mark(self, step: str, **outputs: Any) -> None:
        self.data["steps"][step] = outputs
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def code_version() -> str:
    """``git`` commit of the code (``-dirty`` with uncommitted changes), else the package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"mmoe-ranker {importlib.metadata.version('mmoe-ranker')}"


def _train_fields(cfg: PipelineConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``cfg.train`` (typed when the config was loaded: ``pipelines.train_config.train_section``) split into
    TrainConfig fields and model overrides."""
    data = dict(cfg.train)
    return data, dict(data.pop("model_config", None) or {})


class Pipeline:
    """One pipeline run for one as-of day (build with :func:`run_pipeline`)."""

    def __init__(self, cfg: PipelineConfig, uri: str, spec: FeatureSpec, as_of: date, run_dir: Path) -> None:
        self.cfg = cfg
        self.uri = uri
        self.spec = spec
        self.as_of = as_of
        self.run_dir = run_dir
        self.lake = cfg.workdir / "lake"
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.experiment_id = ensure_experiment(uri, cfg.experiment)
        self.state = RunState(run_dir / "state.json")
        self.key = f"{cfg.name}/{as_of.isoformat()}"

    # ---- MLflow plumbing -------------------------------------------------------------------
    def _base_tags(self) -> dict[str, str]:
        return {f"{TAG}name": self.cfg.name, f"{TAG}as_of": self.as_of.isoformat(), f"{TAG}run_key": self.key}

    @property
    def view(self) -> str:
        """The key of the experiment's saved runs-list view for this pipeline."""
        return "pipeline-" + re.sub(r"[^\w.-]", "-", self.cfg.name)

    def save_view(self) -> None:
        """The runs list with this pipeline's columns: decision, version, each task's holdout gate metric."""
        tasks: dict[str, str] = {t.name: t.type for t in self.spec.tasks}
        metrics = [f"metrics.`{k}`" for k in key_metrics(tasks, self.cfg.gates)]
        tags = [f"tags.`{TAG}decision`", f"tags.`{TAG}version`"]
        widths = {RUN_NAME_COLUMN: 220, **dict.fromkeys(tags, 125), **dict.fromkeys(metrics, 160)}
        save_runs_view(self.client, self.experiment_id, self.view, f"pipeline {self.cfg.name}: decisions",
                       [*tags, *metrics], widths)

    def open_parent(self, windows: lake.Windows) -> str:
        self.save_view()
        parent = self.state.data.get("parent_run_id")
        if parent:
            reopen(self.client, str(parent), tag=f"{TAG}error")  # the failed attempt's error is history
            self.client.set_tag(parent, f"{TAG}status", "running")
            return str(parent)
        version = code_version()
        tags = {
            **self._base_tags(),
            f"{TAG}status": "running",
            f"{TAG}code_version": version,
            f"{TAG}config_hash": self.cfg.content_hash,
            **{f"{TAG}window.{k}": v for k, v in windows.to_dict().items()},
            "mlflow.source.name": "ranker pipeline run",
        }
        run = self.client.create_run(self.experiment_id, run_name=f"{self.cfg.name} as-of {self.as_of}", tags=tags)
        run_id = run.info.run_id
        try:
            flat = _flatten(self.cfg.to_dict())
            self.client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in flat.items()])
            if self.cfg.path is not None:
                self.client.log_artifact(run_id, str(self.cfg.path), artifact_path="config")
        except BaseException as e:  # failed at start: closed, never left RUNNING
            close_failed(self.client, run_id, e, tag=f"{TAG}error", tags={f"{TAG}status": "failed"})
            raise
        self.state.set(parent_run_id=run_id, as_of=self.as_of.isoformat(), windows=windows.to_dict(),
                       code_version=version, started=datetime.now(UTC).isoformat(timespec="seconds"))
        return run_id

    @contextmanager
    def child(self, parent: str, step: str) -> Iterator[str]:
        """A child run for one step; FINISHED when the step returns, FAILED when it raises."""
        run = self.client.create_run(self.experiment_id, run_name=step,
                                     tags={MLFLOW_PARENT_RUN_ID: parent, f"{TAG}step": step, **self._base_tags()})
        run_id = run.info.run_id
        try:
            yield run_id
        except BaseException as e:
            close_failed(self.client, run_id, e)
            raise
        self.client.set_terminated(run_id, "FINISHED")

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        ok = [Metric(k, float(v), now, 0) for k, v in metrics.items()
              if isinstance(v, int | float) and math.isfinite(v)]
        for i in range(0, len(ok), 900):
            self.client.log_batch(run_id, metrics=ok[i:i + 900])

    # ---- steps -----------------------------------------------------------------------------
    def ingest(self, parent: str, windows: lake.Windows, force: bool) -> None:
        days = windows.train + windows.validation + windows.holdout
        with self.child(parent, "ingest") as run_id:
            got = lake.ingest(self.cfg, self.spec, self.lake, days, overwrite=force)
            self.log_metrics(run_id, {"partitions_new": len(got.new_days), "rows_new": sum(got.rows.values())})
            self.client.log_dict(run_id, got.rows, "ingested_rows.json")
        log.info("ingest: %d new partition(s) %s", len(got.new_days), [d.isoformat() for d in got.new_days])
        self.state.mark("ingest", run_id=run_id, new_days=[d.isoformat() for d in got.new_days], rows=got.rows)

    def validate(self, parent: str, windows: lake.Windows) -> None:
        """Check every row of the run's window once; the later steps read the good rows this writes.

        Each window's days are checked together (a duplicate is one within the window). One polars
        query writes the good rows (``validate/rows/<window>.parquet``), the bad ones
        (``quarantine.parquet``, with their reason and window) and the counts, so the check runs once
        per row; the features step builds from these rows without checking them again.
        """
        out = self.run_dir / "validate"
        (out / ROWS).mkdir(parents=True, exist_ok=True)
        with self.child(parent, "validate") as run_id:
            checked = {name: with_reason(pl.concat([pl.scan_parquet(f) for f in lake.files(self.lake, days)],
                                                   how="vertical_relaxed"), self.spec)
                       for name, days in (("train", windows.train), ("validation", windows.validation),
                                          ("holdout", windows.holdout))}
            good = [lf.filter(pl.col(REASON).is_null()).drop(REASON).sink_parquet(self._rows_file(name), lazy=True)
                    for name, lf in checked.items()]
            bad = pl.concat([lf.filter(pl.col(REASON).is_not_null()).with_columns(pl.lit(name).alias("window"))
                             for name, lf in checked.items()], how="diagonal_relaxed")
            tallies = [lf.group_by(REASON).len() for lf in checked.values()]
            done = pl.collect_all([*good, bad.sink_parquet(out / "quarantine.parquet", lazy=True), *tallies],
                                  engine="streaming")
            counts = {name: CheckCounts.of(frame) for name, frame in zip(checked, done[-len(tallies):], strict=True)}
            total = sum(counts.values(), CheckCounts(0, {}))
            rows, bad_rows, merged = total.rows, total.bad, total.quarantined
            report: dict[str, Any] = {"splits": {
                name: {"rows": c.rows, "quarantined": c.bad, "reasons": c.quarantined} for name, c in counts.items()}}
            report.update(rows=rows, quarantined=bad_rows, reasons=merged,
                          max_bad_fraction=self.spec.validation.max_bad_fraction)
            (out / "quarantine_report.json").write_text(json.dumps(report, indent=1))
            self.client.log_artifact(run_id, str(out / "quarantine_report.json"))
            if bad_rows:
                self.client.log_artifact(run_id, str(out / "quarantine.parquet"))
            self.log_metrics(run_id, {"rows_checked": rows, "rows_quarantined": bad_rows,
                                      "bad_fraction": bad_rows / rows if rows else 0.0})
            if rows == 0:
                raise ValueError(f"as-of {self.as_of}: the window {windows.to_dict()} holds no rows")
            if bad_rows / rows > self.spec.validation.max_bad_fraction:
                raise ValueError(
                    f"{bad_rows} of {rows} rows ({bad_rows / rows:.1%}) are quarantined, more than max_bad_fraction "
                    f"{self.spec.validation.max_bad_fraction:.0%}; reasons {merged}; see {out / 'quarantine.parquet'}"
                )
        log.info("validate: %d rows, %d quarantined %s", rows, bad_rows, merged)
        self.state.mark("validate", run_id=run_id, rows=rows, quarantined=bad_rows, reasons=merged,
                        splits=report["splits"])

    def _rows_file(self, window: str) -> Path:
        return self.run_dir / "validate" / ROWS / f"{window}.parquet"

    def read_checked(self, *names: str) -> tuple[pl.LazyFrame, CheckCounts]:
        """The good rows of the named windows as the validate step wrote them, and that step's counts of them."""
        files = [self._rows_file(name) for name in names]
        gone = [str(f) for f in files if not f.is_file()]
        if gone:
            raise ValueError(f"{self.key}: the validate step's rows {gone} are gone; --force runs the day again")
        splits = self.state.out("validate")["splits"]
        counts = sum((CheckCounts(splits[n]["rows"], splits[n]["reasons"]) for n in names), CheckCounts(0, {}))
        return pl.concat([pl.scan_parquet(f) for f in files], how="vertical_relaxed"), counts

    def features(self, parent: str, windows: lake.Windows) -> None:
        from features.build import build

        out = self.run_dir / "features"
        rows, counts = self.read_checked("train", "validation")
        with self.child(parent, "features") as run_id:
            summary = build(rows, self.spec, out, train_end=windows.train[-1], checked=counts)
            stats = pl.scan_parquet(out / "train.parquet").describe()
            stats.write_csv(out / "feature_stats.csv")
            for name in ("transform.json", "summary.json", "feature_stats.csv"):
                self.client.log_artifact(run_id, str(out / name))
            self.log_metrics(run_id, {f"rows/{k}": v for k, v in summary.rows.items()})
            self.client.set_tag(parent, f"{TAG}transform_hash", summary.transform_hash)
            log_datasets(self.client, parent, feature_splits(out, self.spec.name, summary.transform_hash))
        log.info("features: rows %s, transform %s", summary.rows, summary.transform_hash)
        self.state.mark("features", run_id=run_id, rows=summary.rows, transform_hash=summary.transform_hash)

    def champion(self) -> tuple[str, Path] | None:
        """The champion at the start of this run (version, local artifact), fetched once and remembered."""
        if "champion" in self.state.data:
            got = self.state.data["champion"]
            if got is None:
                return None
            if Path(got["path"]).is_dir():
                return str(got["version"]), Path(got["path"])
        try:
            mv = self.client.get_model_version_by_alias(self.cfg.model_name, self.cfg.alias)
        except MlflowException:
            self.state.set(champion=None)
            return None
        from ranking.artifact import download_artifact

        dst = self.run_dir / "champion"
        shutil.rmtree(dst, ignore_errors=True)
        source = self.client.get_model_version_download_uri(self.cfg.model_name, mv.version)
        path = download_artifact(source, dst, self.uri, f"models:/{self.cfg.model_name}/{mv.version}")
        log.info("champion: %s version %s, fetched to %s", self.cfg.model_name, mv.version, path)
        self.state.set(champion={"version": str(mv.version), "path": str(path)})
        return str(mv.version), path

    def train(self, parent: str) -> None:
        from pipelines.train import train
        from pipelines.train_config import TrainConfig

        out = self.run_dir / "train"
        fields_, model = _train_fields(self.cfg)
        champion = self.champion()
        stale = out / "mlflow_run_id"
        if distributed_rank() == 0 and stale.is_file() and not (out / "checkpoints" / "last.ckpt").is_file():
            # killed before the first checkpoint: that MLflow run can never be resumed
            self.client.set_terminated(stale.read_text().strip(), "KILLED")
            stale.unlink()
        cfg = TrainConfig(
            features=self.run_dir / "features", out=out, tracking_uri=self.uri, experiment=self.cfg.experiment,
            register_as=None, alias=None, resume=True, run_name="train",
            run_tags={MLFLOW_PARENT_RUN_ID: parent, f"{TAG}step": "train", **self._base_tags()},
            init_from=champion[1] if (self.cfg.warm_start and champion) else None,
            model_overrides=model, **fields_,
        )
        result = train(cfg)
        if not result.primary:
            return  # a non-zero rank: rank 0 records the step
        self.client.set_terminated(result.run_id, "FINISHED")
        log.info("train: run %s, best epoch %s", result.run_id, result.best_epoch)
        self.state.mark("train", run_id=result.run_id, artifact=str(result.artifact), best_epoch=result.best_epoch,
                        model=cfg.model, warm_start=cfg.init_from is not None)

    def evaluate(self, parent: str, windows: lake.Windows) -> None:
        files = lake.files(self.lake, windows.holdout)
        rows, _ = self.read_checked("holdout")
        champion = self.champion()
        with self.child(parent, "evaluate") as run_id:
            chal = score_holdout(self.state.out("train")["artifact"], rows, checked_by=self.spec)
            champ: HoldoutScore | None = score_holdout(champion[1], rows, checked_by=self.spec) if champion else None
            checks = check_gates(chal.metrics, champ.metrics if champ else None, chal.task_types, self.cfg.gates)
            self.log_metrics(run_id, {f"challenger/{k}": v for k, v in chal.metrics.items()})
            if champ is not None:
                self.log_metrics(run_id, {f"champion/{k}": v for k, v in champ.metrics.items()})
            margins = {f"gate/{c.name}/{c.task}/margin": c.margin for c in checks if c.champion is not None}
            self.log_metrics(run_id, margins)
            # The parent shows each task's gate metric, rounded for reading in the runs list; the full
            # set, unrounded, is on this run (challenger/..., champion/...).
            self.log_metrics(parent, {k: round(chal.metrics[k], 4) for k in key_metrics(chal.task_types, self.cfg.gates)
                                      if k in chal.metrics})
            holdout = ParquetSplit(files, f"{self.spec.name}-holdout", self.lake, salt=windows.span("holdout"))
            log_datasets(self.client, run_id, {"holdout": holdout})
            log_datasets(self.client, parent, {"holdout": holdout})
            self.client.log_dict(run_id, {"checks": [c.to_dict() for c in checks]}, "gates.json")
            for task, kind in chal.task_types.items():
                if kind != "binary":
                    continue
                curves = {"challenger": chal.predictions[task]}
                if champ is not None and champion is not None and task in champ.predictions:
                    curves[f"champion v{champion[0]}"] = champ.predictions[task]
                png = roc_and_calibration(task, curves, self.run_dir / "plots" / f"roc_calibration_{task}.png")
                self.client.log_artifact(run_id, str(png), artifact_path="plots")
        passed = all(c.passed for c in checks)
        log.info("evaluate: gates %s", "passed" if passed else "FAILED")
        self.state.mark("evaluate", run_id=run_id, challenger=chal.metrics, champion=champ.metrics if champ else None,
                        checks=[c.to_dict() for c in checks], holdout_rows=chal.rows,
                        champion_version=champion[0] if champion else None, tasks=list(chal.task_types))

    def register(self, parent: str, windows: lake.Windows) -> None:
        ev, tr = self.state.out("evaluate"), self.state.out("train")
        checks = [GateCheck(**c) for c in ev["checks"]]
        passed = all(c.passed for c in checks)
        name = self.cfg.model_name
        with self.child(parent, "register") as run_id:
            # A version already made from this training run (an interrupted earlier attempt) is reused.
            existing = [v for v in self.client.search_model_versions(f"name='{name}'") if v.run_id == tr["run_id"]]
            if existing:
                version = str(min(int(v.version) for v in existing))
            else:
                primary = f"holdout/{self.cfg.gates.primary}/{self.cfg.gates.binary_metric}"
                champ = ev["champion"] or {}
                text = (f"{tr['model']} trained on {windows.span('train')}, epoch selected on "
                        f"{windows.span('validation')}; holdout {windows.span('holdout')}: {primary} "
                        f"{ev['challenger'].get(primary, math.nan):.4f}"
                        + (f" vs champion v{ev['champion_version']} {champ.get(primary, math.nan):.4f}"
                           if ev["champion_version"] else " (first model)")
                        + f"; gates {'passed' if passed else 'failed'}. Pipeline {self.key}.")
                mv = register_artifact(self.uri, tr["run_id"], "model", name, None, description=text)
                version = str(mv.version)
            tags = {
                **self._base_tags(),
                "made_by": f"pipeline {self.key}",
                "pipeline.parent_run_id": parent,
                "data.train_window": windows.span("train"),
                "data.validation_window": windows.span("validation"),
                "data.holdout_window": windows.span("holdout"),
                "data.transform_hash": self.state.out("features")["transform_hash"],
                "gates": "passed" if passed else "failed",
                "gates.failed": ", ".join(f"{c.name}:{c.task}" for c in checks if not c.passed) or "-",
                "champion_at_evaluation": str(ev["champion_version"] or "-"),
                **{f"holdout.{k.split('/', 1)[1].replace('/', '.')}": f"{v:.5f}" for k, v in ev["challenger"].items()
                   if k.endswith(("/auc", "/gauc", "/r2")) and math.isfinite(v)},
            }
            for k, v in tags.items():
                self.client.set_model_version_tag(name, version, k, v)
            self.client.set_tag(parent, f"{TAG}version", version)
        log.info("register: %s version %s", name, version)
        self.state.mark("register", run_id=run_id, version=version)

    def promote(self, parent: str) -> None:
        checks = [GateCheck(**c) for c in self.state.out("evaluate")["checks"]]
        version = self.state.out("register")["version"]
        name, alias = self.cfg.model_name, self.cfg.alias
        promoted = all(c.passed for c in checks)
        if promoted:
            self.client.set_registered_model_alias(name, alias, version)  # the one promoting call
        self.client.set_model_version_tag(name, version, "promoted", "true" if promoted else "false")
        self.client.set_tag(parent, f"{TAG}decision", "promoted" if promoted else "rejected")
        log.info("promote: %s", f"{name}@{alias} -> version {version}" if promoted else "gates failed, not promoted")
        self.state.mark("promote", promoted=promoted)

    def report(self, parent: str, windows: lake.Windows) -> Path:
        ev = self.state.out("evaluate")
        val = self.state.out("validate")
        ctx = {
            "pipeline": self.cfg.name, "as_of": self.as_of.isoformat(), "windows": windows.to_dict(),
            "ingested": self.state.out("ingest")["new_days"], "rows_checked": val["rows"],
            "quarantined_total": val["quarantined"], "quarantined": val["reasons"],
            "rows": self.state.out("features")["rows"], "holdout_rows": ev["holdout_rows"],
            "transform_hash": self.state.out("features")["transform_hash"],
            "code_version": self.state.data.get("code_version") or code_version(),
            "config_hash": self.cfg.content_hash, "model": self.state.out("train")["model"],
            "best_epoch": self.state.out("train")["best_epoch"], "warm_start": self.state.out("train")["warm_start"],
            "train_run_id": self.state.out("train")["run_id"], "model_name": self.cfg.model_name,
            "version": self.state.out("register")["version"], "champion_version": ev["champion_version"],
            "challenger_metrics": ev["challenger"], "champion_metrics": ev["champion"], "tasks": ev["tasks"],
            "checks": [GateCheck(**c) for c in ev["checks"]], "promoted": self.state.out("promote")["promoted"],
            "gates": self.cfg.gates.model_dump(), "parent_run_id": parent,
        }
        path = self.run_dir / "report.md"
        path.write_text(render(ctx))
        self.client.log_artifact(parent, str(path))
        self.client.set_tag(parent, "mlflow.note.content", decision_text(
            ctx["checks"], ctx["promoted"], ctx["version"], ctx["champion_version"]))
        self.state.mark("report", path=str(path))
        return path


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _done_in_mlflow(client: MlflowClient, experiment: str, name: str, as_of: date) -> str | None:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=(f"tags.`{TAG}name` = '{name}' and tags.`{TAG}as_of` = '{as_of.isoformat()}' "
                       f"and tags.`{TAG}status` = 'done'"),
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _recorded_done(client: MlflowClient, run_id: object) -> bool:
    """Whether the store holds ``run_id`` as a finished pipeline run."""
    if not isinstance(run_id, str) or not run_id:
        return False
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    return run.data.tags.get(f"{TAG}status") == "done"


def _close_abandoned(client: MlflowClient, experiment_id: str, state: RunState) -> None:
    """An unfinished earlier attempt (killed, then replaced with ``--force``): its runs still RUNNING end KILLED."""
    parent = state.data.get("parent_run_id")
    if not isinstance(parent, str) or not parent or state.status == "done":
        return
    try:
        runs = [client.get_run(parent), *client.search_runs([experiment_id],
                                                            f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'")]
    except MlflowException:
        return  # a run the store does not know (another store) is nothing to close
    for run in runs:
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, f"{TAG}status", "abandoned")
            client.set_terminated(run.info.run_id, "KILLED")


def runs_url(uri: str, experiment_id: str, view: str) -> str:
    """Where the runs list is: the tracking server's own UI, or ``make mlflow-ui``'s for a local store."""
    if urlparse(uri).scheme in ("http", "https"):
        return uri.rstrip("/") + runs_page(experiment_id, view)
    port = os.environ.get("MLFLOW_UI_PORT", str(ui.DEFAULT_PORT))
    return f"http://{ui.DEFAULT_HOST}:{port}{runs_page(experiment_id, view)}"


def distributed_rank() -> int:
    """This process's global rank when a launcher started it (Lightning's DDP launcher, torchrun, SLURM), else 0."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    local, node = os.environ.get("LOCAL_RANK", "0"), os.environ.get("NODE_RANK", "0")
    local_rank = int(local) if local.isdigit() else 0
    node_rank = int(node) if node.isdigit() else 0
    return local_rank if node_rank == 0 else -1  # -1: some rank of another node (the exact number is unknown)


def _join_training(cfg: PipelineConfig, as_of: date | None, timeout_s: float = 3600.0) -> PipelineResult:
    """A non-zero rank of a distributed training: wait for rank 0's features, then train alongside it.

    Rank 0 runs every other step (and holds the lock); the other ranks only take part in the
    training step, reading the run's state from the shared work folder.
    """
    quiet.install()
    runs = cfg.workdir / "runs"
    deadline = time.monotonic() + timeout_s
    while True:
        states = [RunState(p) for p in sorted(runs.glob("*/state.json"))] if runs.is_dir() else []
        if as_of is not None:
            states = [st for st in states if st.data.get("as_of") == as_of.isoformat()]
        ready = [st for st in states if st.done("features") and not st.done("train") and st.status != "done"]
        if ready:
            break
        if time.monotonic() > deadline:
            raise ValueError(f"rank {distributed_rank()}: no run in {str(runs)!r} reached the train step "
                             f"within {timeout_s:.0f} s")
        time.sleep(1.0)
    state = ready[-1]
    day = date.fromisoformat(state.data["as_of"])
    uri = check_tracking_uri(cfg.tracking_uri or default_tracking_uri())  # as rank 0 opens it (driver named)
    p = Pipeline(cfg, uri, load_spec(cfg.spec or cfg.source.dataset), day, state.path.parent)
    p.train(str(state.data["parent_run_id"]))
    return PipelineResult("noop", f"rank {distributed_rank()}: trained as part of {p.key}", day)


def run_pipeline(cfg: PipelineConfig, as_of: date | None = None, force: bool = False) -> PipelineResult:
    """Run (or resume, or skip) the pipeline for ``as_of`` (default: the newest day of data).

    Under a distributed launcher (``train.devices`` > 1 or ``num_nodes`` > 1), only rank 0 runs the
    pipeline; the other ranks join its training step (the work folder must be shared between nodes).

    Raises:
        ValueError: unusable tracking store (before any work), bad config, too little data,
            too many quarantined rows.
        pipelines.lock.PipelineBusy: the same pipeline runs in another process.
    """
    quiet.install()
    if distributed_rank() != 0:
        return _join_training(cfg, as_of)
    uri = check_reachable(cfg.tracking_uri or default_tracking_uri())
    _train_fields(cfg)  # unknown training fields fail here, before any work
    spec = load_spec(cfg.spec or cfg.source.dataset)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    with RunLock(cfg.workdir / "pipeline.lock"):
        if lake.synthesize_if_empty(cfg):
            log.info("source: wrote the synthetic log to %s", cfg.source.path)
        available = lake.source_days(cfg, spec)
        if not available:
            raise ValueError(f"source {str(cfg.source.path)!r} holds no data")
        explicit = as_of is not None
        as_of = as_of or available[-1]
        run_dir = cfg.workdir / "runs" / as_of.isoformat()
        previous = RunState(run_dir / "state.json")
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        # Done means done here: this work folder's state says so and the store holds that run as done.
        recorded = previous.data.get("parent_run_id")
        done_here = previous.status == "done" and _recorded_done(client, recorded)
        if not force and done_here:
            version = previous.data.get("steps", {}).get("register", {}).get("version")
            what = f"as-of {as_of.isoformat()} is already done" if explicit else (
                f"no new data: the newest day {as_of.isoformat()} is already done")
            msg = f"{what} in {str(cfg.workdir)!r} (MLflow run {recorded}); --force runs it again"
            log.info(msg)
            return PipelineResult("noop", msg, as_of, recorded, version)
        if previous.status == "done" and not done_here:
            log.info("%s: the work folder says done but the store %s holds no such finished run (%s); "
                     "running it again", as_of, uri, recorded)
        elif (elsewhere := _done_in_mlflow(client, cfg.experiment, cfg.name, as_of)) and not done_here:
            log.info("%s is done in another work folder (MLflow run %s); running it here", as_of, elsewhere)
        if (force or previous.status == "done") and run_dir.exists():
            _close_abandoned(client, ensure_experiment(uri, cfg.experiment), previous)
            archived = run_dir.with_name(f"{run_dir.name}.{datetime.now(UTC):%Y%m%dT%H%M%S}")
            run_dir.rename(archived)
            log.info("previous state of %s moved to %s", as_of, archived)
        windows = lake.cut_windows(available, as_of, cfg)
        p = Pipeline(cfg, uri, spec, as_of, run_dir)
        resumed = next((s for s in STEPS if not p.state.done(s)), None) if p.state.data["steps"] else None
        parent = p.open_parent(windows)  # a failure in there closes the run it made
        if resumed:
            log.info("resuming %s at step %s", p.key, resumed)
        try:
            steps: dict[str, Callable[[], object]] = {
                "ingest": lambda: p.ingest(parent, windows, force),
                "validate": lambda: p.validate(parent, windows),
                "features": lambda: p.features(parent, windows),
                "train": lambda: p.train(parent),
                "evaluate": lambda: p.evaluate(parent, windows),
                "register": lambda: p.register(parent, windows),
                "promote": lambda: p.promote(parent),
                "report": lambda: p.report(parent, windows),
            }
            for i, step in enumerate(STEPS, 1):
                if not p.state.done(step):
                    log.info("step %d/%d: %s", i, len(STEPS), step)
                    steps[step]()
        except BaseException as e:
            p.state.set(status="failed", error=f"{type(e).__name__}: {e}")
            close_failed(p.client, parent, e, tag=f"{TAG}error", tags={f"{TAG}status": "failed"})
            raise
        p.client.set_tag(parent, f"{TAG}status", "done")
        p.client.set_terminated(parent, "FINISHED")
        p.state.data.pop("error", None)  # an earlier attempt's; this one succeeded
        p.state.set(status="done", finished=datetime.now(UTC).isoformat(timespec="seconds"))
        promoted = p.state.out("promote")["promoted"]
        version = p.state.out("register")["version"]
        checks = [GateCheck(**c) for c in p.state.out("evaluate")["checks"]]
        ev = p.state.out("evaluate")
        msg = decision_text(checks, promoted, version, ev["champion_version"]).replace("**", "")
        url = runs_url(uri, p.experiment_id, p.view)
        log.info("MLflow runs list: %s", url)
        return PipelineResult("done", msg, as_of, parent, version, promoted, Path(p.state.out("report")["path"]),
                              resumed, checks, url)


def dump_config(cfg: PipelineConfig) -> str:
    """The effective configuration as YAML (what ``ranker pipeline show`` prints)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
