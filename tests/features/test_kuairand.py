"""KuaiRand-Pure: the adapter's raw rows, then the full build against the peer protocol's tables.

Every figure asserted here is quoted from ``shared/peers/RESULTS-KUAIRAND-2026-11-22.md`` section 1.
The data is the repository's sibling ``shared/data/kuairand_pure_subset`` (CI has it).
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
from datetime import date
from pathlib import Path

import polars as pl
import pytest

from features.build import BuildSummary, build
from features.datasets import ADAPTERS, scan_dataset
from features.datasets.kuairand import scan
from features.fitted import OOV, FittedTransform
from features.spec import FeatureSpec, load_spec

LOG = "log_standard_20220425_to_20220508.parquet"
USER = "user_features_pure.csv.gz"
VIDEO = "video_features_basic_pure.csv.gz"
TASKS = ("is_click", "long_view", "is_like")
NEVER_INPUTS = {"play_time_ms", "profile_stay_time", "comment_stay_time", "time_ms", "date", "duration_ms",
                "upload_dt", "visible_status", "server_width", "server_height", "music_id", "tag"}  # fmt: skip


@pytest.fixture(scope="module")
def data(kuairand_data: Path) -> Path:
    return kuairand_data


@pytest.fixture(scope="module")
def kuai_spec() -> FeatureSpec:
    return load_spec("kuairand")


@pytest.fixture(scope="module")
def raw(data: Path) -> pl.DataFrame:
    return scan(data).collect()


def _value(df: pl.DataFrame, expr: pl.Expr) -> float:
    """One aggregate of a frame as a float (typed, unlike ``Series.mean``)."""
    return float(df.select(expr).item())


# ------------------------------------------------------------------------------------------ adapter


def test_rows_keep_log_order(raw: pl.DataFrame, data: Path) -> None:
    log = pl.read_parquet(data / LOG, columns=["user_id", "video_id", "time_ms"])
    assert raw.height == 228_329
    assert raw["user_id"].to_list() == log["user_id"].cast(pl.String).to_list()
    assert (raw["time_ms"] == log["time_ms"]).all()
    assert raw["time_ms"].is_sorted()


def test_columns_and_types(raw: pl.DataFrame, kuai_spec: FeatureSpec) -> None:
    schema = raw.schema
    assert schema["date"] == pl.Date
    assert schema["ts"] == pl.Datetime("us")
    for c in TASKS:
        assert schema[c].is_integer(), c
        assert set(raw[c].unique().to_list()) == {0, 1}, c
    for f in kuai_spec.sparse:
        assert schema[f.raw] == pl.String, f.raw
        assert raw[f.raw].null_count() == 0, f.raw  # missing -> "" everywhere
    for d in kuai_spec.dense:
        assert schema[d.raw] == pl.Float64, d.raw
    for c in ("user_id", "video_id"):
        assert schema[c] == pl.String
    assert (raw["date"].min(), raw["date"].max()) == (date(2022, 4, 25), date(2022, 5, 8))
    assert (raw["ts"].dt.epoch("ms") == raw["time_ms"]).all()


def test_tokens_follow_the_protocol(raw: pl.DataFrame, data: Path) -> None:
    first = raw.row(0, named=True)
    # log ints as decimal strings, hour = hourmin // 100, side-table raw CSV text
    assert (first["user_id"], first["video_id"], first["tab"], first["hour"]) == ("712", "5239", "1", "0")
    side = ("music_type", "follow_user_num_range", "onehot_feat4", "onehot_feat9", "onehot_feat12")
    assert [first[c] for c in side] == ["9.0", "(150,250]", "2.0", "1", "1.0"]  # the CSV's text, not re-formatted
    assert (raw["hour"] == (raw["hourmin"] // 100).cast(pl.String)).all()
    assert set(raw["hour"].unique().to_list()) == {str(h) for h in range(24)}
    # every log row found its user and its video (no "" in always-present side columns)
    assert (raw["user_active_degree"] != "").all() and (raw["author_id"] != "").all()
    # missing side values become the "" token; the user table misses onehot_feat14..17 for 714 users
    users = pl.read_csv(data / USER, infer_schema=False)
    missing = set(users.filter(pl.col("onehot_feat17").is_null())["user_id"].to_list())
    empty = raw.filter(pl.col("onehot_feat17") == "")
    assert empty.height and set(empty["user_id"].unique().to_list()) <= missing
    assert (raw["music_type"] == "").any()


def test_video_duration_missing_exactly_where_duration_ms_is_zero(raw: pl.DataFrame) -> None:
    assert (raw["video_duration"].is_null() == (raw["duration_ms"] == 0)).all()
    present = raw.filter(pl.col("video_duration").is_not_null())
    assert (present["video_duration"] == present["duration_ms"].cast(pl.Float64)).all()


def test_spec_never_uses_post_impression_or_leaky_columns(kuai_spec: FeatureSpec) -> None:
    inputs = {f.raw for f in kuai_spec.sparse} | {d.raw for d in kuai_spec.dense}
    assert len(kuai_spec.sparse) == 31 and len(kuai_spec.dense) == 5
    assert not inputs & NEVER_INPUTS
    assert not [c for c in inputs if c.startswith("is_")]
    assert sum(f.embedding_dim for f in kuai_spec.sparse) + len(kuai_spec.dense) == 501
    assert all(f.vocab_order == "sorted" and f.embedding_dim == 16 for f in kuai_spec.sparse)
    assert [t.name for t in kuai_spec.tasks] == list(TASKS)
    assert [t.group for t in kuai_spec.tasks] == ["engagement", "engagement", "satisfaction"]
    assert kuai_spec.position is None and kuai_spec.validation.unique == ()


def test_registry_and_statistic_table_never_read(data: Path, tmp_path: Path) -> None:
    assert ADAPTERS["kuairand"] is scan
    for name in (LOG, USER, VIDEO):
        (tmp_path / name).symlink_to(data / name)
    (tmp_path / "video_features_statistic_pure.parquet").write_bytes(b"not parquet")  # would fail if read
    assert scan_dataset("kuairand", tmp_path).select(pl.len()).collect().item() == 228_329
    with pytest.raises(ValueError, match=r"unknown dataset 'kuai'; known: \['census', 'kuairand', 'synthetic'\]"):
        scan_dataset("kuai", tmp_path)
    with pytest.raises(ValueError, match="input not found"):  # synthetic goes through features.build.scan_log
        scan_dataset("synthetic", tmp_path / "missing.parquet")


def test_csv_logs_in_several_files_match_parquet(data: Path, tmp_path: Path) -> None:
    head = pl.read_parquet(data / LOG).head(3000)
    head.head(1000).write_csv(tmp_path / "log_standard_a.csv")
    (tmp_path / "log_standard_b.csv.gz").write_bytes(gzip.compress(head.slice(1000, 1000).write_csv().encode()))
    head.slice(2000).write_parquet(tmp_path / "log_standard_c.parquet")
    for name in (USER, VIDEO):
        (tmp_path / name).symlink_to(data / name)
    got = scan(tmp_path).collect()
    want = scan(data).head(3000).collect()
    assert got.equals(want)


def _layout(data: Path, root: Path, skip: str = "") -> Path:
    root.mkdir()
    for name in (LOG, USER, VIDEO):
        if name != skip:
            (root / name).symlink_to(data / name)
    return root


def test_layout_errors_name_the_file_or_column(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="KuaiRand folder not found"):
        scan(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"no standard log in .*log_standard_\*\.parquet"):
        scan(_layout(data, tmp_path / "a", skip=LOG))
    with pytest.raises(ValueError, match=r"missing side table 'user_features_pure\.csv'"):
        scan(_layout(data, tmp_path / "b", skip=USER))
    with pytest.raises(ValueError, match=r"missing side table 'video_features_basic_pure\.csv'"):
        scan(_layout(data, tmp_path / "c", skip=VIDEO))
    root = _layout(data, tmp_path / "d", skip=LOG)
    pl.read_parquet(data / LOG).head(10).drop("tab").write_parquet(root / "log_standard_x.parquet")
    with pytest.raises(ValueError, match=r"'log_standard_x\.parquet' .* lacks column\(s\) \['tab'\]"):
        scan(root)
    root = _layout(data, tmp_path / "e")
    shutil.copy(data / LOG, root / LOG.replace(".parquet", ".csv"))
    with pytest.raises(ValueError, match="is given twice"):
        scan(root)
    root = _layout(data, tmp_path / "f", skip=VIDEO)
    pl.read_csv(data / VIDEO, infer_schema=False).drop("author_id").write_csv(root / "video_features_basic_pure.csv")
    with pytest.raises(ValueError, match=r"'video_features_basic_pure\.csv' .* lacks column\(s\) \['author_id'\]"):
        scan(root)


# ------------------------------------------------------------------- full build vs the protocol tables

VOCAB_SIZES = {
    "user_id": 23_652, "video_id": 5_993, "tab": 16, "hour": 25, "author_id": 5_367, "music_type": 7,
    "video_type": 4, "upload_type": 13, "user_active_degree": 10, "follow_user_num_range": 9,
    "fans_user_num_range": 10, "friend_user_num_range": 8, "register_days_range": 9,
    **{f"onehot_feat{i}": n for i, n in enumerate(
        (3, 8, 50, 1396, 17, 34, 4, 111, 443, 8, 6, 6, 4, 4, 4, 4, 4, 4))},
}  # fmt: skip
ROWS = {"train": 154_071, "val": 17_600, "test": 56_658}
USERS = {"train": 23_651, "val": 9_028, "test": 17_396}
RATES_PCT = {  # positive rates in %, as printed in the protocol (3 significant decimals)
    "train": {"is_click": 44.311, "long_view": 31.167, "is_like": 1.7589},
    "val": {"is_click": 44.477, "long_view": 31.392, "is_like": 1.6250},
    "test": {"is_click": 43.773, "long_view": 30.744, "is_like": 1.6220},
}
LIKE_POSITIVES = {"val": 286, "test": 919}
OOV_ROWS = {  # "–" in the protocol table = 0; every other feature has no OOV rows
    "val": {"user_id": 611, "video_id": 96, "author_id": 67, "onehot_feat3": 8, "onehot_feat8": 1},
    "test": {"user_id": 2_830, "video_id": 578, "author_id": 457, "onehot_feat3": 47, "onehot_feat5": 1,
             "onehot_feat7": 7, "onehot_feat8": 13},
}  # fmt: skip
DENSE_MINMAX = {  # train min/max of x = ln(1 + v)
    "video_duration": (0.0, 13.979091773036885),
    "follow_user_num": (0.0, 8.517992871586802),
    "fans_user_num": (0.0, 14.501758996833063),
    "friend_user_num": (0.0, 8.516392871245468),
    "register_days": (2.70805020110221, 8.195609567288775),
}
GAUC_COVERAGE = {  # users with both classes, % of the split's rows
    "val": {"is_click": (2_201, 44.7), "long_view": (1_931, 39.4), "is_like": (152, 3.0)},
    "test": {"is_click": (7_357, 67.7), "long_view": (6_690, 62.0), "is_like": (556, 6.1)},
}
CONSTANT_RATE_TEST_LOGLOSS = {"is_click": 0.6854, "long_view": 0.6171, "is_like": 0.0830}


@pytest.fixture(scope="module")
def built(data: Path, kuai_spec: FeatureSpec, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BuildSummary]:
    out = tmp_path_factory.mktemp("kuairand_build")
    return out, build(scan(data), kuai_spec, out)


@pytest.fixture(scope="module")
def splits(built: tuple[Path, BuildSummary]) -> dict[str, pl.DataFrame]:
    out, _ = built
    return {s: pl.read_parquet(out / f"{s}.parquet") for s in ROWS}


def test_build_rows_users_and_no_quarantine(built: tuple[Path, BuildSummary], splits: dict[str, pl.DataFrame]) -> None:
    _, summary = built
    assert summary.rows == ROWS
    assert summary.rows_in == 228_329 and summary.quarantined == {}
    assert {s: df["user_id"].n_unique() for s, df in splits.items()} == USERS
    assert summary.windows["val"] == {"start": "2022-05-04", "end": "2022-05-04"}


def test_build_vocab_sizes(built: tuple[Path, BuildSummary]) -> None:
    _, summary = built
    assert summary.vocab_sizes == VOCAB_SIZES


def test_build_label_rates(splits: dict[str, pl.DataFrame]) -> None:
    for split, rates in RATES_PCT.items():
        df = splits[split]
        for task, pct in rates.items():
            digits = 4 if task == "is_like" else 3
            assert round(100 * _value(df, pl.col(f"y_{task}").mean()), digits) == pct, (split, task)
    for split, n in LIKE_POSITIVES.items():
        assert splits[split]["y_is_like"].sum() == n


def test_build_oov_rows(splits: dict[str, pl.DataFrame]) -> None:
    assert not any((splits["train"][c] == OOV).any() for c in splits["train"].columns if c.startswith("s_"))
    for split, expected in OOV_ROWS.items():
        df = splits[split]
        got = {c[2:]: int((df[c] == OOV).sum()) for c in df.columns if c.startswith("s_")}
        assert {k: v for k, v in got.items() if v} == expected, split


def test_build_dense_train_minmax(built: tuple[Path, BuildSummary], splits: dict[str, pl.DataFrame]) -> None:
    out, _ = built
    fitted = FittedTransform.load(out / "transform.json")
    for name, (lo, hi) in DENSE_MINMAX.items():
        st = fitted.numeric[name]
        assert (st.min, st.max) == pytest.approx((lo, hi), rel=1e-12, abs=1e-12), name
        col = pl.col(f"d_{name}")  # (x - min) / (max - min), no clipping
        assert (_value(splits["train"], col.min()), _value(splits["train"], col.max())) == (0.0, 1.0), name


def test_build_gauc_coverage_and_constant_rate_logloss(splits: dict[str, pl.DataFrame]) -> None:
    for split, tasks in GAUC_COVERAGE.items():
        df = splits[split]
        for task, (users, pct) in tasks.items():
            g = (
                df.group_by("user_id")
                .agg(pl.len().alias("n"), pl.col(f"y_{task}").sum().alias("pos"))
                .filter((pl.col("pos") > 0) & (pl.col("pos") < pl.col("n")))
            )
            assert (g.height, round(100 * g["n"].sum() / df.height, 1)) == (users, pct), (split, task)
    for task, ref in CONSTANT_RATE_TEST_LOGLOSS.items():
        p = _value(splits["train"], pl.col(f"y_{task}").mean())
        y = pl.col(f"y_{task}").cast(pl.Float64)
        loss = _value(splits["test"], -(y * math.log(p) + (1 - y) * math.log(1 - p)).mean())
        assert round(loss, 4) == ref, task


def test_build_transform_json_is_fit_on_train_only(built: tuple[Path, BuildSummary]) -> None:
    out, _ = built
    body = json.loads((out / "transform.json").read_text())
    assert body["rows"] == ROWS["train"]
    assert body["vocabs"]["hour"] == sorted(str(h) for h in range(24))  # byte order: "0", "1", "10", ...
