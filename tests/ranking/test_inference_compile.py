"""InferenceModel(compile=True): the compiled serving network equals eager; a failed compile serves eager."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from features.fitted import FittedTransform
from features.spec import load_spec
from features.synthetic import SynthConfig, generate_day
from ranking.artifact import build_model, export_artifact
from ranking.config import ModelConfig
from ranking.inference import InferenceModel, _probe

# Inductor's own imports touch deprecated torch.jit entry points; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = generate_day(SynthConfig(users=30, items=80, requests_per_day=20, slate_size=5), 0)
    fitted = FittedTransform.fit(raw.lazy(), load_spec("synthetic"))
    torch.manual_seed(0)
    cfg = ModelConfig.from_fitted(fitted, bottom_dims=(16,), expert_dims=(16, 8), tower_dims=(8,), num_experts=3)
    return export_artifact(build_model(cfg), cfg, fitted, tmp_path_factory.mktemp("compile") / "artifact")


def test_compiled_scores_equal_eager(artifact: Path) -> None:
    eager = InferenceModel(artifact)
    compiled = InferenceModel(artifact, compile=True)
    assert compiled.compiled and not eager.compiled
    requests = [_probe(eager.fitted, n) for n in (1, 7, 40)]
    for got, want in zip(compiled.score_requests(requests), eager.score_requests(requests), strict=True):
        for task in eager.tasks:
            np.testing.assert_allclose(got[task], want[task], atol=1e-5, rtol=0)


def test_a_failed_compile_serves_eager(artifact: Path, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    model = InferenceModel(artifact, compile=True)
    assert not model.compiled
    assert "no C++ compiler" in caplog.text
    scores = model.score_request(*_probe(model.fitted, 3))
    assert scores[model.tasks[0]].shape == (3,)
