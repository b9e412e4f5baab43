"""A real training run against a real sqlite MLflow store and model registry."""

import json
import logging
import re
import warnings
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from pipelines import quiet
from pipelines.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING, artifact_location, check_tracking_uri
from pipelines.train import train
from pipelines.train_config import TrainConfig, parse_overrides
from ranking.inference import InferenceModel

SMALL = {"bottom_dims": (16,), "expert_dims": (8,)}


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
    from pipelines.train_config import load_config_file

    f = tmp_path / "c.yaml"
    f.write_text("epochs: 3\nlr: 0.01\nmodel_config: {num_experts: 6, expert_dims: [32, 16]}\n")
    assert load_config_file(f) == ({"epochs": 3, "lr": 0.01}, {"num_experts": 6, "expert_dims": (32, 16)})
    f.write_text("epochz: 3\n")
    with pytest.raises(ValueError, match=r"field 'epochz': Extra inputs are not permitted"):
        load_config_file(f)


def test_the_run_is_named_after_data_model_and_time_and_records_its_data(run, small_features: Path) -> None:
    uri, result = run
    client = MlflowClient(uri)
    r = client.get_run(result.run_id)
    # not MLflow's generated name, which the seeded generator makes the same for every run
    assert re.fullmatch(r"synthetic-mmoe-\d{8}-\d{4}", r.info.run_name), r.info.run_name
    inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
              for i in r.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val"}  # the splits the features folder holds
    summary = json.loads((small_features / "summary.json").read_text())
    for split, ds in inputs.items():
        assert ds.name == f"synthetic-{split}" and ds.source_type == "local"
        assert json.loads(ds.source)["uri"] == str((small_features / f"{split}.parquet").resolve())
        assert json.loads(ds.profile) == {"num_rows": summary["rows"][split]}
        assert "mlflow_colspec" in json.loads(ds.schema)
    exp = client.get_experiment(r.info.experiment_id)
    assert exp.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING  # the UI lists it as model training, not GenAI
    assert r.info.status == "FINISHED" and "error" not in r.data.tags


def test_a_failed_start_ends_the_run_failed_and_a_resume_clears_the_error(
    small_features: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import pipelines.train as train_module

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = {"features": small_features, "tracking_uri": uri, "batch_size": 256, "register_as": None,
              "model_overrides": SMALL, "out": tmp_path / "run"}
    first = train(TrainConfig(epochs=1, **common))

    def store_down(*args: object, **kwargs: object) -> None:
        raise ConnectionError("tracking server went away")

    monkeypatch.setattr(train_module, "system_metrics", store_down)  # the first call after the run reopens
    with pytest.raises(ConnectionError):
        train(TrainConfig(epochs=2, resume=True, **common))
    client = MlflowClient(uri)
    failed = client.get_run(first.run_id)
    assert failed.info.status == "FAILED"  # not left RUNNING
    assert failed.data.tags["error"] == "ConnectionError: tracking server went away"

    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="pipelines.train"), caplog.at_level(logging.INFO, logger="ranking.train"):
        resumed = train(TrainConfig(epochs=2, resume=True, **common))
    assert resumed.run_id == first.run_id
    done = client.get_run(first.run_id)
    assert done.info.status == "FINISHED" and "error" not in done.data.tags  # the stale error is gone
    assert len(client.get_metric_history(first.run_id, "val/loss")) == 2
    # progress: one line per epoch with steps, rows and rows/s (stderr is no terminal here, so no bar)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 2/2:")]
    assert re.match(r"epoch 2/2: \d+ steps, [\d,]+ rows in [\d.]+ s \([\d,]+ rows/s\), validation", line), line
    assert "resuming from the last checkpoint" in caplog.text


def test_a_run_that_fails_before_training_is_failed_not_running(
    small_features: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipelines.train as train_module

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("dataset schema unreadable")

    monkeypatch.setattr(train_module, "log_datasets", broken)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ValueError, match="unreadable"):
        train(TrainConfig(features=small_features, out=tmp_path / "run", tracking_uri=uri, register_as=None,
                          model_overrides=SMALL))
    [r] = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("ranker").experiment_id])
    assert r.info.status == "FAILED" and r.data.tags["error"] == "ValueError: dataset schema unreadable"


def test_system_metrics_are_off_without_psutil_and_on_with_it(tmp_path: Path) -> None:
    import importlib.util

    from pipelines.tracking import system_metrics

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("sys"))
    monitor = system_metrics(run.info.run_id, uri)
    if importlib.util.find_spec("psutil") is None:
        assert monitor is None  # silently off: psutil is optional
        return
    assert monitor is not None
    monitor.finish()


def test_quiet_drops_the_known_banners_and_warnings_and_nothing_else(caplog: pytest.LogCaptureFixture) -> None:
    quiet.install()
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    as_printed = [  # what training printed before (module: where each warning is attributed)
        ("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
         "treespec.is_leaf()` instead.", FutureWarning, "lightning.pytorch.utilities._pytree"),
        ("You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a "
         "`LightningDataModule`. It will use the implementation from `LightningModule` instance.", UserWarning,
         "lightning.pytorch.trainer.connectors.data_connector"),
        ("The number of training batches (40) is smaller than the logging interval Trainer(log_every_n_steps=50). "
         "Set a lower value for log_every_n_steps if you want to see logs for the training epoch.",
         PossibleUserWarning, "lightning.pytorch.loops.fit_loop"),
        ("It is recommended to use `self.log('val/click/auc', ..., sync_dist=True)` when logging on epoch level in "
         "distributed setting to accumulate the metric across devices.", PossibleUserWarning,
         "lightning.pytorch.trainer.connectors.logger_connector.result"),
    ]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.install()  # ahead of "always"
        for text, category, module in as_printed:
            warnings.warn_explicit(text, category, "x.py", 1, module=module)
        warnings.warn_explicit("a new Lightning warning", UserWarning, "x.py", 1, module="lightning.pytorch.x")
    assert [str(w.message) for w in seen] == ["a new Lightning warning"]
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO):
        rank_zero.info("GPU available: False, used: False")
        rank_zero.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
        rank_zero.info("`Trainer.fit` stopped: `max_epochs=2` reached.")
        rank_zero.info("`Trainer.fit` stopped: `max_steps=10` reached.")
        logging.getLogger("torch.fx._symbolic_trace").warning("is_fx_tracing will return true for both ...")
        logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    assert [r.getMessage() for r in caplog.records] == ["`Trainer.fit` stopped: `max_steps=10` reached."]


def test_at_a_terminal_training_shows_a_bar_with_epoch_step_and_rows_per_second(
    small_features: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train(TrainConfig(features=small_features, out=tmp_path / "run", tracking_uri=uri, epochs=1, batch_size=256,
                      register_as=None, model_overrides=SMALL))
    out, err = capsys.readouterr()
    assert "Epoch 0" not in out  # the bar is on stderr, never mixed into a command's output
    last = err.replace("\r", "\n").splitlines()
    done = [ln for ln in last if ln.startswith("Epoch 0: 100%")]
    assert done and re.search(r"\d+/\d+ \[.*rows/s=[\d,]+", done[-1]), err[-2000:]
