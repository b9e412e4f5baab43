"""Build: validation and quarantine, split kinds, fitting on training rows only."""

from datetime import date
from pathlib import Path

import polars as pl
import pytest

from features.build import build
from features.spec import FeatureSpec
from features.synthetic import SynthConfig, generate_day

CFG = SynthConfig(days=3, users=50, items=300, requests_per_day=40, slate_size=5, seed=1)


@pytest.fixture(scope="module")
def raw() -> pl.DataFrame:
    return pl.concat([generate_day(CFG, d) for d in range(CFG.days)])


def _corrupt(raw: pl.DataFrame) -> pl.DataFrame:
    """Break a few rows in known ways."""
    i = pl.int_range(pl.len())
    return raw.with_columns(
        pl.when(i == 3).then(-5.0).otherwise(pl.col("watch_time_s")).alias("watch_time_s"),
        pl.when(i == 4).then(None).otherwise(pl.col("user_id")).alias("user_id"),
        pl.when(i == 5).then(2).otherwise(pl.col("click")).cast(pl.Int8).alias("click"),
    ).vstack(raw.slice(10, 2))  # two duplicate impressions


def test_quarantine_counts_and_keeps_rows(raw: pl.DataFrame, spec: FeatureSpec, tmp_path: Path) -> None:
    bad = _corrupt(raw)
    s = build(bad.lazy(), spec, tmp_path)
    assert s.quarantined == {"watch_time_s < 0": 1, "null user_id": 1, "click not in {0, 1}": 1,
                             "duplicate (request_id, item_id)": 2}
    assert s.rows_in == bad.height
    assert sum(s.rows.values()) + sum(s.quarantined.values()) == bad.height  # nothing lost
    q = pl.read_parquet(tmp_path / "quarantine.parquet")
    assert q.height == 5 and "quarantine_reason" in q.columns


def test_mostly_bad_input_fails_clearly(raw: pl.DataFrame, spec: FeatureSpec, tmp_path: Path) -> None:
    bad = raw.with_columns(pl.lit(7).cast(pl.Int8).alias("like"))
    with pytest.raises(ValueError, match=r"break the 'synthetic' spec.*like not in \{0, 1\}"):
        build(bad.lazy(), spec, tmp_path)


def test_train_end_override_and_dates_split(raw: pl.DataFrame, spec: FeatureSpec, tmp_path: Path) -> None:
    s = build(raw.lazy(), spec, tmp_path / "a", train_end=date(2026, 1, 1))
    assert s.rows == {"train": 200, "val": 400}
    dates = spec.split.model_copy(update={"kind": "dates", "train_end": date(2026, 1, 1),
                                          "val_end": date(2026, 1, 2)})
    s = build(raw.lazy(), spec.model_copy(update={"split": dates}), tmp_path / "b")
    assert s.rows == {"train": 200, "val": 200, "test": 200}
    assert s.windows["test"] == {"start": "2026-01-03", "end": "2026-01-03"}
    with pytest.raises(ValueError, match="leaves no training or no validation days"):
        build(raw.lazy(), spec, tmp_path / "c", train_end=date(2026, 1, 3))


def test_rows_that_come_checked_are_not_checked_again(raw: pl.DataFrame, spec: FeatureSpec, tmp_path: Path) -> None:
    """The pipeline's validate step checks once; a build of its good rows writes no quarantine and keeps its counts."""
    from features.validate import REASON, CheckCounts, with_reason

    bad = _corrupt(raw)
    reasons = with_reason(bad.lazy(), spec)
    good = reasons.filter(pl.col(REASON).is_null()).drop(REASON)
    counts = CheckCounts.of(reasons.group_by(REASON).len().collect())
    (tmp_path / "quarantine.parquet").write_text("an earlier build's")
    s = build(good, spec, tmp_path, checked=counts)
    assert not (tmp_path / "quarantine.parquet").exists()
    assert (s.rows_in, s.quarantined) == (bad.height, counts.quarantined)
    assert s.quarantined == {"duplicate (request_id, item_id)": 2, "click not in {0, 1}": 1, "null user_id": 1,
                             "watch_time_s < 0": 1}  # most frequent first, ties by name
    assert sum(s.rows.values()) == good.select(pl.len()).collect().item() == raw.height - 3
    # the same build checking by itself: the same rows, labels and vocabularies, and its own quarantine
    own = build(bad.lazy(), spec, tmp_path / "own")
    assert (own.rows, own.rows_in, own.quarantined, own.label_rates, own.vocab_sizes) == (
        s.rows, s.rows_in, s.quarantined, s.label_rates, s.vocab_sizes)
    assert pl.read_parquet(tmp_path / "own" / "quarantine.parquet").height == 5
    # nothing is checked: a row the spec rejects passes through (the caller vouched for the rows)
    unchecked = build(bad.lazy(), spec, tmp_path / "trusted", checked=CheckCounts(bad.height, {}))
    assert sum(unchecked.rows.values()) == bad.height and unchecked.quarantined == {}
