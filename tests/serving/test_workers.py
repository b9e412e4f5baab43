"""``ranker serve --workers 2`` as a real process tree on loopback: one port, two workers, one /metrics.

The module starts one pool (``sys.executable -m pipelines serve``) and runs its tests in order: the
workers answer and both take connections, ``/metrics`` sums them, a hot reload reaches every
worker, a killed worker comes back, and SIGTERM stops the parent and every worker with exit code 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from protos.ranking.v1 import ranker_pb2 as pb
from protos.ranking.v1 import ranker_pb2_grpc as pb_grpc
from serving.workers import PoolOptions, default_workers

START_TIMEOUT_S = 90.0  # three interpreters importing torch on a loaded 2-core machine
SERVING = re.compile(r"^worker=(\d+) pid=(\d+) serving version=(\S+)")
Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Pool:
    """The ``ranker serve --workers 2`` process, its log (JSON lines, read on a thread) and its ports."""

    def __init__(self, artifact: Path, ready: Path) -> None:
        self.artifact = artifact
        cmd = [sys.executable, "-m", "pipelines", "serve", "--workers", "2", "--model", str(artifact),
               "--port", "0", "--ready-file", str(ready), "--metrics-port", "0", "--reload-interval-s", "0.2"]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.lines: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.exists() and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), f"pool did not get ready (exit code {self.proc.poll()}):\n{self.text()}"
        self.target = f"127.0.0.1:{int(ready.read_text())}"
        metrics = self.wait_for(r"^metrics host=\S+ metrics_port=(\d+) dir=(\S+)")
        self.metrics_port, self.metrics_dir = int(metrics[1]), Path(metrics[2])

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                record = {"message": raw.rstrip("\n")}
            with self._lock:
                self.lines.append(record if isinstance(record, dict) else {"message": raw})

    def messages(self) -> list[str]:
        with self._lock:
            return [str(r.get("message", "")) for r in self.lines]

    def text(self) -> str:
        return "\n".join(self.messages())

    def wait_for(self, pattern: str, timeout_s: float = 30.0, start: int = 0) -> re.Match[str]:
        """The first log message from index ``start`` on that matches ``pattern``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for message in self.messages()[start:]:
                if m := re.search(pattern, message):
                    return m
            time.sleep(0.05)
        raise AssertionError(f"no log message matches {pattern!r} within {timeout_s}s:\n{self.text()}")

    def serving_pids(self) -> dict[int, int]:
        """worker index -> pid of its latest process that reported SERVING."""
        pids: dict[int, int] = {}
        for message in self.messages():
            if m := SERVING.search(message):
                pids[int(m[1])] = int(m[2])
        return pids

    def scrape(self) -> Metrics:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def worker_ok_count(self, pid: int) -> float:
        """One worker's ``ranker_requests_total{code="OK"}``, read from its own multiprocess file."""
        for metric in MultiProcessCollector.merge([str(self.metrics_dir / f"counter_{pid}.db")]):
            for s in metric.samples:
                if s.name == "ranker_requests_total" and s.labels == {"code": "OK"}:
                    return s.value
        return 0.0

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for pid in self.serving_pids().values():  # the workers shut down when their parent is gone
            deadline = time.monotonic() + 15
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _rank_fresh(target: str, req: pb.RankRequest) -> pb.RankResponse:
    """One Rank call on a new channel with its own connection (no subchannel shared across channels)."""
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        return pb_grpc.RankerStub(channel).Rank(req, timeout=10, wait_for_ready=True)


def _ok(m: Metrics) -> float:
    return m[("ranker_requests_total", (("code", "OK"),))]


def _model_versions(m: Metrics) -> set[str]:
    return {dict(labels)["version"] for (name, labels), v in m.items() if name == "ranker_model_info" and v == 1}


