"""Dataset adapters: every dataset, synthetic included, through one registry and one partition interface."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from features.build import day_expr, scan_log
from features.datasets import ADAPTERS, Partitions, scan_dataset, scan_partitions, synthetic
from features.spec import FeatureSpec, load_spec


def test_synthetic_is_an_adapter_like_the_others(small_log: Path) -> None:
    assert ADAPTERS["synthetic"] is synthetic.scan
    assert_frame_equal(scan_dataset("synthetic", small_log).collect(), scan_log(small_log).collect())
    one = next(small_log.rglob("*.parquet"))  # a single file is a log too
    assert_frame_equal(synthetic.scan(one).collect(), pl.read_parquet(one))


def test_synthetic_partitions_hold_the_rows_of_the_old_scan_log_path(small_log: Path, spec: FeatureSpec) -> None:
    """What the pipeline's lake read before (scan_log, then a filter per day) is what the adapter gives by day."""
    old = scan_log(small_log)
    day = day_expr(spec)
    assert day is not None
    parts = scan_partitions("synthetic", small_log, spec)
    old_days = sorted(old.select(day.unique()).collect().to_series().to_list())
    assert parts.days() == old_days == [date(2026, 1, 1), date(2026, 1, 2), date(2026, 1, 3)]
    for d in old_days:
        assert_frame_equal(parts.on(d).collect(), old.filter(day == d).collect())
    assert sum(parts.on(d).select(pl.len()).collect().item() for d in old_days) == old.select(pl.len()).collect().item()


def test_partitions_by_a_date_column_and_rows_without_a_day() -> None:
    rows = pl.LazyFrame({"date": [date(2022, 4, 26), None, date(2022, 4, 25), date(2022, 4, 26)], "x": [1, 2, 3, 4]})
    parts = Partitions(rows, pl.col("date"))
    assert parts.days() == [date(2022, 4, 25), date(2022, 4, 26)]  # the row without a day is in none
    assert parts.on(date(2022, 4, 26)).collect()["x"].to_list() == [1, 4]


def test_an_unknown_dataset_is_named_before_any_file_is_read(tmp_path: Path, spec: FeatureSpec) -> None:
    known = r"\['census', 'kuairand', 'synthetic'\]"
    with pytest.raises(ValueError, match=rf"^unknown dataset 'movielens'; known: {known}$"):
        scan_partitions("movielens", tmp_path / "nowhere", spec)
    with pytest.raises(ValueError, match=rf"^unknown dataset 'movielens'; known: {known}$"):
        scan_dataset("movielens", tmp_path / "nowhere")


def test_a_dataset_without_days_has_no_partitions(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^dataset 'census' has no date column or timestamp key: its rows have no"):
        scan_partitions("census", tmp_path, load_spec("census"))


def test_a_missing_synthetic_log_is_named(tmp_path: Path, spec: FeatureSpec) -> None:
    with pytest.raises(ValueError, match="input not found: .*missing.parquet"):
        scan_partitions("synthetic", tmp_path / "missing.parquet", spec)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no Parquet files under input folder"):
        scan_partitions("synthetic", tmp_path / "empty", spec)


def test_a_build_from_the_adapters_parts_equals_one_from_the_path(small_log: Path, spec: FeatureSpec,
                                                                   tmp_path: Path) -> None:
    """`ranker features build` reads every dataset through its adapter: the synthetic log's parts (one per
    file, checked one at a time) give the build a path gives, transform and rows alike."""
    from features.build import build
    from features.datasets import scan_parts

    parts = scan_parts("synthetic", small_log)
    assert len(parts) == len(list(small_log.rglob("*.parquet"))) > 1
    a = build(small_log, spec, tmp_path / "path")
    b = build(parts, spec, tmp_path / "parts")
    assert (a.transform_hash, a.rows, a.quarantined) == (b.transform_hash, b.rows, b.quarantined)
    for split in a.rows:
        assert pl.read_parquet(tmp_path / "path" / f"{split}.parquet").equals(
            pl.read_parquet(tmp_path / "parts" / f"{split}.parquet"))
    with pytest.raises(ValueError, match="unknown dataset 'movielens'"):
        scan_parts("movielens", small_log)
