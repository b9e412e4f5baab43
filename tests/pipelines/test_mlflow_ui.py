"""`make mlflow-ui`'s server over a real store: its REST API and, with chromium installed, its web page."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from pipelines import ui
from pipelines.config import load_pipeline_config
from pipelines.pipeline import run_pipeline
from pipelines.tracking import runs_page
from pipelines.ui import mlflow_server_command, running_mlflow_server
from tests.pipelines.conftest import DAY7, Nights, write_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WINDOW = "2100,720"  # wide enough that the grid renders every column (it leaves out those off screen)
DOCS = Path(__file__).resolve().parents[2] / "docs"


@dataclass(frozen=True)
class TrackedStore:
    """What the UI should show: a pipeline run (parent) whose train step's model is the champion."""

    tracking_uri: str
    experiment_name: str
    parent_id: str
    run_name: str  # the parent run's name, listed on the experiment page
    run_id: str  # the train step's child run: per-epoch metrics, gate heatmaps, the model
    model_name: str
    version: str


@pytest.fixture(scope="module")
def tracked_store(nights: Nights) -> TrackedStore:
    """The store of the two pipeline nights (tests/pipelines/conftest.py)."""
    uri = nights.tracking_uri
    client = MlflowClient(uri, uri)
    parent = client.get_run(nights.first.parent_run_id or "")
    [train_run] = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and attributes.run_name = 'train'")
    assert nights.first.version is not None
    return TrackedStore(uri, nights.lenient.experiment, parent.info.run_id, str(parent.info.run_name),
                        train_run.info.run_id, nights.lenient.model_name, nights.first.version)


@pytest.fixture(scope="module")
def server(tracked_store: TrackedStore) -> Iterator[str]:
    with running_mlflow_server(tracked_store.tracking_uri) as url:
        yield url


def _get(url: str, endpoint: str, **params: str) -> dict:
    resp = requests.get(f"{url}{endpoint}", params=params, timeout=30)
    assert resp.status_code == 200, f"GET {endpoint} {params}: {resp.status_code} {resp.text[:500]}"
    return resp.json()


def test_rest_api_serves_runs_metrics_artifacts_and_champion(server: str, tracked_store: TrackedStore) -> None:
    s = tracked_store
    exp = _get(server, "/api/2.0/mlflow/experiments/get-by-name", experiment_name=s.experiment_name)["experiment"]

    resp = requests.post(f"{server}/api/2.0/mlflow/runs/search", json={"experiment_ids": [exp["experiment_id"]]},
                         timeout=30)
    assert resp.status_code == 200, resp.text[:500]
    runs = {r["info"]["run_id"]: r["info"] for r in resp.json().get("runs", [])}
    assert s.parent_id in runs and runs[s.parent_id]["run_name"] == s.run_name
    assert s.run_id in runs and runs[s.run_id]["run_name"] == "train"

    history = _get(server, "/api/2.0/mlflow/metrics/get-history", run_id=s.run_id, metric_key="val/click/auc")
    assert len(history["metrics"]) == 1, history  # one point per epoch (the pipeline test trains 1 epoch)
    assert all(0.0 < m["value"] <= 1.0 for m in history["metrics"])

    listed = _get(server, "/api/2.0/mlflow/artifacts/list", run_id=s.run_id)
    assert {"model", "gates"} <= {f["path"] for f in listed["files"]}, listed
    gates = _get(server, "/api/2.0/mlflow/artifacts/list", run_id=s.run_id, path="gates")
    assert any(f["path"].endswith(".png") for f in gates["files"]), gates
    model = _get(server, "/api/2.0/mlflow/artifacts/list", run_id=s.run_id, path="model")
    assert "model/MLmodel" in {f["path"] for f in model["files"]}, model  # an MLflow Model, see pipelines.pyfunc
    meta = requests.get(f"{server}/get-artifact",
                        params={"path": "model/data/artifact/metadata.json", "run_uuid": s.run_id}, timeout=30)
    assert meta.status_code == 200, meta.text[:500]
    assert json.loads(meta.content)["run_id"] == s.run_id

    report = requests.get(f"{server}/get-artifact", params={"path": "report.md", "run_uuid": s.parent_id},
                          timeout=30)
    assert report.status_code == 200 and report.text.startswith("# Pipeline `nightly`: as of 2026-01-07")

    champion = _get(server, "/api/2.0/mlflow/registered-models/alias", name=s.model_name, alias="champion")
    assert champion["model_version"]["version"] == s.version
    assert champion["model_version"]["run_id"] == s.run_id

    # The host check lets a browser on this machine in by either name.
    local = server.replace("127.0.0.1", "localhost")
    assert requests.get(f"{local}/health", timeout=30).status_code == 200


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
         f"--user-data-dir={profile}", "--virtual-time-budget=30000", f"--window-size={WINDOW}", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