@pytest.fixture(scope="module")
def pool(workspace: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    root = tmp_path_factory.mktemp("workers")
    artifact = Path(shutil.copytree(workspace.artifact, root / "artifact"))  # the reload test rewrites it
    p = Pool(artifact, root / "port")
    yield p
    p.close()


def test_pool_options_name_the_bad_value() -> None:
    assert default_workers() >= 1
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        PoolOptions(workers=0)
    with pytest.raises(ValueError, match="restart_window_s must be finite and > 0, got inf"):
        PoolOptions(workers=2, restart_window_s=float("inf"))


def test_both_workers_serve_and_metrics_sum_them(pool: Pool, raw_request: Any) -> None:
    pids = pool.serving_pids()
    assert sorted(pids) == [0, 1] and len(set(pids.values())) == 2
    assert all(_alive(pid) for pid in pids.values())
    before = pool.scrape()
    before_by_worker = {i: pool.worker_ok_count(pid) for i, pid in pids.items()}
    n = 40
    for i in range(n):
        resp = _rank_fresh(pool.target, raw_request.to_proto(request_id=f"w{i}"))
        assert resp.request_id == f"w{i}" and len(resp.candidates) == len(raw_request.item_ids)
    after = pool.scrape()
    assert _ok(after) - _ok(before) == n
    served = {i: pool.worker_ok_count(pid) - before_by_worker[i] for i, pid in pids.items()}
    assert sum(served.values()) == n
    assert all(count > 0 for count in served.values()), f"a worker got no connection: {served}"
    assert after[("ranker_workers_serving", ())] == 2
    assert after[("ranker_model_loads_total", (("outcome", "ok"),))] >= 2  # one initial load per worker
    assert after[("ranker_queue_depth", ())] == 0


def test_hot_reload_reaches_every_worker(pool: Pool, raw_request: Any) -> None:
    meta_path = pool.artifact / "metadata.json"
    meta = json.loads(meta_path.read_text())
    new = str(int(meta["model_version"]) + 1)
    tmp = meta_path.with_name("metadata.json.tmp")
    tmp.write_text(json.dumps({**meta, "model_version": new}))
    tmp.replace(meta_path)
    deadline = time.monotonic() + 30
    while _model_versions(pool.scrape()) != {new} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _model_versions(pool.scrape()) == {new}, "not every worker reloaded (ranker_model_info)"
    versions = {_rank_fresh(pool.target, raw_request.to_proto()).model_version for _ in range(20)}
    assert versions == {new}


def test_a_killed_worker_is_restarted_and_the_port_keeps_answering(pool: Pool, raw_request: Any) -> None:
    victim = pool.serving_pids()[1]
    mark = len(pool.messages())
    os.kill(victim, signal.SIGKILL)
    pool.wait_for(rf"^worker=1 pid={victim} exited unexpectedly with signal SIGKILL; restarting", start=mark)
    for _ in range(10):  # the other worker answers while the new one starts
        assert len(_rank_fresh(pool.target, raw_request.to_proto()).candidates) == len(raw_request.item_ids)
    restarted = pool.wait_for(r"^worker=1 pid=(\d+) serving", timeout_s=START_TIMEOUT_S, start=mark)
    assert int(restarted[1]) != victim and _alive(int(restarted[1]))
    m = pool.scrape()
    assert m[("ranker_worker_restarts_total", ())] == 1
    assert m[("ranker_workers_serving", ())] == 2


def test_sigterm_stops_every_worker_and_exits_0(pool: Pool, raw_request: Any) -> None:
    pids = set(pool.serving_pids().values())
    assert len(_rank_fresh(pool.target, raw_request.to_proto()).candidates) > 0
    pool.proc.send_signal(signal.SIGTERM)
    assert pool.proc.wait(timeout=60) == 0, pool.text()
    pool._reader.join(timeout=10)
    assert not [pid for pid in pids if _alive(pid)]
    messages = pool.messages()
    for pid in pids:
        assert any(re.search(rf"^worker=\d pid={pid} exited with exit code 0", m) for m in messages), pool.text()
    stopped = [r for r in pool.lines if str(r.get("message", "")).startswith("stopped port=")]
    assert sorted(int(r.get("worker", -1)) for r in stopped) == [0, 1]  # each worker's graceful stop, tagged
    assert messages[-1].startswith("stopped workers=2")
    assert not pool.metrics_dir.exists()


def test_a_model_that_cannot_load_fails_the_command_in_one_line_before_any_worker_starts(tmp_path: Path) -> None:
    """The supervisor checks the model before it binds or forks: one line, no worker to clean up."""
    missing = tmp_path / "no-model"
    r = subprocess.run([sys.executable, "-m", "pipelines", "serve", "--workers", "2", "--model", str(missing),
                        "--port", "0", "--log-format", "text"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], r.stderr
    assert "neither an MLflow URI nor an existing folder" in lines[0]
    assert "Traceback" not in r.stderr
    assert not re.search(r"worker=\d pid=\d+ starting", r.stderr)
