"""A pipeline run checks each row once: one quarantine, one threshold, and later steps read the checked rows."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import date
from pathlib import Path
from types import ModuleType
from typing import Any

import polars as pl
import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

import features.build
import pipelines.champion
import pipelines.pipeline
from features.synthetic import SynthConfig, write_log
from pipelines.config import load_pipeline_config
from pipelines.pipeline import run_pipeline
from tests.pipelines.conftest import write_config

DAYS = SynthConfig(days=4, users=200, items=2000, requests_per_day=100, slate_size=10, seed=11)
AS_OF = date(2026, 1, 4)  # train 01-01..01-02, validation 01-03, holdout 01-04


def _corrupt_landing(root: Path) -> Path:
    """The synthetic log with known bad rows: 3 + 2 duplicates in training, 1 in validation, 2 in holdout."""
    landing = root / "landing"
    for path in write_log(DAYS, landing):
        day = pl.read_parquet(path)
        i = pl.int_range(pl.len())
        if "2026-01-01" in str(path):
            day = day.with_columns(pl.when(i < 3).then(-1.0).otherwise(pl.col("watch_time_s"))
                                   .cast(pl.Float32).alias("watch_time_s")).vstack(day.slice(10, 2))
        elif "2026-01-03" in str(path):
            day = day.with_columns(pl.when(i == 0).then(None).otherwise(pl.col("user_id")).alias("user_id"))
        elif "2026-01-04" in str(path):
            day = day.with_columns(pl.when(i < 2).then(2).otherwise(pl.col("click")).cast(pl.Int8).alias("click"))
        day.write_parquet(path)
    return landing


def _counting(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> list[int]:
    """Count the calls of ``module.with_reason`` (each one is a check of some rows)."""
    calls: list[int] = []
    real: Callable[..., Any] = module.with_reason

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "with_reason", counted)
    return calls


def test_a_run_with_bad_rows_checks_each_row_once_and_resumes_from_features(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    landing = _corrupt_landing(tmp_path)
    cfg = load_pipeline_config(write_config(tmp_path, source={"path": str(landing), "synthesize": {}}))
    checks = {name: _counting(monkeypatch, m) for name, m in (
        ("validate", pipelines.pipeline), ("build", features.build), ("holdout", pipelines.champion))}
    real_build = features.build.build

    def disk_full(*args: Any, **kwargs: Any) -> Any:
        raise OSError("disk full")

    monkeypatch.setattr(features.build, "build", disk_full)  # the features step fails once
    with pytest.raises(OSError, match="disk full"):
        run_pipeline(cfg, as_of=AS_OF)
    monkeypatch.setattr(features.build, "build", real_build)
    done = run_pipeline(cfg, as_of=AS_OF)
    assert done.status == "done" and done.resumed_from == "features"

    run = cfg.workdir / "runs" / AS_OF.isoformat()
    assert {name: len(c) for name, c in checks.items()} == {"validate": 3, "build": 0, "holdout": 0}
    assert [p.relative_to(run) for p in run.rglob("quarantine*.parquet")] == [Path("validate/quarantine.parquet")]
    report = json.loads((run / "validate" / "quarantine_report.json").read_text())
    quarantine = pl.read_parquet(run / "validate" / "quarantine.parquet")
    assert quarantine.height == report["quarantined"] == 8
    assert quarantine.group_by("window").len().sort("window").rows() == [("holdout", 2), ("train", 5),
                                                                          ("validation", 1)]
    assert report["reasons"] == {"watch_time_s < 0": 3, "click not in {0, 1}": 2,
                                 "duplicate (request_id, item_id)": 2, "null user_id": 1}
    splits = report["splits"]
    # the features build reports the validate step's counts of its windows instead of counting again
    summary = json.loads((run / "features" / "summary.json").read_text())
    assert summary["rows_in"] == splits["train"]["rows"] + splits["validation"]["rows"] == 3 * 1000 + 2
    assert summary["quarantined"] == {"watch_time_s < 0": 3, "duplicate (request_id, item_id)": 2, "null user_id": 1}
    assert sum(summary["rows"].values()) == summary["rows_in"] - 6
    # and evaluate scored the holdout's good rows
    state = json.loads((run / "state.json").read_text())
    assert state["steps"]["evaluate"]["holdout_rows"] == splits["holdout"]["rows"] - 2 == 998
    client = MlflowClient(str(cfg.tracking_uri), str(cfg.tracking_uri))
    parent = client.get_run(done.parent_run_id or "")
    steps = [r.info.run_name for r in client.search_runs(
        [parent.info.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'")]
    assert steps.count("validate") == 1 and steps.count("features") == 2  # the failed attempt and the resumed one


def test_too_many_bad_rows_fail_the_validate_step_with_the_one_threshold(tmp_path: Path) -> None:
    landing = _corrupt_landing(tmp_path)
    spec = tmp_path / "spec.yaml"
    text = (Path(features.build.__file__).parent / "specs" / "synthetic.yaml").read_text()
    spec.write_text(text.replace("max_bad_fraction: 0.5", "max_bad_fraction: 0.001"))
    cfg = load_pipeline_config(write_config(tmp_path, source={"path": str(landing), "synthesize": {}},
                                            spec=str(spec)))
    with pytest.raises(ValueError, match=r"^8 of 4002 rows \(0\.2%\) are quarantined, more than max_bad_fraction 0%"):
        run_pipeline(cfg, as_of=AS_OF)
    state = json.loads((cfg.workdir / "runs" / AS_OF.isoformat() / "state.json").read_text())
    assert list(state["steps"]) == ["ingest"] and state["status"] == "failed"
