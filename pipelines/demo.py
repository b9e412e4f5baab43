"""``make demo``: the real system end to end on embedded defaults, in about a minute on a laptop CPU."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import typer

from features.build import build
from features.spec import load_spec
from features.synthetic import config_with, write_log
from pipelines.requests import request_from_log
from pipelines.train import TrainConfig, train


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path
    tracking_uri: str
    epochs: int = 2
    days: int = 7
    requests_per_day: int = 3000
    seed: int = 0
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
    from serving.client import RankerClient, format_ranking

    total = time.perf_counter()
    work = cfg.workdir
    for sub in ("log", "features", "run"):
        shutil.rmtree(work / sub, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    spec = load_spec("synthetic")

    t = _step("1/5 synthetic impression log")
    synth = config_with(days=cfg.days, requests_per_day=cfg.requests_per_day, seed=cfg.seed)
    write_log(synth, work / "log")
    rows = synth.days * synth.requests_per_day * synth.slate_size
    typer.echo(f"{rows} impressions, {synth.days} days -> {work / 'log'} ({time.perf_counter() - t:.1f}s)")

    t = _step("2/5 features (Polars: fit on the training days, transform both splits)")
    summary = build(work / "log", spec, work / "features")
    typer.echo(f"rows {summary.rows}; label means (train) {summary.label_rates['train']}")
    typer.echo(f"({time.perf_counter() - t:.1f}s)")

    t = _step("3/5 train MMoE (Lightning, TorchRec), log to MLflow, register")
    result = train(TrainConfig(features=work / "features", out=work / "run", tracking_uri=cfg.tracking_uri,
                               epochs=cfg.epochs, seed=cfg.seed, register_as=cfg.model_name))
    val = {k: round(v, 4) for k, v in sorted(result.metrics.items()) if k.startswith("val/") and "/loss" not in k}
    typer.echo(f"validation {val}")
    typer.echo(f"MLflow run {result.run_id}; registered {cfg.model_name} v{result.model_version} as champion "
               f"({time.perf_counter() - t:.1f}s)")

    t = _step("4/5 serve models:/ranker@champion over gRPC on loopback")
    uri = f"models:/{cfg.model_name}@champion"
    with running_server(uri, cfg.tracking_uri, work, cfg.startup_timeout_s) as target:
        typer.echo(f"server ready at {target} ({time.perf_counter() - t:.1f}s)")
        t = _step("5/5 one Rank call (last request of the validation day)")
        req = request_from_log(work / "log", spec, index=-1)
        with RankerClient(target) as client:
            client.wait_ready(timeout_s=30)
            resp = client.rank(req.user, req.context, req.candidates, req.item_ids, top_k=10,
                               request_id=req.request_id)
        typer.echo(f"user {req.user} context {req.context}: {len(req.item_ids)} candidates")
        typer.echo(format_ranking(resp, limit=10))
    typer.echo(f"\nserver stopped; demo done in {time.perf_counter() - total:.1f}s")