def _render(page: str, expect: str, profile: Path) -> str:
    """The page's DOM after headless chromium ran its scripts (twice at most: a loaded machine is slow)."""
    dom, proc = "", None
    for attempt in range(2):
        proc = _chromium(profile / str(attempt), "--dump-dom", page)
        dom = proc.stdout
        if expect in dom:
            break
    assert proc is not None and expect in dom, (
        f"{expect!r} not on {page}; chromium exited {proc.returncode if proc else None}, rendered:\n"
        f"{dom[:2000]}\n{proc.stderr[-1000:] if proc else ''}"
    )
    return dom


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_experiment_page_lists_the_run_in_a_headless_browser(
    server: str, tracked_store: TrackedStore, tmp_path: Path
) -> None:
    exp = _get(server, "/api/2.0/mlflow/experiments/get-by-name", experiment_name=tracked_store.experiment_name)
    page = f"{server}/#/experiments/{exp['experiment']['experiment_id']}/runs"  # the experiment's runs table
    _render(page, tracked_store.run_name, tmp_path)


class RunsTable(HTMLParser):
    """The runs list's cells as the browser rendered them: ``cells[run id][column id]`` is the cell's text.

    The grid marks each row with ``row-id`` (the run id) and each cell with ``col-id`` (the column id
    a saved view names, e.g. ``tags.`pipeline.decision```).
    """

    VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track",
                      "wbr"})

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.cells: dict[str, dict[str, str]] = defaultdict(dict)
        self.open: list[tuple[str, str | None, str | None]] = []  # (tag, row, column) of each open element
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.VOID:
            return
        a = dict(attrs)
        row, col = self.open[-1][1:] if self.open else (None, None)
        row = a.get("row-id") or row
        self.open.append((tag, row, (a.get("col-id") or col) if row else None))

    def handle_endtag(self, tag: str) -> None:
        while self.open and self.open.pop()[0] != tag:
            pass

    def handle_data(self, data: str) -> None:
        if self.open and self.open[-1][1] and self.open[-1][2]:
            _, row, col = self.open[-1]
            assert row is not None and col is not None
            self.cells[row][col] = self.cells[row].get(col, "") + data


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is no PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_runs_list_shows_run_names_decisions_and_the_primary_metric(
    server: str, tracked_store: TrackedStore, nights: Nights, tmp_path: Path
) -> None:
    """The pipeline's saved view, as the link it logs opens it: each night's name, decision and holdout AUC.

    Also writes the screenshot; with ``UPDATE_DOCS_SCREENSHOTS=1`` it becomes ``docs/mlflow-runs.png``.
    """
    client = MlflowClient(tracked_store.tracking_uri)
    exp = client.get_experiment_by_name(tracked_store.experiment_name)
    assert exp is not None
    page = server + runs_page(exp.experiment_id, view="pipeline-nightly")
    assert nights.second.runs_url is not None and nights.second.runs_url.endswith(runs_page(exp.experiment_id,
                                                                                          "pipeline-nightly"))
    table = RunsTable(_render(page, "rejected", tmp_path)).cells
    for result, decision in ((nights.first, "promoted"), (nights.second, "rejected")):
        run = client.get_run(result.parent_run_id or "")
        row = table[run.info.run_id]
        assert run.info.run_name in row["attributes.`Run Name`"], row
        assert row["tags.`pipeline.decision`"] == decision and row["tags.`pipeline.version`"] == result.version
        for task, metric in (("click", "auc"), ("like", "auc"), ("dismiss", "auc"), ("watch_time", "r2")):
            key = f"holdout/{task}/{metric}"
            assert float(row[f"metrics.`{key}`"]) == run.data.metrics[key], (key, row)

    shot = tmp_path / "mlflow-runs.png"
    proc = _chromium(tmp_path / "shot", f"--screenshot={shot}", page)
    assert shot.is_file(), proc.stderr[-1000:]
    assert _png_size(shot) == tuple(int(x) for x in WINDOW.split(","))
    if os.environ.get("UPDATE_DOCS_SCREENSHOTS") == "1":
        shutil.copyfile(shot, DOCS / "mlflow-runs.png")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_the_experiment_opens_on_its_runs_in_the_model_training_layout(
    server: str, tracked_store: TrackedStore, tmp_path: Path
) -> None:
    exp = _get(server, "/api/2.0/mlflow/experiments/get-by-name", experiment_name=tracked_store.experiment_name)
    page = f"{server}/#/experiments/{exp['experiment']['experiment_id']}?workflowType=machine_learning"
    dom = _render(page, tracked_store.run_name, tmp_path)  # lands on the runs table, not the GenAI overview
    assert "Token Usage" not in dom


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_registered_model_page_shows_the_champion_alias(
    server: str, tracked_store: TrackedStore, tmp_path: Path
) -> None:
    dom = _render(f"{server}/#/models/{tracked_store.model_name}", 'title="champion"', tmp_path)  # the alias tag
    assert f"Version {tracked_store.version}" in dom


