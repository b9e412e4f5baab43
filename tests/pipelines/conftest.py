"""A small pipeline config and two real nights of the pipeline (days 1-7, then 1-8), made once."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.config import PipelineConfig, load_pipeline_config
from pipelines.pipeline import PipelineResult, run_pipeline

DAY7, DAY8 = date(2026, 1, 7), date(2026, 1, 8)
RANKER = str(Path(sys.executable).parent / "ranker")  # the installed command


def run_ranker(*args: str, env: dict[str, str], cwd: Path, timeout_s: float = 600) -> str:
    """``ranker ARGS`` as a process; its stdout, or a failed assertion with both streams."""
    r = subprocess.run([RANKER, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    assert r.returncode == 0, f"ranker {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


@contextlib.contextmanager
def ranker_serve(args: list[str], env: dict[str, str], cwd: Path) -> Iterator[str]:
    """``ranker serve ARGS --port 0`` as a process; yields its ``host:port`` once ready, then stops it
    with SIGTERM and checks it exited cleanly."""
    ready = cwd / f"port-{time.monotonic_ns()}"
    server = subprocess.Popen([RANKER, "serve", *args, "--port", "0", "--ready-file", str(ready)], env=env, cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (ready.is_file() and ready.read_text().strip()):
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        yield f"127.0.0.1:{ready.read_text().strip()}"
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    assert code == 0, f"server did not stop cleanly on SIGTERM: {server.stdout.read() if server.stdout else ''}"


def write_config(root: Path, **changes: Any) -> Path:
    """A tiny synthetic pipeline under ``root`` (8 days of 2,000 impressions, a small MMoE, 1 epoch)."""
    body: dict[str, Any] = {
        "name": "nightly",
        "source": {"dataset": "synthetic", "path": str(root / "landing"),
                   "synthesize": {"days": 8, "users": 200, "items": 2000, "requests_per_day": 200,
                                  "slate_size": 10, "seed": 11}},
        "workdir": str(root / "work"),
        "tracking_uri": f"sqlite:///{root / 'mlflow' / 'mlflow.db'}",
        "experiment": "pipeline-test",
        "model_name": "ranker",
        "train": {"epochs": 1, "batch_size": 256,
                  "model_config": {"bottom_dims": [32], "expert_dims": [16], "tower_dims": [8]}},
        "gates": {"primary": "click", "primary_min_gain": 0.0, "max_drop": 1.0},
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    path = root / f"pipeline-{len(list(root.glob('pipeline-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@dataclass(frozen=True)
class Nights:
    root: Path
    lenient: PipelineConfig  # gates that a sane challenger passes
    strict: PipelineConfig  # a primary gate no challenger can pass (+0.5 AUC)
    first: PipelineResult  # days 1-7 (lenient): the first model
    second: PipelineResult  # days 1-8 (strict): registered, not promoted
    tracking_uri: str


@pytest.fixture(scope="session")
def nights(tmp_path_factory: pytest.TempPathFactory) -> Nights:
    root = tmp_path_factory.mktemp("pipeline")
    lenient = load_pipeline_config(write_config(root))
    strict = load_pipeline_config(write_config(root, gates={"primary_min_gain": 0.5}))
    first = run_pipeline(lenient, as_of=DAY7)
    second = run_pipeline(strict, as_of=DAY8)
    return Nights(root, lenient, strict, first, second, str(lenient.tracking_uri))
