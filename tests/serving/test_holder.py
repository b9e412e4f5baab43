"""ModelHolder: local folders and MLflow URIs, name/version, warm-up, atomic swap."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from features.fitted import FittedTransform
from ranking.artifact import find_artifact
from serving.holder import ModelHolder, synthetic_request


def test_local_folder_uses_metadata_name_and_version(workspace: Any) -> None:
    holder = ModelHolder(str(workspace.artifact))
    assert holder.current is None and not holder.ready
    loaded = holder.load()
    assert holder.current is loaded and holder.ready
    assert (loaded.name, loaded.version, loaded.uri) == ("ranker", "1", str(workspace.artifact))


def test_local_folder_without_version_uses_folder_name(workspace: Any, tmp_path: Path) -> None:
    art = shutil.copytree(workspace.artifact, tmp_path / "ranker-2026-01-02")
    meta = json.loads((art / "metadata.json").read_text())
    del meta["model_name"], meta["model_version"]
    (art / "metadata.json").write_text(json.dumps(meta))
    loaded = ModelHolder(str(art)).load()
    assert (loaded.name, loaded.version) == ("ranker-2026-01-02", "ranker-2026-01-02")


def test_reload_swaps_current_and_keeps_old_snapshot_usable(workspace: Any, raw_request: Any) -> None:
    holder = ModelHolder(str(workspace.artifact))
    first = holder.load()
    second = holder.load()
    assert holder.current is second and first is not second
    scores = first.model.score_request(raw_request.user, raw_request.context, raw_request.all_candidates())
    assert set(scores) == set(first.model.tasks)


def test_missing_folder_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither an MLflow URI nor an existing folder"):
        ModelHolder(str(tmp_path / "nope")).load()


def test_find_artifact_looks_below_the_download(workspace: Any, tmp_path: Path) -> None:
    nested = shutil.copytree(workspace.artifact, tmp_path / "dl" / "artifacts" / "model")
    assert find_artifact(tmp_path / "dl", "runs:/x/model") == nested
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no inference artifact .* at 'runs:/x/empty'"):
        find_artifact(tmp_path / "empty", "runs:/x/empty")


def test_synthetic_request_covers_every_feature(fitted: FittedTransform) -> None:
    user, context, candidates = synthetic_request(fitted, n=3)
    spec = fitted.spec
    assert set(user) == set(spec.features_from("user"))
    assert set(context) == set(spec.features_from("context"))
    assert set(candidates) == set(spec.features_from("item"))
    assert all(len(v) == 3 for v in candidates.values())
    assert fitted.transform_request(user, context, candidates).height == 3


def test_mlflow_alias_resolves_the_registered_version(
    workspace: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("serving-test", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(workspace.artifact), artifact_path="model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("ranker")
    for _ in range(2):  # versions 1 and 2; the alias points at 2
        mv = client.create_model_version("ranker", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("ranker", "champion", mv.version)

    # another store set process-wide (as an earlier training run in the same process does) must not
    # be consulted: the holder resolves the registry reference in its own store
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    try:
        holder = ModelHolder("models:/ranker@champion", tracking_uri=uri)
        loaded = holder.load()
    finally:
        mlflow.set_tracking_uri(before)
    assert (loaded.name, loaded.version) == ("ranker", "2")
    assert ModelHolder("models:/ranker/1", tracking_uri=uri).load().version == "1"
    by_run = ModelHolder(f"runs:/{run.info.run_id}/model", tracking_uri=uri).load()
    assert (by_run.name, by_run.version) == ("ranker", "1")  # from the artifact's metadata
    assert ModelHolder("models:/ranker/latest", tracking_uri=uri).load().version == "2"
    with pytest.raises(ValueError, match="models:/ranker@nobody.*does not resolve"):
        ModelHolder("models:/ranker@nobody", tracking_uri=uri).load()
    with pytest.raises(ValueError, match="is not models:/<name>@<alias>"):
        ModelHolder("models:/ranker/v2", tracking_uri=uri).load()
    holder.close()
    assert not loaded.model.path.exists()
