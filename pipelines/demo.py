"""``make demo``: the real system end to end on embedded defaults, in about a minute on a laptop CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import typer

from features.spec import load_spec
from pipelines import quiet
from pipelines.requests import request_from_log


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path
    tracking_uri: str
    model_name: str = "ranker"
    startup_timeout_s: float = 120.0


def _step(title: str) -> float:
    typer.secho(f"\n==> {title}", bold=True)
    return time.perf_counter()


@contextmanager
def running_server(model_uri: str, tracking_uri: str, workdir: Path, timeout_s: float) -> Iterator[str]:
    """Start ``ranker serve`` in a child process on a free loopback port; stop it cleanly on exit."""
    ready = workdir / "server.port"
    ready.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pipelines", "serve", "--model", model_uri, "--port", "0",
           "--tracking-uri", tracking_uri, "--ready-file", str(ready), "--log-format", "text"]
    proc = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + timeout_s
        while not (ready.is_file() and ready.read_text().strip()):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode} before becoming ready")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout_s:.0f}s")
            time.sleep(0.1)
        yield f"127.0.0.1:{ready.read_text().strip()}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_demo(cfg: DemoConfig) -> None:
    """``ranker pipeline run --config synthetic`` (into ``workdir``), then serve the champion and rank once.

    Running it again is cheap: the pipeline sees the day is done (a no-op) and the demo serves the
    champion it registered before.
    """
    from serving.client import RankerClient, format_ranking

    quiet.install()  # also for the pipeline and the server it starts (MLflow's download bar is an env setting)
    total = time.perf_counter()
    work = cfg.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    spec = load_spec("synthetic")
    env = {**os.environ, "RANKER_PIPELINE_ROOT": str(work), "MLFLOW_TRACKING_URI": cfg.tracking_uri}

    t = _step("1/3 ranker pipeline run --config synthetic (synthetic log -> lake -> Polars features -> MMoE under "
              "Lightning with TorchRec -> holdout vs champion -> MLflow registry)")
    cmd = [sys.executable, "-m", "pipelines", "pipeline", "run", "--config", "synthetic"]
    subprocess.run(cmd, env=env, check=True)
    typer.echo(f"({time.perf_counter() - t:.1f}s)")

    t = _step(f"2/3 serve models:/{cfg.model_name}@champion over gRPC on loopback")
    uri = f"models:/{cfg.model_name}@champion"
    landing = work / "synthetic" / "landing"
    with running_server(uri, cfg.tracking_uri, work, cfg.startup_timeout_s) as target:
        typer.echo(f"server ready at {target} ({time.perf_counter() - t:.1f}s)")
        t = _step("3/3 one Rank call (the last request of the newest day)")
        req = request_from_log(landing, spec, index=-1)
        with RankerClient(target) as client:
            client.wait_ready(timeout_s=30)
            resp = client.rank(req.user, req.context, req.candidates, req.item_ids, top_k=10,
                               request_id=req.request_id)
        typer.echo(f"user {req.user} context {req.context}: {len(req.item_ids)} candidates")
        typer.echo(format_ranking(resp, limit=10))
    typer.echo(f"\nserver stopped; demo done in {time.perf_counter() - total:.1f}s "
               f"(MLflow store {cfg.tracking_uri}; `make mlflow-ui` shows the runs)")
