"""The demo path at small size through the public CLI, with a real server process and a real gRPC call."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipelines.conftest import ranker_serve, run_ranker


def _run(*args: str, env: dict[str, str], cwd: Path) -> str:
    return run_ranker(*args, env=env, cwd=cwd, timeout_s=300)


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

    with ranker_serve(["--model", "models:/ranker@champion"], env, tmp_path) as target:
        table = _run("rank", "--target", target, "--log", "log", "--top-k", "5", env=env, cwd=tmp_path)
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
