import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from features.fitted import FittedTransform
from ranking.artifact import build_model, export_artifact, load_artifact
from ranking.config import GateConfig, ModelConfig
from ranking.inference import InferenceModel


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, small_features: Path) -> Path:
    fitted = FittedTransform.load(small_features / "transform.json")
    cfg = ModelConfig.from_fitted(fitted, bottom_dims=(16,), expert_dims=(16,), tower_dims=(8,), num_experts=2)
    torch.manual_seed(1)
    model = build_model(cfg)
    return export_artifact(model, cfg, fitted, tmp_path_factory.mktemp("art"), {"model_version": "7"})


def test_artifact_loads_without_pickle_and_scores_identically(artifact: Path, small_features: Path) -> None:
    model, cfg, fitted, meta = load_artifact(artifact)
    assert not model.training and cfg.num_experts == 2 and fitted.spec.name == "synthetic"
    assert meta["default_weights"] == {"click": 1.0, "watch_time": 0.2, "like": 2.0, "dismiss": 1.0}
    assert meta["model_version"] == "7"
    # the weights file holds tensors only: the strict loader accepts it
    state = torch.load(artifact / "weights.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    frame = pl.read_parquet(small_features / "val.parquet").head(50)
    a = InferenceModel(artifact).score_frame(frame)
    b = InferenceModel(artifact).score_frame(frame)
    for t in a:
        np.testing.assert_array_equal(a[t], b[t])
    assert ((a["click"] > 0) & (a["click"] < 1)).all()


def test_a_format_1_artifact_with_flat_gate_fields_still_loads(small_features: Path, tmp_path: Path) -> None:
    """Artifacts exported before the gate settings were nested (format 1) load and score the same."""
    fitted = FittedTransform.load(small_features / "transform.json")
    cfg = ModelConfig.from_fitted(fitted, bottom_dims=(16,), expert_dims=(16,), tower_dims=(8,), num_experts=3,
                                  gate=GateConfig("noisy_topk", top_k=2, noise=0.5, dropout=0.1))
    torch.manual_seed(2)
    new = export_artifact(build_model(cfg), cfg, fitted, tmp_path / "new", {})
    assert json.loads((new / "metadata.json").read_text())["format"] == 2
    old = tmp_path / "old"
    old.mkdir()
    for f in new.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    flat = json.loads((new / "model_config.json").read_text())
    gate = flat.pop("gate")
    flat.update(gate=gate["kind"], top_k=gate["top_k"], gate_noise=gate["noise"], gate_dropout=gate["dropout"])
    (old / "model_config.json").write_text(json.dumps(flat))
    meta = json.loads((new / "metadata.json").read_text())
    (old / "metadata.json").write_text(json.dumps({**meta, "format": 1}))
    _, got, _, _ = load_artifact(old)
    assert got == cfg
    frame = pl.read_parquet(small_features / "val.parquet").head(30)
    a, b = InferenceModel(new).score_frame(frame), InferenceModel(old).score_frame(frame)
    for t in a:
        np.testing.assert_array_equal(a[t], b[t])
    (old / "metadata.json").write_text(json.dumps({**meta, "format": 3}))
    with pytest.raises(ValueError, match=r"unsupported artifact format 3 .* this version reads \[1, 2\]"):
        load_artifact(old)


def test_scores_ignore_position(artifact: Path, small_features: Path) -> None:
    frame = pl.read_parquet(small_features / "val.parquet").head(20)
    m = InferenceModel(artifact)
    a = m.score_frame(frame)
    b = m.score_frame(frame.with_columns(pl.lit(0).alias("position")))
    np.testing.assert_array_equal(a["click"], b["click"])


def test_combine_follows_weights_and_signs(artifact: Path) -> None:
    m = InferenceModel(artifact)
    s = {"click": np.array([0.5, 0.1]), "watch_time": np.array([2.0, 1.0]),
         "like": np.array([0.1, 0.3]), "dismiss": np.array([0.2, 0.0])}
    np.testing.assert_allclose(m.combine(s), [0.5 + 0.4 + 0.2 - 0.2, 0.1 + 0.2 + 0.6 - 0.0])
    np.testing.assert_allclose(m.combine(s, {"like": 0.0, "watch_time": 0.0}), [0.3, 0.1])
    with pytest.raises(ValueError, match="unknown objective 'ctr'"):
        m.combine(s, {"ctr": 1.0})
    with pytest.raises(ValueError, match="'like' must be finite and >= 0, got -1.0"):
        m.combine(s, {"like": -1.0})


def test_broken_artifacts_give_clear_errors(artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an inference artifact"):
        load_artifact(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in artifact.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "model_config.json").read_text())
    cfg["num_experts"] = 5
    (bad / "model_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match model_config.json"):
        load_artifact(bad)
