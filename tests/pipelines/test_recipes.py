"""The bundled training recipes: ``ranker train`` on a census or KuaiRand features folder starts from
the benchmark's settings (printed), command-line options override them, ``--config`` or
``--no-recipe`` starts elsewhere; and the recipes are the benchmarks' own settings."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.train_config import RECIPE_DIR, features_dataset, load_recipe, recipe_path
from ranking.config import MODEL_KINDS
from ranking.inference import InferenceModel


@pytest.mark.parametrize("dataset", ["census", "kuairand"])
def test_the_recipes_are_the_benchmarks_settings(dataset: str, load_benchmark: Callable[[str], ModuleType]) -> None:
    """What RESULTS.md records is what the recipe gives: the same optimiser, epochs and model shapes."""
    bench = load_benchmark(dataset)
    path = recipe_path(dataset)
    assert path is not None and path.parent == RECIPE_DIR
    for model, shape in bench.MODELS.items():
        fields, overrides = load_recipe(path, model)
        assert overrides == {k: tuple(v) if isinstance(v, list) else v for k, v in shape.items()}, model
        for key, value in bench.RECIPE.items():
            assert fields.get(key, value) == value, key
        assert fields["monitor"] == "val/auc_mean" and fields["monitor_mode"] == "max"
    assert load_recipe(path, "mmoe")[0]["epochs"] == (10 if dataset == "census" else 5)


def test_every_model_of_a_recipe_is_a_known_model() -> None:
    import yaml

    for path in RECIPE_DIR.glob("*.yaml"):
        assert set(yaml.safe_load(path.read_text())["models"]) <= set(MODEL_KINDS), path.name
    assert recipe_path("synthetic") is None  # the demo's dataset trains on the defaults


def test_ranker_train_starts_from_the_datasets_recipe(small_features: Path, tmp_path: Path) -> None:
    """A features folder that says it holds census (its summary.json) trains with census's recipe,
    an option given on the command line wins, and --no-recipe trains on the defaults."""
    features = tmp_path / "features"
    shutil.copytree(small_features, features)
    summary = json.loads((features / "summary.json").read_text())
    (features / "summary.json").write_text(json.dumps({**summary, "dataset": "census"}))
    assert features_dataset(features) == "census" and features_dataset(small_features) == "synthetic"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["train", "--features", str(features), "--epochs", "1", "--tracking-uri", uri, "--register-as", ""]
    r = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "recipe")])
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("training settings:"))
    assert "the bundled census recipe (census.yaml" in line and '"lr": 0.003' in line
    cfg = InferenceModel(tmp_path / "recipe" / "artifact").config
    assert cfg.bottom_dims == (256,) and cfg.num_experts == 8 and cfg.expert_dims == (64,)
    from mlflow import MlflowClient

    (run,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("ranker").experiment_id])
    assert float(run.data.params["lr"]) == 0.003  # the recipe's optimiser reached the training
    r = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "plain"), "--no-recipe"])
    assert r.exit_code == 0, r.output
    assert "training settings:" not in r.output
    plain = InferenceModel(tmp_path / "plain" / "artifact").config
    assert plain.bottom_dims != (256,) or plain.num_experts != 8


def test_the_kuairand_pipeline_trains_the_recipes_model() -> None:
    """``ranker pipeline run --config kuairand`` trains what the ablation chose: the recipe's model and
    optimiser (the pipeline keeps its own epochs, seed and devices)."""
    from pipelines.config import bundled_config, load_pipeline_config

    train = load_pipeline_config(bundled_config("kuairand")).train
    fields, shape = load_recipe(recipe_path("kuairand"), "mmoe")  # type: ignore[arg-type]  # bundled
    assert train["model"] == "mmoe"
    got = {k: tuple(v) if isinstance(v, list) else v for k, v in train["model_config"].items()}
    assert got == shape
    for key in ("lr", "batch_size", "embedding_lr", "lr_schedule", "warmup_steps", "weight_decay", "monitor",
                "monitor_mode"):
        assert train.get(key) == fields.get(key), key
