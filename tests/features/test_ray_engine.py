"""The Ray Data engine of the feature build gives what the Polars engine gives: the same transform
(content hash included), the same model-ready rows in the same order, the same quarantine and summary.

One local Ray (2 CPUs) serves the module; a Ray that cannot start fails the tests. The first tests
need no Ray: they pin the two properties the equality rests on (fit statistics that do not depend
on the blocking, quantile cut points selected exactly).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features.build import build
from features.datasets import scan_parts
from features.fitted import FitPartial, FittedTransform, raw_input_types
from features.quantiles import cut_points, digit_counts, quantile_ranks, select_ranks
from features.ray_data import build as ray_build
from features.ray_data import ray_log
from features.spec import FeatureSpec, load_spec, parse_spec
from features.validate import REASON, CheckCounts

# Ray Data's own DataContext() sets three of its deprecated fields when it is first created (Ray 2.60);
# nothing here sets them.
pytestmark = [
    pytest.mark.filterwarnings(f"ignore:`{field}` is deprecated:DeprecationWarning:ray.data.context")
    for field in ("use_push_based_shuffle", "use_polars", "use_arrow_tensor_v2")
]
RANKER = str(Path(sys.executable).parent / "ranker")
OUTPUTS = ("train", "val", "test", "quarantine")
# Id rules beyond plain vocabularies, so that every fitted part is compared: quantile cut points
# (floats with nulls, ints with ties), a cross with min_count, hashing.
EXTRA = [
    {"name": "duration_q", "source": "item", "column": "duration_s", "quantiles": 7},
    {"name": "position_q", "source": "item", "column": "position", "quantiles": 4},
    {"name": "device_x_category", "source": "item", "cross": ["device", "category"], "min_count": 3},
    {"name": "item_hashed", "source": "item", "column": "item_id", "hash_buckets": 100},
]


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """One local Ray for the module (its GCS address, for the CLI to join), shut down at the end."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield str(ray.get_runtime_context().gcs_address)
    ray.shutdown()


@pytest.fixture(scope="module")
def rich_spec(spec: FeatureSpec) -> FeatureSpec:
    data = spec.model_dump(mode="json")
    data["sparse"] = [{**data["sparse"][0], "min_count": 2}, *data["sparse"][1:], *EXTRA]
    return parse_spec(data)