@pytest.mark.parametrize("uri", ["http://mlflow.internal:5000", "file:///tmp/mlruns", "postgresql://db/mlflow"])
def test_server_command_refuses_a_store_it_cannot_serve(uri: str) -> None:
    with pytest.raises(ValueError, match=uri.replace(".", r"\.")):
        mlflow_server_command(uri)


def test_server_command_keeps_artifacts_beside_the_database(tmp_path: Path) -> None:
    cmd = mlflow_server_command(f"sqlite:///{tmp_path / 'mlflow.db'}", port=5001)
    assert cmd[1] == "server"
    assert cmd[cmd.index("--default-artifact-root") + 1] == (tmp_path / "artifacts").as_uri()
    assert cmd[cmd.index("--port") + 1] == "5001"


def test_make_target_serves_the_configured_store_on_the_configured_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, list[str], dict[str, str]]] = []
    monkeypatch.setattr(ui.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_UI_PORT", "5077")
    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", raising=False)
    ui.main()
    [(path, argv, env)] = calls
    assert path == argv[0] and argv[1] == "server"
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "5077"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_the_pipeline_runs_against_a_remote_tracking_server(server: str, tmp_path: Path) -> None:
    """The scale-out path: the same pipeline pointed at an MLflow server by URI (here the one above)."""
    cfg = load_pipeline_config(write_config(tmp_path, tracking_uri=server, experiment="remote",
                                            model_name="ranker-remote"))
    result = run_pipeline(cfg, as_of=DAY7)
    assert result.status == "done" and result.promoted and result.version == "1"
    champion = _get(server, "/api/2.0/mlflow/registered-models/alias", name="ranker-remote", alias="champion")
    assert champion["model_version"]["version"] == "1"
    report = requests.get(f"{server}/get-artifact", params={"path": "report.md", "run_uuid": result.parent_run_id},
                          timeout=30)
    assert report.status_code == 200 and "first model" in report.text
