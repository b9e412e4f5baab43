"""The registered model loads as an MLflow pyfunc model and predicts what the inference model scores.

A real ``ranker train`` registers the version in a real sqlite store; MLflow's own loader takes it
from the registry (``models:/ranker@champion``); ``mlflow models serve`` answers over HTTP.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import polars as pl
import pytest
import requests

from features.spec import FeatureSpec
from ranking.artifact import find_artifact
from ranking.inference import InferenceModel

BIN = Path(sys.executable).parent
CHAMPION = "models:/ranker@champion"
TASKS = ("click", "watch_time", "like", "dismiss")


@pytest.fixture(scope="module")
def store(small_features: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A sqlite store holding one trained, registered version with the champion alias; the tracking URI."""
    root = tmp_path_factory.mktemp("pyfunc")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    r = subprocess.run([str(BIN / "ranker"), "train", "--features", str(small_features), "--out", str(root / "run"),
                        "--epochs", "1", "--set", "bottom_dims=[16]", "--set", "expert_dims=[8]", "--promote"],
                       env=env, capture_output=True, text=True, timeout=400, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    mlflow.set_tracking_uri(uri)  # as a user's notebook would; the conftest restores it after this module
    mlflow.set_registry_uri(uri)
    return uri


@pytest.fixture(scope="module")
def pyfunc(store: str) -> mlflow.pyfunc.PyFuncModel:
    return mlflow.pyfunc.load_model(CHAMPION)


@pytest.fixture(scope="module")
def downloaded(store: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The registered version's files, as MLflow downloads them."""
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(CHAMPION, dst_path=str(tmp_path_factory.mktemp("ref"))))


@pytest.fixture(scope="module")
def reference(downloaded: Path) -> InferenceModel:
    """The same registered version as our own inference model (our loader, on the files MLflow downloads)."""
    return InferenceModel(find_artifact(downloaded, CHAMPION))


@pytest.fixture(scope="module")
def rows(small_log: Path) -> pl.DataFrame:
    """Raw logged rows of 30 requests, as a team would pass them."""
    day = pl.read_parquet(sorted(small_log.rglob("*.parquet"))[-1])
    return day.filter(pl.col("request_id").is_in(day["request_id"].unique(maintain_order=True).head(30).to_list()))


def served(model: InferenceModel, rows: pl.DataFrame, spec: FeatureSpec) -> dict[str, np.ndarray]:
    """Every row's scores from ``InferenceModel.score_requests`` (the serving path), request by request."""
    item = spec.keys.item
    assert item is not None
    reqs = []
    for _, group in rows.group_by("request_id", maintain_order=True):
        first = group.row(0, named=True)
        reqs.append(({c: first[c] for c in spec.features_from("user")},
                     {c: first[c] for c in spec.features_from("context")},
                     {c: group[c].to_list() for c in spec.features_from("item")}))
    per_request = model.score_requests(reqs)
    out = {t: np.concatenate([r[t] for r in per_request]) for t in TASKS}
    out["score"] = np.concatenate([model.combine(r) for r in per_request])
    return out


def test_the_registered_version_is_an_mlflow_model_with_a_signature(pyfunc: mlflow.pyfunc.PyFuncModel,
                                                                   reference: InferenceModel,
                                                                   downloaded: Path) -> None:
    meta = pyfunc.metadata
    assert "python_function" in meta.flavors
    inputs = {c.name: c for c in meta.get_input_schema().inputs}
    assert set(reference.fitted.raw_types) <= set(inputs)  # every raw column the spec reads
    assert inputs["tags"].type.to_dict()["type"] == "array"  # a list feature
    assert not inputs["request_id"].required  # the request key groups rows, optional
    outputs = [c.name for c in meta.get_output_schema().inputs]
    assert outputs == [f"score_{t}" for t in TASKS] + ["score", "quarantine_reason"]
    params = {p.name: p.default for p in meta.get_params_schema().params}
    assert params == {f"weight_{t}": w for t, w in reference.default_weights.items()}
    from mlflow.models import Model

    example = Model.load(str(downloaded)).load_input_example(str(downloaded))
    assert isinstance(example, pd.DataFrame) and len(example) > 0
    assert set(reference.fitted.raw_types) <= set(example.columns)
    assert pyfunc.predict(example)["quarantine_reason"].isna().all()  # the example scores


def test_predict_equals_the_inference_model(pyfunc: mlflow.pyfunc.PyFuncModel, reference: InferenceModel,
                                            rows: pl.DataFrame) -> None:
    got = pyfunc.predict(rows.to_pandas())  # MLflow enforces the signature, drops the labels and keys it lacks
    assert isinstance(got, pd.DataFrame) and len(got) == rows.height
    assert got["quarantine_reason"].isna().all()
    want = served(reference, rows, reference.fitted.spec)
    for t in TASKS:
        np.testing.assert_allclose(got[f"score_{t}"].to_numpy(), want[t], atol=1e-5, rtol=0, err_msg=t)
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"], atol=1e-5, rtol=0)


def test_polars_rows_weights_and_bad_rows(pyfunc: mlflow.pyfunc.PyFuncModel, rows: pl.DataFrame) -> None:
    pandas_answer = pyfunc.predict(rows.to_pandas())
    raw = pyfunc.get_raw_model()  # Polars frames go to the model itself (MLflow's checks take pandas)
    polars_answer = raw.predict(rows)
    pd.testing.assert_frame_equal(polars_answer, pandas_answer, check_exact=False, atol=1e-6)
    only_like = pyfunc.predict(rows.to_pandas(), params={"weight_click": 0.0, "weight_watch_time": 0.0,
                                                         "weight_dismiss": 0.0, "weight_like": 1.0})
    np.testing.assert_allclose(only_like["score"], only_like["score_like"], atol=1e-6)
    bad = rows.head(4).with_columns(pl.Series("duration_s", [1.0, -1.0, 2.0, float("nan")],
                                              dtype=rows["duration_s"].dtype))
    answer = raw.predict(bad)
    reasons = [None if pd.isna(r) else r for r in answer["quarantine_reason"]]
    assert reasons == [None, "duration_s < 0", None, "duration_s not finite"]
    assert answer["score"].isna().tolist() == [False, True, False, True]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_mlflow_models_serve_answers_like_predict(store: str, pyfunc: mlflow.pyfunc.PyFuncModel,
                                                  rows: pl.DataFrame, tmp_path: Path) -> None:
    port = free_port()
    # MLflow starts uvicorn from PATH: the virtualenv's bin folder, as an activated environment has it
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", CHAMPION, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not start"
            time.sleep(0.5)
        records = rows.head(12).drop(["ts"]).to_dicts()  # what a client sends: JSON rows
        r = requests.post(f"http://127.0.0.1:{port}/invocations", timeout=60, json={"dataframe_records": records})
        assert r.ok, r.text[:2000]
        answer = pd.DataFrame(json.loads(r.text)["predictions"])
        want = pyfunc.predict(rows.head(12).to_pandas())
        np.testing.assert_allclose(answer["score"].to_numpy(), want["score"].to_numpy(), atol=1e-5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_ranker_score_reads_the_registered_model(store: str, rows: pl.DataFrame,
                                                                     pyfunc: mlflow.pyfunc.PyFuncModel,
                                                                     tmp_path: Path) -> None:
    rows.write_parquet(tmp_path / "log.parquet")
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    r = subprocess.run([str(BIN / "ranker"), "score", "--model", CHAMPION, "--input", str(tmp_path / "log.parquet"),
                        "--out", str(tmp_path / "scores")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    scored = pl.read_parquet(tmp_path / "scores" / "part-00000.parquet")
    want = pyfunc.predict(rows.to_pandas())
    np.testing.assert_allclose(scored["score"].to_numpy(), want["score"].to_numpy(), atol=1e-5)
