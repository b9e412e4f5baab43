"""KuaiRand-Pure adapter: the official files -> one lazy frame of joined raw impressions.

Implements the data part of the peer protocol (``shared/peers/RESULTS-KUAIRAND-2026-11-22.md``
section 1, ``shared/peers/prep_kuairand.py``) so that a spec over this frame reproduces the
peers' tokens, vocabularies and splits to the letter:

* rows: every row of the ``log_standard_*`` logs, files in name order, rows in file order (the
  official logs are sorted by ``time_ms, user_id, video_id``); nothing is filtered or deduplicated;
* join: the user table on ``user_id`` and the basic video table on ``video_id`` (left joins that
  keep the log's order); both CSVs are read with every column as a string;
* tokens: ``user_id``, ``video_id``, ``tab`` and ``hour = hourmin // 100`` as decimal strings; every
  other side-table column as its raw CSV text (``"9.0"``, ``"(0,10]"``); missing -> ``""``;
* dense raw columns (``video_duration``, ``follow_user_num``, ``fans_user_num``,
  ``friend_user_num``, ``register_days``) as Float64, missing stays null (the spec fills it);
* ``date``: the log's yyyymmdd as a polars ``Date`` (the split column); ``ts``: ``time_ms`` as a
  Datetime (UTC, ms); the other log columns (labels such as ``is_click``, ``long_view``,
  ``is_like``, and post-impression signals) stay Int64 and are for labels only.

``video_features_statistic_pure.*`` is never read: its counters span the whole collection period
and would leak the future.

Example:
    >>> data = "path/to/kuairand_pure_subset"  # the dataset's official files
    >>> scan(data).select("user_id", "video_id", "hour", "date").head(1).collect().rows()  # doctest: +SKIP
    [("712", "5239", "0", datetime.date(2022, 4, 25))]
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

USER_FILE = "user_features_pure.csv"
VIDEO_FILE = "video_features_basic_pure.csv"
LOG_GLOBS = ("log_standard_*.parquet", "log_standard_*.csv", "log_standard_*.csv.gz")

# The 19 columns of the official standard log, all integers.
LOG_COLUMNS = (
    "user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow", "is_comment",
    "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms", "profile_stay_time",
    "comment_stay_time", "is_profile_enter", "is_rand", "tab",
)  # fmt: skip
LOG_REQUIRED = ("user_id", "video_id", "date", "hourmin", "time_ms", "tab", "is_click", "long_view", "is_like")
LOG_TOKENS = ("user_id", "video_id", "tab")  # log integers used as tokens (decimal strings)

USER_REQUIRED = (
    "user_id", "user_active_degree", "follow_user_num", "follow_user_num_range", "fans_user_num",
    "fans_user_num_range", "friend_user_num", "friend_user_num_range", "register_days", "register_days_range",
    *(f"onehot_feat{i}" for i in range(18)),
)  # fmt: skip
VIDEO_REQUIRED = ("video_id", "author_id", "video_type", "upload_type", "video_duration", "music_type")
DENSE = ("video_duration", "follow_user_num", "fans_user_num", "friend_user_num", "register_days")


def scan(path: str | Path) -> pl.LazyFrame:
    """Scan a KuaiRand-Pure folder into joined raw impressions (one row per log row, file order).

    Args:
        path: folder with ``log_standard_*.{parquet,csv,csv.gz}`` (one or more),
            ``user_features_pure.csv[.gz]`` and ``video_features_basic_pure.csv[.gz]``.

    Returns:
        A lazy frame: the log's columns (token columns as strings, ``date`` as Date, the rest
        Int64), ``hour`` (string), ``ts`` (Datetime), then every user and basic video column
        (strings, ``""`` where missing; the five dense columns as Float64, null where missing).

    Raises:
        ValueError: the folder, a file or a required column is missing, or a log is given twice.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"KuaiRand folder not found: {str(root)!r}")
    log = pl.concat([_scan_log(f) for f in log_files(root)], how="diagonal")
    return join_sides(log, *side_tables(root))


