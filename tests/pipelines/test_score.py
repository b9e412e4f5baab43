"""``ranker score``: a raw log in, every row's scores out, equal to what ``ranker serve`` answers.

Real parts: the installed ``ranker`` command, a real gRPC server on loopback for the comparison, a
local Ray (2 CPUs) for the Ray engine, real Parquet in and out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from features.fitted import FittedTransform
from features.spec import FeatureSpec
from pipelines.score import COMBINED, SCORE_PREFIX, read_scores, score_log
from ranking.artifact import build_model, export_artifact
from ranking.config import ModelConfig
from serving.client import RankerClient, read_ranking
from tests.serving.conftest import BackgroundServer

RANKER = str(Path(sys.executable).parent / "ranker")
TASKS = ("click", "watch_time", "like", "dismiss")  # the synthetic spec's, in its order


@pytest.fixture(scope="module")
def artifact(small_features: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported model of the small features (untrained: seeded random weights, scores differ per row)."""
    fitted = FittedTransform.load(small_features / "transform.json")
    torch.manual_seed(3)
    cfg = ModelConfig.from_fitted(fitted, bottom_dims=(16,), expert_dims=(16,), tower_dims=(8,), num_experts=2)
    return export_artifact(build_model(cfg), cfg, fitted, tmp_path_factory.mktemp("score") / "artifact",
                           {"model_name": "ranker", "model_version": "7"})


