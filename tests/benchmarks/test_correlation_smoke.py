"""benchmarks/correlation.py: its doctests, the generator's correlation, and a seconds-long study."""

from __future__ import annotations

import dataclasses
import doctest
import math
from collections.abc import Callable
from types import ModuleType

import pytest
import torch


@pytest.fixture(scope="module")
def study(load_benchmark: Callable[[str], ModuleType]) -> ModuleType:
    return load_benchmark("correlation")


def test_doctests_pass(study: ModuleType) -> None:
    result = doctest.testmod(study)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("p", [0.0, 0.5, 0.9])
def test_without_sines_or_noise_label_correlation_is_p(study: ModuleType, p: float) -> None:
    cfg = study.StudyConfig(sines=0, noise_std=0.0, train_rows=20_000, test_rows=1)
    data = study.draw_seed(cfg, seed=3)
    alpha, beta = study.sine_params(cfg)
    y = study.labels(data.x_train, data.noise_train, data.u, p, cfg, alpha, beta)  # (N, 2)
    assert float(torch.corrcoef(y.T)[0, 1]) == pytest.approx(p, abs=0.02)
    assert torch.allclose(data.u @ data.u.T, torch.eye(2), atol=1e-5)  # u1, u2 orthonormal


def test_labels_reject_a_correlation_outside_minus_one_one(study: ModuleType) -> None:
    cfg = study.StudyConfig(dim=4, sines=1)
    with pytest.raises(ValueError, match="correlation p must be in \\[-1, 1\\], got 1.5"):
        study.labels(torch.zeros(2, 4), torch.zeros(2, 2), torch.eye(4)[:2], 1.5, cfg, torch.zeros(1), torch.zeros(1))


def test_models_have_about_the_same_parameter_budget(study: ModuleType) -> None:
    cfg = study.StudyConfig()
    counts = {k: sum(p.numel() for p in study.dense_model(study.model_config(k, cfg)).parameters())
              for k in cfg.models}
    assert counts == {"shared_bottom": 13_255, "omoe": 14_026, "mmoe": 14_834}


def test_smoke_study_covers_every_model_p_and_seed(study: ModuleType) -> None:
    cfg = dataclasses.replace(study.StudyConfig(), train_rows=256, test_rows=128, seeds=2, epochs=2)
    runs, label_corr = study.run_study(cfg)
    assert set(runs) == {(k, p) for k in cfg.models for p in cfg.correlations}
    for (kind, _), results in runs.items():
        assert len(results) == 2
        assert all(len(r.curve) == 2 and all(math.isfinite(x) for x in r.curve) for r in results)
        assert all((r.polarized is None) == (kind == "shared_bottom") for r in results)
    assert min(label_corr[1.0]) > 0.99
    text = study.report(cfg, runs, label_corr)
    assert "| mmoe | 0.5 |" in text and "Degradation" in text
