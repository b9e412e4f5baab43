"""The demo path at small size through the public CLI, with a real server process and a real gRPC call."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RANKER = str(Path(sys.executable).parent / "ranker")


def _run(*args: str, env: dict[str, str], cwd: Path) -> str:
    r = subprocess.run([RANKER, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"ranker {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.mark.e2e
def test_synth_features_train_serve_rank(tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    _run("data", "synth", "--out", "log", "--days", "3", "--users", "300", "--items", "1000",
         "--requests-per-day", "400", "--slate-size", "20", env=env, cwd=tmp_path)
    _run("features", "build", "--dataset", "synthetic", "--input", "log", "--out", "features", env=env,
         cwd=tmp_path)
    out = _run("train", "--features", "features", "--model", "mmoe", "--epochs", "1", "--out", "run",
               "--set", "bottom_dims=[32]", "--set", "expert_dims=[16]", "--promote", env=env, cwd=tmp_path)
    assert "registered version 1, now ranker@champion (no gates)" in out

    ready = tmp_path / "port"
    server = subprocess.Popen([RANKER, "serve", "--model", "models:/ranker@champion", "--port", "0",
                               "--ready-file", str(ready)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (ready.is_file() and ready.read_text().strip()):
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        port = ready.read_text().strip()
        table = _run("rank", "--target", f"127.0.0.1:{port}", "--log", "log", "--top-k", "5", env=env,
                     cwd=tmp_path)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    assert code == 0, "server did not stop cleanly on SIGTERM"
    for objective in ("click", "watch_time", "like", "dismiss"):
        assert objective in table
    rows = [ln for ln in table.splitlines() if re.match(r"\s*\d+\s", ln)]
    assert len(rows) == 5
    scores = [float(ln.split()[2]) for ln in rows]
    assert scores == sorted(scores, reverse=True)


def test_features_does_not_import_torch_and_all_packages_import() -> None:
    code = ("import sys, features, features.build, features.synthetic; assert 'torch' not in sys.modules; "
            "import ranking, serving, pipelines, protos")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