@pytest.fixture(scope="module")
def log_with_bad_rows(small_log: Path, spec: FeatureSpec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small log's first day plus three rows the spec rejects, as a date-partitioned folder of two files."""
    files = sorted(small_log.rglob("*.parquet"))
    root = tmp_path_factory.mktemp("badlog")
    day = pl.read_parquet(files[0])
    bad = day.head(3).with_columns(
        pl.Series(spec.keys.user, [None, day[spec.keys.user][1], day[spec.keys.user][2]]),
        pl.Series("duration_s", [1.0, -5.0, float("inf")], dtype=day["duration_s"].dtype))
    (root / "part=0").mkdir()
    (root / "part=1").mkdir()
    day.slice(0, 1000).write_parquet(root / "part=0" / "a.parquet")
    pl.concat([day.slice(1000), bad]).write_parquet(root / "part=1" / "b.parquet")
    return root


def test_scores_equal_the_grpc_answers_row_by_row(artifact: Path, small_log: Path, spec: FeatureSpec,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "scores"
    summary = score_log(str(artifact), small_log, out, batch_rows=512)
    scored = read_scores(out)
    raw = pl.concat([pl.read_parquet(f) for f in sorted(small_log.rglob("*.parquet"))])
    assert scored.height == raw.height == summary.rows_scored == summary.rows_in
    assert scored[spec.keys.item].to_list() == raw[spec.keys.item].to_list()  # the log's row order
    assert summary.columns == [f"{SCORE_PREFIX}{t}" for t in TASKS] + [COMBINED]
    request, item = spec.keys.request, spec.keys.item
    assert request is not None and item is not None
    item_cols = [c for c in spec.features_from("item") if c != item]
    server = BackgroundServer(artifact)
    try:
        with RankerClient(server.target) as client:
            for rid in raw[request].unique(maintain_order=True).head(25).to_list():
                rows = raw.filter(pl.col(request) == rid)
                first = rows.row(0, named=True)
                resp = client.rank({c: first[c] for c in spec.features_from("user")},
                                   {c: first[c] for c in spec.features_from("context")},
                                   {c: rows[c].to_list() for c in item_cols}, rows[item].to_list())
                got = read_ranking(resp)
                mine = scored.filter(pl.col(request) == rid)
                order = got.index  # each answer's position in the request = the row within the request
                for t in TASKS:
                    served = np.empty(len(order))
                    served[order] = got.objective_scores[t]
                    np.testing.assert_allclose(mine[f"{SCORE_PREFIX}{t}"].to_numpy(), served, atol=1e-5, rtol=0)
                combined = np.empty(len(order))
                combined[order] = got.score
                np.testing.assert_allclose(mine[COMBINED].to_numpy(), combined, atol=1e-5, rtol=0)
    finally:
        server.close()


def test_bad_rows_are_quarantined_with_counts_and_batches_do_not_change_scores(
    artifact: Path, log_with_bad_rows: Path, tmp_path: Path
) -> None:
    small = score_log(str(artifact), log_with_bad_rows, tmp_path / "small", batch_rows=97)
    big = score_log(str(artifact), log_with_bad_rows, tmp_path / "big")
    assert small.quarantined == big.quarantined == {"duration_s < 0": 1, "duration_s not finite": 1,
                                                    "null user_id": 1}
    q = pl.read_parquet(tmp_path / "small" / "quarantine.parquet")
    assert q.height == 3 and "quarantine_reason" in q.columns and "duration_s" in q.columns  # the whole raw row
    assert small.rows_in == big.rows_in == small.rows_scored + 3
    assert small.files == ["part-00000.parquet", "part-00001.parquet"]  # one per input file
    assert_same_rows(read_scores(tmp_path / "small"), read_scores(tmp_path / "big"))
    saved = json.loads((tmp_path / "small" / "summary.json").read_text())
    assert saved["rows_scored"] == small.rows_scored and saved["quarantined"] == small.quarantined


def test_weights_change_only_the_combined_score(artifact: Path, small_log: Path, tmp_path: Path) -> None:
    score_log(str(artifact), small_log, tmp_path / "a")
    score_log(str(artifact), small_log, tmp_path / "b", weights={"click": 1.0, "watch_time": 0.0, "like": 0.0,
                                                                  "dismiss": 0.0})
    plain, clicks = read_scores(tmp_path / "a"), read_scores(tmp_path / "b")
    assert plain.drop(COMBINED).equals(clicks.drop(COMBINED))
    np.testing.assert_allclose(clicks[COMBINED].to_numpy(), clicks[f"{SCORE_PREFIX}click"].to_numpy(), atol=1e-6)
    assert not np.allclose(plain[COMBINED].to_numpy(), clicks[COMBINED].to_numpy())


def assert_same_rows(a: pl.DataFrame, b: pl.DataFrame) -> None:
    """The same rows: keys, labels and passthrough exactly, scores to float rounding (the matmuls of
    batches of other sizes may sum in another order)."""
    assert a.columns == b.columns and a.height == b.height
    scores = [c for c in a.columns if c.startswith(SCORE_PREFIX) or c == COMBINED]
    assert a.drop(scores).equals(b.drop(scores))
    for c in scores:
        np.testing.assert_allclose(a[c].to_numpy(), b[c].to_numpy(), atol=1e-6, rtol=0, err_msg=c)


def ranker(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'none.db'}"}
    return subprocess.run([RANKER, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_command_scores_and_prints_one_line(artifact: Path, log_with_bad_rows: Path, tmp_path: Path) -> None:
    r = ranker("score", "--model", str(artifact), "--input", str(log_with_bad_rows), "--out", str(tmp_path / "o"),
               "--weight", "click=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "quarantined: 3 (" in r.stdout and "rows/s" in r.stdout
    assert read_scores(tmp_path / "o").height > 0


@pytest.mark.parametrize(("args", "message"), [
    (["--engine", "spark"], "error: --engine must be polars or ray, got 'spark'"),
    (["--weight", "clicks=1"], "clicks"),
    (["--weight", "click=x"], "error: --weight expects name=number, got 'click=x'"),
    (["--batch-rows", "0"], "error: --batch-rows must be >= 1, got 0"),
    (["--workers", "2"], "error: --ray-address and --workers go with --engine ray"),
])
def test_bad_options_are_one_error_line(artifact: Path, small_log: Path, tmp_path: Path, args: list[str],
                                        message: str) -> None:
    r = ranker("score", "--model", str(artifact), "--input", str(small_log), "--out", str(tmp_path / "o"), *args,
               cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


def test_a_missing_input_and_model_are_named(artifact: Path, tmp_path: Path) -> None:
    r = ranker("score", "--model", str(artifact), "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
               cwd=tmp_path)
    assert r.returncode == 2 and "no such file or folder" in r.stderr and "nope" in r.stderr
    r = ranker("score", "--model", str(tmp_path / "gone"), "--input", str(tmp_path), "--out", str(tmp_path / "o"),
               cwd=tmp_path)
    assert r.returncode == 2 and "gone" in r.stderr


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_the_ray_engine_gives_the_polars_engines_rows(artifact: Path, log_with_bad_rows: Path, tmp_path: Path,
                                                      local_ray: None) -> None:
    from pipelines.score_ray import score_log_ray

    polars = score_log(str(artifact), log_with_bad_rows, tmp_path / "polars", batch_rows=300)
    ray = score_log_ray(str(artifact), log_with_bad_rows, tmp_path / "ray", batch_rows=300, workers=2)
    assert (ray.rows_in, ray.rows_scored, ray.quarantined) == (polars.rows_in, polars.rows_scored,
                                                                polars.quarantined)
    assert_same_rows(read_scores(tmp_path / "polars"), read_scores(tmp_path / "ray"))
    qa = pl.read_parquet(tmp_path / "polars" / "quarantine.parquet")
    qb = pl.read_parquet(tmp_path / "ray" / "quarantine.parquet")
    assert qa.sort("item_id").equals(qb.select(qa.columns).sort("item_id"))
