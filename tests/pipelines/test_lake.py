"""The lake: any dataset's source read through its adapter's partitions, one day per file."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from features.build import day_expr, scan_log
from features.spec import FeatureSpec, load_spec
from pipelines import lake
from pipelines.config import load_pipeline_config
from pipelines.pipeline import run_pipeline
from tests.pipelines.conftest import write_config


def test_ingest_of_the_synthetic_source_is_the_old_scan_log_path(tmp_path: Path, small_log: Path,
                                                                 spec: FeatureSpec) -> None:
    cfg = load_pipeline_config(write_config(tmp_path, source={"path": str(small_log), "synthesize": {}}))
    days = lake.source_days(cfg, spec)
    assert days == [date(2026, 1, 1), date(2026, 1, 2), date(2026, 1, 3)]
    got = lake.ingest(cfg, spec, tmp_path / "lake", days)
    assert got.new_days == days and lake.lake_days(tmp_path / "lake") == days
    old = scan_log(small_log)  # what the lake read for synthetic before it went through the adapter
    day = day_expr(spec)
    assert day is not None
    for d in days:
        want = old.filter(day == d).collect()
        assert_frame_equal(pl.read_parquet(lake.partition(tmp_path / "lake", d)), want)
        assert got.rows[d.isoformat()] == want.height
    assert lake.ingest(cfg, spec, tmp_path / "lake", days).new_days == []  # nothing twice


def test_an_unknown_dataset_fails_the_run_before_any_work(tmp_path: Path) -> None:
    cfg = load_pipeline_config(write_config(tmp_path, source={"dataset": "movielens", "synthesize": {}},
                                            spec="synthetic"))
    with pytest.raises(ValueError, match=r"^unknown dataset 'movielens'; known: \['census', 'kuairand', 'synthetic'\]"):
        run_pipeline(cfg)
    assert not (cfg.workdir / "lake").exists() and not (cfg.workdir / "runs").exists()


def test_a_source_without_days_is_refused(tmp_path: Path) -> None:
    cfg = load_pipeline_config(write_config(tmp_path, source={"dataset": "census", "synthesize": {}}))
    with pytest.raises(ValueError, match="dataset 'census' has no date column or timestamp key"):
        lake.source_days(cfg, load_spec("census"))
