"""MLflow on PostgreSQL, as teams run it: the pipeline, serving and training against a real database.

One throwaway PostgreSQL cluster and one ``mlflow server`` on it (artifacts served by the server as
``mlflow-artifacts:/``) for the module (tests/pipelines/postgres.py). Two nights of the tiny
synthetic pipeline go through the server by ``--tracking-uri http://...``; the tests read back what
they recorded through MLflow's API and, with psycopg2, straight from the database's tables; then
``ranker serve`` loads the champion from that registry and answers a Rank call, and ``ranker train``
writes to the same database by a ``postgresql://`` URI, with no server.
Skipped, with the reason, where PostgreSQL is not installed (CI installs it: .ci/run).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from features.spec import load_spec
from pipelines.champion import key_metrics
from pipelines.config import PromotionGates
from pipelines.requests import request_from_log
from pipelines.tracking import check_tracking_uri
from ranking.artifact import download_artifact
from serving.client import RankerClient, read_ranking
from tests.pipelines.conftest import DAY7, DAY8, ranker_serve, run_ranker, write_config
from tests.pipelines.postgres import PostgresCluster, PostgresUnavailable, mlflow_server, postgres_cluster

pytestmark = pytest.mark.e2e

MODEL, EXPERIMENT = "ranker", "pipeline-test"  # write_config's
CHILD_STEPS = {"ingest", "validate", "features", "train", "evaluate", "register"}  # promote, report: on the parent
SPEC = load_spec("synthetic")
TASKS: dict[str, str] = {t.name: t.type for t in SPEC.tasks}


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    with contextlib.ExitStack() as stack:
        try:
            pg = stack.enter_context(postgres_cluster())
        except PostgresUnavailable as e:
            pytest.skip(f"MLflow-on-PostgreSQL tests need PostgreSQL: {e}")
        yield pg


@dataclass(frozen=True)
class Server:
    url: str  # http://127.0.0.1:PORT
    artifacts: Path  # where the server keeps what clients upload


@pytest.fixture(scope="module")
def server(cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    artifacts = tmp_path_factory.mktemp("mlartifacts")
    with mlflow_server(cluster.uri(), artifacts) as url:
        yield Server(url, artifacts)


def _env() -> dict[str, str]:
    """This environment without a default store: every command must use the URI it is given."""
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


@dataclass(frozen=True)
class Nights:
    root: Path
    outputs: tuple[str, str]  # ranker pipeline run's stdout, night one and two


@pytest.fixture(scope="module")
def nights(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Nights:
    """Days 1-7, then 1-8 (gates any challenger passes: the champion moves to version 2), through the server."""
    root = tmp_path_factory.mktemp("pg-pipeline")
    first = write_config(root)
    second = write_config(root, gates={"primary_min_gain": -1.0})
    out = tuple(run_ranker("pipeline", "run", "--config", str(cfg), "--as-of", day.isoformat(),
                           "--tracking-uri", server.url, env=_env(), cwd=root)
                for cfg, day in ((first, DAY7), (second, DAY8)))
    return Nights(root, (out[0], out[1]))


def _runs(client: MlflowClient) -> tuple[list[Run], dict[str, list[Run]]]:
    """The experiment's parent runs (oldest as-of first) and each one's child runs."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = sorted((r for r in runs if "mlflow.parentRunId" not in r.data.tags),
                     key=lambda r: r.data.tags["pipeline.as_of"])
    children = {p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
                for p in parents}
    return parents, children