@pytest.fixture(scope="module")
def bad_log(small_log: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small log with rows broken in known ways in each of its 3 day files.

    Per file: one negative watch time, one null user, one click of 2, one null duration (not a
    rule: a null dense value); copies of rows 20 and 21 with click 0 placed before them, so the
    copies are the first occurrences kept and the originals the duplicates; and the first row of
    the next day's file, whose key repeats in another file only (not a duplicate: the check is per file).
    Plus an empty file (a block without rows or columns in Ray).
    """
    out = tmp_path_factory.mktemp("bad_log")
    files = sorted(small_log.rglob("*.parquet"))
    for i, f in enumerate(files):
        n = pl.int_range(pl.len())
        day = pl.read_parquet(f).with_columns(
            pl.when(n == 3).then(-5.0).otherwise(pl.col("watch_time_s")).alias("watch_time_s"),
            pl.when(n == 7).then(None).otherwise(pl.col("user_id")).alias("user_id"),
            pl.when(n == 11).then(2).otherwise(pl.col("click")).cast(pl.Int8).alias("click"),
            pl.when(n == 13).then(None).otherwise(pl.col("duration_s")).alias("duration_s"),
        )
        copies = day.slice(20, 2).with_columns(pl.lit(0, pl.Int8).alias("click"))
        other = pl.read_parquet(files[(i + 1) % len(files)]).slice(0, 1)
        target = out / f.parent.name / "part-0.parquet"
        target.parent.mkdir()
        pl.concat([day.slice(0, 5), copies, day.slice(5), other]).write_parquet(target, row_group_size=700)
    (out / "date=2026-01-09").mkdir()
    pl.read_parquet(files[0]).head(0).write_parquet(out / "date=2026-01-09" / "part-0.parquet")
    return out


@pytest.fixture(scope="module")
def raw_frame(small_log: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted(small_log.rglob("*.parquet"))[0])


def _assert_same_build(polars_out: Path, ray_out: Path) -> None:
    """Same transform.json and summary.json, and every Parquet output equal row for row, in order."""
    for name in ("transform.json", "summary.json"):
        assert json.loads((ray_out / name).read_text()) == json.loads((polars_out / name).read_text()), name
    for name in OUTPUTS:
        assert (ray_out / f"{name}.parquet").is_file() == (polars_out / f"{name}.parquet").is_file(), name
        if not (polars_out / f"{name}.parquet").is_file():
            continue
        expected, got = pl.read_parquet(polars_out / f"{name}.parquet"), pl.read_parquet(ray_out / f"{name}.parquet")
        assert got.schema == expected.schema, name
        assert got.sort(got.columns).equals(expected.sort(expected.columns)), name  # the same rows ...
        assert got.equals(expected), name  # ... in the same order
    assert not (ray_out / "_ray_parts").exists()


# ------------------------------------------------------------------------ without Ray: the properties


def test_import_of_the_engines_does_not_import_ray() -> None:
    code = "import sys, features.build, features.ray_data; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_fit_statistics_do_not_depend_on_the_blocking(raw_frame: pl.DataFrame, rich_spec: FeatureSpec) -> None:
    """Merged per-block statistics give the transform (hash included) of one pass over all rows,
    and mean/std are the exactly rounded values, which Polars' own float sums need not be."""
    from fractions import Fraction

    whole = FittedTransform.fit(raw_frame.lazy(), rich_spec)
    types = raw_input_types(raw_frame.schema, rich_spec)
    rng = random.Random(3)
    for _ in range(3):
        cuts = sorted(rng.sample(range(1, raw_frame.height), 6))
        blocks = [raw_frame[a:b] for a, b in zip([0, *cuts], [*cuts, raw_frame.height], strict=True)]
        merged = FitPartial.merge([FitPartial.of(b.lazy(), rich_spec) for b in reversed(blocks)])
        again = FittedTransform.from_partial(merged, rich_spec, types, whole.boundaries)
        assert again.to_dict() == whole.to_dict()
    x = [Fraction(v) for v in raw_frame["duration_s"].cast(pl.Float64).log1p().drop_nulls().to_list()]
    mean = sum(x) / len(x)
    var = sum((v - mean) ** 2 for v in x) / (len(x) - 1)
    assert whole.numeric["duration_s"].mean == float(mean)
    assert whole.numeric["duration_s"].std == math.sqrt(float(var))


def test_radix_selection_equals_polars_quantiles() -> None:
    """The values at Polars' "nearest" ranks, selected per block, are Polars' quantiles: ties,
    nulls, NaN (sorted last), both zeros, negatives, integers; any blocking."""
    rng = np.random.default_rng(11)
    columns = {
        "ties": pl.Series(rng.integers(0, 6, 3000)),
        "floats": pl.Series(np.concatenate([rng.normal(0, 1e3, 2990), [np.nan] * 5, [-0.0, 0.0, -1e-300, 1e300, 7.0]])),
        "nulls": pl.Series(rng.normal(size=3000)).set(pl.Series(rng.random(3000) < 0.3), None),
    }
    frame = pl.DataFrame(columns).sample(fraction=1.0, shuffle=True, seed=2)
    blocks = [frame[i : i + 409] for i in range(0, frame.height, 409)]
    for name in columns:
        for quantiles in (2, 3, 7, 10):
            x = pl.col(name).cast(pl.Float64)
            qs = [x.quantile(i / quantiles).alias(str(i)) for i in range(1, quantiles)]
            expected = cut_points(list(frame.select(qs).row(0)))
            n = int(frame[name].is_not_null().sum())

            def count(prefixes: dict[str, list[int]], round_: int) -> dict[str, pl.DataFrame]:
                return {c: pl.concat([digit_counts(b, c, p, round_) for b in blocks]) for c, p in prefixes.items()}

            got = select_ranks({name: quantile_ranks(n, quantiles)}, count)[name]
            assert cut_points(got) == expected, (name, quantiles)


# ------------------------------------------------------------------------ on Ray


def test_same_transform_and_rows_as_polars_on_the_synthetic_log(
    ray_address: str, small_log: Path, spec: FeatureSpec, small_features: Path, tmp_path: Path
) -> None:
    timings: dict[str, float] = {}
    summary = ray_build(small_log, spec, tmp_path, timings=timings)
    assert summary.transform_hash == json.loads((small_features / "summary.json").read_text())["transform_hash"]
    _assert_same_build(small_features, tmp_path)
    assert {"read_check", "fit", "transform_write", "join"} <= set(timings)


def test_quarantine_and_every_id_rule_as_polars(
    ray_address: str, bad_log: Path, rich_spec: FeatureSpec, tmp_path: Path
) -> None:
    expected = build(scan_parts("synthetic", bad_log), rich_spec, tmp_path / "polars")
    got = ray_build(ray_log("synthetic", bad_log), rich_spec, tmp_path / "ray")
    assert got.quarantined == expected.quarantined == {
        "duplicate (request_id, item_id)": 6, "click not in {0, 1}": 3, "null user_id": 3, "watch_time_s < 0": 3}
    assert got.rows_in == expected.rows_in == 3 * (2000 + 3)
    _assert_same_build(tmp_path / "polars", tmp_path / "ray")
    # the first occurrence of a key in its file is kept: the copies placed first (click 0), not the originals
    quarantine = pl.read_parquet(tmp_path / "ray" / "quarantine.parquet")
    duplicates = quarantine.filter(pl.col(REASON).str.starts_with("duplicate"))
    assert duplicates.height == 6 and duplicates["click"].sum() > 0
    boundaries = FittedTransform.load(tmp_path / "ray" / "transform.json").boundaries
    assert len(boundaries["duration_q"]) == 6  # 7 buckets of distinct floats
    assert len(boundaries["position_q"]) == 3 and all(b.is_integer() for b in boundaries["position_q"])


def test_rows_that_come_checked_as_polars(ray_address: str, bad_log: Path, spec: FeatureSpec, tmp_path: Path) -> None:
    """The pipeline's path: rows checked upstream are not checked again; no quarantine, the given counts."""
    counts = CheckCounts(6009, {"null user_id": 3})
    good = tmp_path / "good" / "part-0.parquet"
    good.parent.mkdir()
    pl.read_parquet(sorted(bad_log.rglob("*.parquet"))).filter(pl.col("user_id").is_not_null()).write_parquet(good)
    for engine, out in (("polars", tmp_path / "polars"), ("ray", tmp_path / "ray")):
        out.mkdir()
        (out / "quarantine.parquet").write_text("an earlier build's")
        run = ray_build if engine == "ray" else build
        summary = run(good.parent, spec, out, checked=counts)
        assert (summary.rows_in, summary.quarantined) == (6009, {"null user_id": 3}), engine
    _assert_same_build(tmp_path / "polars", tmp_path / "ray")


def test_kuairand_through_its_adapter_as_polars(ray_address: str, kuairand_data: Path, tmp_path: Path) -> None:
    spec = load_spec("kuairand")
    expected = build(scan_parts("kuairand", kuairand_data), spec, tmp_path / "polars")
    got = ray_build(ray_log("kuairand", kuairand_data), spec, tmp_path / "ray")
    assert got.rows == expected.rows == {"train": 154_071, "val": 17_600, "test": 56_658}
    _assert_same_build(tmp_path / "polars", tmp_path / "ray")


def test_a_block_that_is_not_one_file_stops_the_build(tmp_path: Path, small_log: Path) -> None:
    from features.ray_data import _check_one_block_per_file

    files = tuple(str(f) for f in sorted(small_log.rglob("*.parquet")))
    _check_one_block_per_file(files, [2000, 2000, 2000])
    with pytest.raises(ValueError, match=r"not one block per file: duplicate keys \(validation.unique\)"):
        _check_one_block_per_file(files, [3000, 3000])


# ------------------------------------------------------------------------ the CLI


def test_cli_builds_with_ray_as_polars(ray_address: str, small_log: Path, small_features: Path, tmp_path: Path) -> None:
    """``ranker features build --engine ray`` on the module's Ray: the Polars build, and nothing on stderr."""
    r = subprocess.run([RANKER, "features", "build", "--engine", "ray", "--ray-address", ray_address,
                        "--input", str(small_log), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    expected = json.loads((small_features / "summary.json").read_text())["transform_hash"]
    assert f"fitted transform {expected} ->" in r.stdout
    _assert_same_build(small_features, tmp_path)


def test_cli_engine_errors_are_one_line(small_log: Path, tmp_path: Path) -> None:
    """An unknown engine, a missing Ray install and an input the Ray engine cannot read: one line each."""

    def ranker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([RANKER, "features", "build", "--out", str(tmp_path / "out"), *args],
                              capture_output=True, text=True, timeout=120, env=env)

    r = ranker("--input", str(small_log), "--engine", "spark")
    assert (r.returncode, r.stderr) == (2, "error: --engine must be polars or ray, got 'spark'\n")
    hidden = tmp_path / "no_ray" / "ray"  # a `ray` that fails to import, as when it is not installed
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    r = ranker("--input", str(small_log), "--engine", "ray", env={**os.environ, "PYTHONPATH": str(hidden.parent)})
    assert (r.returncode, r.stderr) == (2, "error: --engine ray needs Ray Data, which is not installed "
                                           "(No module named 'ray'): pip install -e .[ray]\n")
    census = tmp_path / "census"  # CSV only, as census-income comes
    census.mkdir()
    (census / "census-income.data").write_text("")
    r = ranker("--input", str(census), "--engine", "ray", "--dataset", "census")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: no Parquet files under input folder") and "needs --engine polars" in r.stderr
    assert not (tmp_path / "out").exists()