def join_sides(log: pl.LazyFrame, user: pl.LazyFrame, video: pl.LazyFrame) -> pl.LazyFrame:
    """Log rows (:func:`log_columns`) joined with the side tables and tokenised: what :func:`scan` returns.

    Row by row (left joins in the log's order), so applying it to each block of the log gives the
    rows :func:`scan` gives (the Ray engine does, with the small side tables sent to every block).
    """
    return (
        log.join(user, on="user_id", how="left", maintain_order="left")
        .join(video, on="video_id", how="left", maintain_order="left")
        .pipe(_tokens)
    )


def side_tables(root: Path) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """The user and basic video tables of a KuaiRand folder (every column a string, keys Int64)."""
    return _scan_side(root, USER_FILE, USER_REQUIRED), _scan_side(root, VIDEO_FILE, VIDEO_REQUIRED)


def log_files(root: Path) -> list[Path]:
    """The folder's standard logs, in name order (each given once, as Parquet, CSV or gzipped CSV)."""
    files = sorted({f for g in LOG_GLOBS for f in root.glob(g)}, key=lambda f: f.name)
    if not files:
        raise ValueError(f"no standard log in {str(root)!r}; expected files matching {list(LOG_GLOBS)}")
    stems: dict[str, Path] = {}
    for f in files:
        stem = f.name.removesuffix(".gz").removesuffix(".csv").removesuffix(".parquet")
        if stem in stems:
            raise ValueError(f"log {stem!r} is given twice: {stems[stem].name!r} and {f.name!r}")
        stems[stem] = f
    return files


def _scan_log(file: Path) -> pl.LazyFrame:
    """One log file with its official columns as Int64 (CSV text is parsed strictly)."""
    lf = pl.scan_parquet(file) if file.suffix == ".parquet" else pl.scan_csv(file, infer_schema=False)
    require_log_columns(file, lf.collect_schema().names())
    return log_columns(lf)


def require_log_columns(file: Path, names: list[str]) -> None:
    """Fail when a log file lacks a column the protocol needs."""
    _require(file, names, LOG_REQUIRED)


def log_columns(lf: pl.LazyFrame) -> pl.LazyFrame:
    """A log's official columns (those it has) as Int64, in the official order."""
    names = lf.collect_schema().names()
    return lf.select(pl.col(c).cast(pl.Int64) for c in LOG_COLUMNS if c in names)


def _scan_side(root: Path, name: str, required: tuple[str, ...]) -> pl.LazyFrame:
    """A side table, every column a string; its key (first required column) as Int64 for the join."""
    found = [f for f in (root / name, root / f"{name}.gz") if f.is_file()]
    if not found:
        raise ValueError(f"missing side table {name!r} (or {name + '.gz'!r}) in {str(root)!r}")
    if len(found) > 1:
        raise ValueError(f"side table {name!r} is given twice in {str(root)!r}: plain and gzip")
    lf = pl.scan_csv(found[0], infer_schema=False)
    _require(found[0], lf.collect_schema().names(), required)
    return lf.with_columns(pl.col(required[0]).cast(pl.Int64))


def _tokens(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Joined rows -> protocol tokens, dense floats, a Date split column and a timestamp."""
    schema = lf.collect_schema()
    side = [c for c, t in schema.items() if t == pl.String and c not in DENSE]
    return lf.with_columns(
        *(pl.col(c).cast(pl.String) for c in LOG_TOKENS),
        *(pl.col(c).fill_null("") for c in side),
        *(pl.col(c).cast(pl.Float64) for c in DENSE),
        (pl.col("hourmin") // 100).cast(pl.String).alias("hour"),
        pl.col("date").cast(pl.String).str.to_date("%Y%m%d"),
        pl.from_epoch("time_ms", time_unit="ms").alias("ts"),
    )


def _require(file: Path, names: list[str], required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(f"{file.name!r} in {str(file.parent)!r} lacks column(s) {missing}")