def test_two_nights_are_recorded_and_registered_through_the_server(
    nights: Nights, server: Server, tmp_path: Path
) -> None:
    assert "version 1; promoted: yes" in nights.outputs[0], nights.outputs[0]
    assert "version 2; promoted: yes" in nights.outputs[1], nights.outputs[1]
    assert f"MLflow runs list: {server.url}/#/experiments/" in nights.outputs[1]
    assert "View run" not in "".join(nights.outputs)  # MLflow's own line per ended run (pipelines.quiet)
    client = MlflowClient(server.url, server.url)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:/"), exp

    parents, children = _runs(client)
    assert [p.data.tags["pipeline.as_of"] for p in parents] == [DAY7.isoformat(), DAY8.isoformat()]
    trains = []
    for version, parent in enumerate(parents, 1):
        tags, params = parent.data.tags, parent.data.params
        assert parent.info.status == "FINISHED"
        assert (tags["pipeline.status"], tags["pipeline.decision"], tags["pipeline.version"]) == (
            "done", "promoted", str(version))
        assert params["name"] == "nightly" and params["train.epochs"] == "1", params
        for key in key_metrics(TASKS, PromotionGates()):  # each task's holdout gate metric, on the parent
            assert key in parent.data.metrics, (key, parent.data.metrics)
        steps = {r.info.run_name: r for r in children[parent.info.run_id]}
        assert set(steps) == CHILD_STEPS and {r.info.status for r in steps.values()} == {"FINISHED"}
        train = steps["train"]
        for task, kind in TASKS.items():
            metric = f"val/{task}/{'auc' if kind == 'binary' else 'rmse'}"  # per epoch, each task
            assert metric in train.data.metrics, (metric, sorted(train.data.metrics))
        assert len(client.get_metric_history(train.info.run_id, "val/click/auc")) == 1  # one epoch
        assert train.info.artifact_uri.startswith("mlflow-artifacts:/")
        assert any(f.path == "model/MLmodel" for f in client.list_artifacts(train.info.run_id, "model"))
        trains.append(train.info.run_id)
    # The second night scored the champion it downloaded through the server against its challenger.
    evaluate = next(r for r in children[parents[1].info.run_id] if r.info.run_name == "evaluate")
    assert "champion/holdout/click/auc" in evaluate.data.metrics, sorted(evaluate.data.metrics)
    # What clients uploaded lives in the server's artifacts folder, under the run's id.
    assert any(trains[1] in p.parts for p in server.artifacts.rglob("metadata.json"))

    versions = {v.version: v for v in client.search_model_versions(f"name='{MODEL}'")}
    assert sorted(versions, key=int) == ["1", "2"]
    assert [versions[v].run_id for v in ("1", "2")] == trains
    assert all(str(v.source).startswith("mlflow-artifacts:/") for v in versions.values())
    assert client.get_model_version_by_alias(MODEL, "champion").version == "2"
    dst = tmp_path / "champion"  # fetched as serving and the pipeline fetch it: through the server
    dst.mkdir()
    artifact = download_artifact(client.get_model_version_download_uri(MODEL, "2"), dst, server.url,
                                 f"models:/{MODEL}@champion")
    assert json.loads((artifact / "metadata.json").read_text())["run_id"] == trains[1]
    tags2 = client.get_model_version(MODEL, "2").tags
    assert (tags2["promoted"], tags2["champion_at_evaluation"], tags2["gates"]) == ("true", "1", "passed")
    # Nothing fell back to a local store: no sqlite file (the config's), no .mlflow/ or mlruns/.
    assert not (nights.root / "mlflow").exists() and not (nights.root / ".mlflow").exists()
    assert not (nights.root / "mlruns").exists()


def _rows(cluster: PostgresCluster, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """The rows of one query, read from PostgreSQL itself (not through MLflow)."""
    conn = cluster.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())
    finally:
        conn.close()


def test_the_rows_live_in_postgres(nights: Nights, server: Server, cluster: PostgresCluster) -> None:
    client = MlflowClient(server.url, server.url)
    parents, children = _runs(client)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None
    api = {r.info.run_id: r.info.run_name for p in parents for r in [p, *children[p.info.run_id]]}
    db = dict(_rows(cluster, "SELECT run_uuid, name FROM runs WHERE experiment_id = %s AND status = 'FINISHED'",
                    int(exp.experiment_id)))
    assert db == api
    assert _rows(cluster, "SELECT name FROM registered_models WHERE name = %s", MODEL) == [(MODEL,)]
    train = {r.info.run_name: r.info.run_id for r in children[parents[1].info.run_id]}["train"]
    versions = dict(_rows(cluster, "SELECT version, run_id FROM model_versions WHERE name = %s", MODEL))
    assert sorted(versions) == [1, 2] and versions[2] == train
    assert _rows(cluster, "SELECT alias, version FROM registered_model_aliases WHERE name = %s",
                 MODEL) == [("champion", 2)]
    [(auc,)] = _rows(cluster, "SELECT value FROM latest_metrics WHERE run_uuid = %s AND key = 'val/click/auc'",
                     train)
    assert auc == client.get_run(train).data.metrics["val/click/auc"]
    assert _rows(cluster, "SELECT value FROM params WHERE run_uuid = %s AND key = 'train.epochs'",
                 parents[0].info.run_id) == [("1",)]


