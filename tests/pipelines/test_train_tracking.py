"""A real training run against a real sqlite MLflow store and model registry."""

import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from pipelines.tracking import artifact_location, check_tracking_uri
from pipelines.train import TrainConfig, parse_overrides, train
from ranking.inference import InferenceModel


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, small_features: Path):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = TrainConfig(features=small_features, out=root / "run", tracking_uri=uri, epochs=2, batch_size=256,
                      model_overrides={"bottom_dims": (32,), "expert_dims": (16,), "tower_dims": (8,)})
    return uri, train(cfg)


def test_run_has_params_and_per_epoch_task_metrics(run) -> None:
    uri, result = run
    client = MlflowClient(uri)
    r = client.get_run(result.run_id)
    assert r.data.params["train.model"] == "mmoe"
    assert r.data.params["model.num_experts"] == "4"
    assert "data.transform_hash" in r.data.params
    for key in ("val/click/auc", "val/like/auc", "val/watch_time/rmse", "train/click/auc"):
        history = client.get_metric_history(result.run_id, key)
        assert len(history) == 2, key  # one point per epoch
    assert r.info.artifact_uri.startswith(artifact_location(uri) or "")
    # the selected weights are evaluated on the whole validation split once more
    for key in ("final/val/click/gauc", "final/val/true/ndcg_at_10"):
        assert 0.0 < r.data.metrics[key] <= 1.0, key
    assert r.data.metrics["final/val/click/ne"] > 0


def test_plain_training_registers_a_version_and_moves_no_alias(run) -> None:
    """A plain ``train`` leaves the champion alone: only the pipeline's gates or an explicit alias move it."""
    uri, result = run
    client = MlflowClient(uri)
    mv = client.get_model_version("ranker", result.model_version)
    assert mv.run_id == result.run_id and mv.aliases == []
    assert client.get_registered_model("ranker").aliases == {}
    assert mv.tags == {"made_by": "ranker train", "gates": "not run", "promoted": "false"}


@pytest.fixture(scope="module")
def promoted(run, tmp_path_factory: pytest.TempPathFactory, small_features: Path):
    """A second training in the same store with ``alias="champion"`` (what ``ranker train --promote`` sets)."""
    uri, first = run
    cfg = TrainConfig(features=small_features, out=tmp_path_factory.mktemp("promoted"), tracking_uri=uri,
                      epochs=1, batch_size=256, alias="champion",
                      model_overrides={"bottom_dims": (32,), "expert_dims": (16,), "tower_dims": (8,)})
    return uri, first, train(cfg)


def test_an_explicit_alias_is_moved_and_the_version_says_so(promoted) -> None:
    uri, first, result = promoted
    client = MlflowClient(uri)
    assert int(result.model_version) == int(first.model_version) + 1
    mv = client.get_model_version_by_alias("ranker", "champion")
    assert str(mv.version) == result.model_version
    assert mv.tags["promoted"] == "true (champion, by ranker train, no gates)" and mv.tags["gates"] == "not run"
    assert client.get_model_version("ranker", first.model_version).aliases == []


def test_registered_champion_is_a_loadable_artifact(promoted, tmp_path: Path) -> None:
    uri, _, result = promoted
    client = MlflowClient(uri)
    mv = client.get_model_version_by_alias("ranker", "champion")
    assert str(mv.version) == result.model_version and mv.run_id == result.run_id
    local = mlflow.artifacts.download_artifacts(artifact_uri="models:/ranker@champion", tracking_uri=uri,
                                                dst_path=str(tmp_path))
    model = InferenceModel(local)
    assert model.tasks == ["click", "watch_time", "like", "dismiss"]
    assert model.metadata["run_id"] == result.run_id
    written = json.loads((result.artifact.parent / "metrics.json").read_text())
    assert written["val/click/auc"] == pytest.approx(result.metrics["val/click/auc"])


def test_file_store_uri_is_refused() -> None:
    with pytest.raises(ValueError, match="is a file store"):
        check_tracking_uri("./mlruns")


def test_parse_overrides() -> None:
    assert parse_overrides(["num_experts=8", "expert_dims=[64,32]", "model=mmoe"]) == {
        "num_experts": 8, "expert_dims": (64, 32), "model": "mmoe"}
    with pytest.raises(ValueError, match="key=value, got 'oops'"):
        parse_overrides(["oops"])


def test_unknown_model_is_refused(small_features: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown --model 'xgb'"):
        TrainConfig(features=small_features, out=tmp_path, tracking_uri="sqlite:///x.db", model="xgb")


def test_gate_health_metrics_and_heatmaps_are_logged(run) -> None:
    uri, result = run
    client = MlflowClient(uri)
    assert len(client.get_metric_history(result.run_id, "val/gate/click/entropy")) == 2
    assert len(client.get_metric_history(result.run_id, "val/gate/dead_fraction")) == 2
    spread = client.get_metric_history(result.run_id, "val/gate/expert_spread")
    assert len(spread) == 2 and all(m.value > 0.1 for m in spread)  # independently initialised experts
    names = {f.path for f in client.list_artifacts(result.run_id, "gates")}
    assert names == {"gates/gates_epoch_000.png", "gates/gates_epoch_001.png"}


def test_resume_matches_an_uninterrupted_run(small_features: Path, tmp_path: Path) -> None:
    import torch

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = {"features": small_features, "tracking_uri": uri, "batch_size": 256, "register_as": None,
              "progress_bar": False, "model_overrides": {"bottom_dims": (16,), "expert_dims": (8,)}}
    train(TrainConfig(out=tmp_path / "full", epochs=2, **common))
    train(TrainConfig(out=tmp_path / "cut", epochs=1, **common))
    resumed = train(TrainConfig(out=tmp_path / "cut", epochs=2, resume=True, **common))
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    # the resumed run continues the same MLflow run: one point per epoch, two epochs
    assert len(MlflowClient(uri).get_metric_history(resumed.run_id, "val/loss")) == 2


def test_config_file(tmp_path: Path) -> None:
    from pipelines.train import load_config_file

    f = tmp_path / "c.yaml"
    f.write_text("epochs: 3\nlr: 0.01\nmodel_config: {num_experts: 6, expert_dims: [32, 16]}\n")
    assert load_config_file(f) == ({"epochs": 3, "lr": 0.01}, {"num_experts": 6, "expert_dims": (32, 16)})
    f.write_text("epochz: 3\n")
    with pytest.raises(ValueError, match=r"unknown training field\(s\) \['epochz'\]"):
        load_config_file(f)
