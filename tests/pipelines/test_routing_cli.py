"""The routing strategies through the public commands: ``ranker train --set gate.*``, a pipeline
config's ``train.model_config.gate``, and ``ranker serve --experts-k`` on the registered model."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from ranking.inference import InferenceModel
from tests.pipelines.conftest import ranker_serve, run_ranker, write_config

SMALL = ["--set", "bottom_dims=[32]", "--set", "expert_dims=[16]", "--set", "tower_dims=[8]", "--set", "num_experts=4"]


@pytest.mark.parametrize(("kind", "extra"), [
    ("top_p", ["gate.top_p=0.7", "gate.z_loss_weight=0.01"]),
    ("hash", []),
    ("expert_choice", ["gate.top_k=1", "gate.capacity_factor=1.5"]),
    ("shared_topk", ["gate.top_k=1", "gate.private_experts=1", "gate.z_loss_weight=0.01"]),
])
def test_ranker_train_takes_each_strategy_from_set(kind: str, extra: list[str], small_features: Path,
                                                    tmp_path: Path) -> None:
    """The strategy reaches the model, the artifact and its served scores; routing health (and the
    router z-loss when weighted) is logged for the validation split."""
    sets = [a for kv in [f"gate.kind={kind}", *extra] for a in ("--set", kv)]
    r = CliRunner().invoke(app, ["train", "--features", str(small_features), "--out", str(tmp_path / "run"),
                                 "--epochs", "1", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                                 *SMALL, *sets])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    model = InferenceModel(tmp_path / "run" / "artifact")
    assert model.config.gate.kind == kind
    for kv in extra:  # every --set value is in the artifact's config
        key, value = kv.removeprefix("gate.").split("=")
        assert getattr(model.config.gate, key) == type(getattr(model.config.gate, key))(value)
    assert 0.0 <= metrics["val/routing/click/load_cv"] < 10.0
    assert ("val/router_z" in metrics) == any("z_loss_weight" in kv for kv in extra)
    if kind in ("hash", "shared_topk"):  # one expert a row per task (hash), 1 shared + 1 private
        assert metrics["val/routing/click/active_experts"] == pytest.approx(1.0 if kind == "hash" else 2.0)
    requests = _probe_requests(model)
    served, reference = model.score_requests(requests), model.reference_score_requests(requests)
    for got, want in zip(served, reference, strict=True):
        for task in model.tasks:
            np.testing.assert_allclose(got[task], want[task], atol=1e-5, rtol=0)


def _probe_requests(model: InferenceModel) -> list[tuple[dict, dict, dict]]:
    """Two requests of 4 and 3 candidates from the model's own vocabularies."""
    from ranking.inference import _probe

    return [_probe(model.fitted, 4), _probe(model.fitted, 3)]


@pytest.mark.e2e
def test_a_pipeline_trains_a_routed_model_and_ranker_serve_lowers_its_k(tmp_path: Path) -> None:
    """``ranker pipeline run`` with a task-shared selection in its config registers a model whose
    artifact has it; ``ranker serve --experts-k 1`` serves it, and ``ranker rank`` gets a ranking."""
    gate = {"kind": "shared_topk", "top_k": 2, "private_experts": 1}
    config = write_config(tmp_path, train={"epochs": 1, "batch_size": 256, "model_config": {
        "bottom_dims": [32], "expert_dims": [16], "tower_dims": [8], "num_experts": 4, "gate": gate}})
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"}
    out = run_ranker("pipeline", "run", "--config", str(config), env=env, cwd=tmp_path)
    assert "version 1; promoted: yes" in out, out
    log = next((tmp_path / "landing").rglob("*.parquet"))
    with ranker_serve(["--model", "models:/ranker@champion", "--experts-k", "1"], env, tmp_path) as target:
        table = run_ranker("rank", "--target", target, "--log", str(log), "--top-k", "5", env=env, cwd=tmp_path)
    rows = [ln for ln in table.splitlines() if re.match(r"\s*\d+\s", ln)]
    scores = [float(ln.split()[2]) for ln in rows]
    assert len(rows) == 5 and scores == sorted(scores, reverse=True)
    from mlflow import MlflowClient

    from ranking.artifact import download_artifact

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version_by_alias("ranker", "champion").version
    (tmp_path / "dl").mkdir()
    artifact = download_artifact(client.get_model_version_download_uri("ranker", version), tmp_path / "dl",
                                 env["MLFLOW_TRACKING_URI"], "models:/ranker@champion")
    registered = InferenceModel(artifact)
    assert registered.config.gate.kind == "shared_topk" and registered.config.gate.top_k == 2
    lowered = InferenceModel(artifact, experts_k=1)  # what the server ran
    requests = _probe_requests(lowered)
    got, as_trained = lowered.score_requests(requests), registered.score_requests(requests)
    assert any(np.abs(a["click"] - b["click"]).max() > 0 for a, b in zip(got, as_trained, strict=True))