def _rank_once(args: list[str], nights: Nights, cwd: Path) -> tuple[str, str]:
    """``ranker serve ARGS`` answers one Rank call (the log's first request, top 5) with a sane ranking;
    the (model name, version) that answered."""
    req = request_from_log(min((nights.root / "landing").rglob("*.parquet")), SPEC)
    with ranker_serve(args, _env(), cwd) as target, RankerClient(target) as rc:
        resp = rc.rank(req.user, req.context, req.candidates, req.item_ids, top_k=5, request_id=req.request_id,
                       timeout_s=30)
    ranking = read_ranking(resp)
    assert len(ranking) == 5 and set(ranking.objective_scores) == set(TASKS)
    assert list(ranking.score) == sorted(ranking.score, reverse=True)
    assert set(ranking.item_ids) <= {str(i) for i in req.item_ids}
    return resp.model_name, resp.model_version


def test_serve_loads_the_champion_from_the_server_and_ranks(nights: Nights, server: Server, tmp_path: Path) -> None:
    args = ["--model", f"models:/{MODEL}@champion", "--tracking-uri", server.url, "--workers", "1"]
    assert _rank_once(args, nights, tmp_path) == (MODEL, "2")


def test_train_and_serve_with_a_postgresql_uri_without_a_server(
    nights: Nights, cluster: PostgresCluster, tmp_path: Path
) -> None:
    """``ranker train --tracking-uri postgresql://...`` writes to the database the server uses, directly
    (a batch job beside the server), in an experiment and under a model name of its own; ``ranker serve``
    loads that champion from the database."""
    uri = cluster.uri()  # postgresql://mlflow@127.0.0.1:PORT/mlflow
    features = nights.root / "work" / "runs" / DAY7.isoformat() / "features"
    out = run_ranker("train", "--features", str(features), "--out", "run", "--epochs", "1", "--tracking-uri", uri,
                     "--experiment", "direct", "--register-as", "direct", "--promote",
                     "--set", "bottom_dims=[32]", "--set", "expert_dims=[16]", env=_env(), cwd=tmp_path)
    assert "registered version 1, now direct@champion (no gates)" in out, out

    store = check_tracking_uri(uri)  # what ranker train opened: the installed driver named
    client = MlflowClient(store, store)
    mv = client.get_model_version_by_alias("direct", "champion")
    run = client.get_run(str(mv.run_id))
    assert run.info.status == "FINISHED" and 0.0 < run.data.metrics["val/click/auc"] <= 1.0
    # Without a server, artifacts go where MLflow puts them for a database store: ./mlruns of the
    # process that made the experiment.
    where = Path(run.info.artifact_uri.removeprefix("file://"))
    assert where.is_relative_to(tmp_path / "mlruns") and where.is_dir(), run.info.artifact_uri
    assert _rows(cluster, "SELECT r.run_uuid, r.status FROM runs r JOIN experiments e "
                          "ON r.experiment_id = e.experiment_id WHERE e.name = 'direct'") == [(mv.run_id, "FINISHED")]
    assert _rows(cluster, "SELECT alias, version FROM registered_model_aliases WHERE name = 'direct'") == [
        ("champion", 1)]
    # ranker serve opens the store as ranker train does (its workers, if any, are handed that URI).
    args = ["--model", "models:/direct@champion", "--tracking-uri", uri, "--workers", "1"]
    assert _rank_once(args, nights, tmp_path) == ("direct", "1")
