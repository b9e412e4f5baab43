"""Short real Lightning fits through ``ranking.train.fit`` on the small synthetic data."""

from pathlib import Path

import pytest
import torch

from features.fitted import FittedTransform
from ranking.config import ModelConfig
from ranking.train import FitConfig, FitResult, OptimConfig, fit, load_features

SHAPE = {"bottom_dims": (64,), "expert_dims": (32,), "tower_dims": (16,)}


def _fit(features: Path, epochs: int, seed: int = 0, out: Path | None = None, **fit_fields: object) -> FitResult:
    cfg = ModelConfig.from_fitted(load_features(features), **SHAPE)
    fields: dict[str, object] = {"optim": OptimConfig(lr=5e-3), **fit_fields}
    fit_cfg = FitConfig(epochs=epochs, batch_size=256, seed=seed, accelerator="cpu", **fields)  # type: ignore[arg-type]
    return fit(features, cfg, fit_cfg, out=out)


def test_training_learns_and_logs_per_task_metrics(small_features: Path) -> None:
    m = _fit(small_features, epochs=3).metrics
    for key in ("val/click/auc", "val/like/auc", "val/dismiss/auc", "val/watch_time/rmse", "val/loss",
                "final/val/click/auc", "final/val/combined/ndcg_at_10"):
        assert key in m, key
    assert not any(k.startswith("final/test/") for k in m)  # this folder has no test split
    # clicks are mostly explained by position + relevance; a model that learned nothing gives 0.5
    assert m["val/click/auc"] > 0.65
    assert m["final/val/click/auc"] > 0.65


def test_training_is_deterministic_under_seed(small_features: Path) -> None:
    a = _fit(small_features, epochs=1, seed=3).module
    b = _fit(small_features, epochs=1, seed=3).module
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(va, vb, msg=ka)


def test_fit_returns_the_best_epochs_weights_and_leaves_checkpoints(small_features: Path, tmp_path: Path) -> None:
    # val/click/auc (max) as the selection metric; the first epoch of a high learning rate is often the best
    r = _fit(small_features, epochs=3, out=tmp_path, monitor="val/click/auc", monitor_mode="max",
             optim=OptimConfig(lr=5e-2))
    assert r.best_epoch is not None and r.metrics["best_epoch"] == r.best_epoch
    [best] = (tmp_path / "checkpoints").glob(f"best-epoch={r.best_epoch:03d}*.ckpt")
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    for k, v in r.model.state_dict().items():
        torch.testing.assert_close(v, state[f"model.{k}"], msg=k)
    assert r.model is r.module.model and r.primary and r.sharding_plan is None


def test_fit_without_an_out_folder_writes_nothing_and_keeps_the_last_epoch(small_features: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = _fit(small_features, epochs=1, validate=False, final_eval=False)
    assert r.best_epoch is None and "best_epoch" not in r.metrics
    assert not any(k.startswith(("val/", "final/")) for k in r.metrics)  # no validation ran
    assert list(tmp_path.iterdir()) == []  # no checkpoints, no lightning_logs


def test_fit_refuses_a_resume_without_a_checkpoint(small_features: Path, tmp_path: Path) -> None:
    cfg = ModelConfig.from_fitted(load_features(small_features), **SHAPE)
    with pytest.raises(ValueError, match="no checkpoint to resume from"):
        fit(small_features, cfg, FitConfig(epochs=1, accelerator="cpu"), out=tmp_path, resume=True)


def test_missing_features_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a features folder"):
        load_features(tmp_path)


def test_fitted_window_is_recorded(small_features: Path) -> None:
    fitted = FittedTransform.load(small_features / "transform.json")
    assert fitted.window["start"].startswith("2026-01-01")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_training(small_features: Path) -> None:
    cfg = ModelConfig.from_fitted(load_features(small_features), **SHAPE)
    r = fit(small_features, cfg, FitConfig(epochs=1, batch_size=256, accelerator="gpu", final_eval=False))
    assert r.precision == "bf16-mixed"
    assert next(r.model.parameters()).device.type == "cuda"
    assert r.metrics["val/click/auc"] > 0.6
