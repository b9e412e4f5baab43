"""InferenceModel(compile=True): the AOTInductor-compiled serving network equals eager, is compiled once per
artifact and code (a cached package), and a failed compile or a broken package serves eager."""

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


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RANKER_COMPILE_CACHE", str(tmp_path / "compiled"))
    return tmp_path / "compiled"


def test_compiled_scores_equal_eager(artifact: Path, cache: Path) -> None:
    eager = InferenceModel(artifact)
    compiled = InferenceModel(artifact, compile=True)
    assert compiled.compiled and not eager.compiled and compiled.scorer.compiled
    assert len(list(cache.glob("*.pt2"))) == 1
    requests = [_probe(eager.fitted, n) for n in (1, 7, 40)]
    for got, want in zip(compiled.score_requests(requests), eager.score_requests(requests), strict=True):
        for task in eager.tasks:
            np.testing.assert_allclose(got[task], want[task], atol=1e-5, rtol=0)
    # the next load (another worker, a restart) reuses the package: no compiler is called
    import torch._inductor

    def no_compiler(*args: object, **kwargs: object) -> object:
        raise AssertionError("compiled again")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch._inductor, "aoti_compile_and_package", no_compiler)
        again = InferenceModel(artifact, compile=True)
    assert again.compiled
    one = [_probe(eager.fitted, 3)]
    np.testing.assert_allclose(again.score_requests(one)[0][eager.tasks[0]],
                               eager.score_requests(one)[0][eager.tasks[0]], atol=1e-5, rtol=0)


def test_a_failed_compile_serves_eager(artifact: Path, cache: Path, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    import torch._inductor

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    model = InferenceModel(artifact, compile=True)
    assert not model.compiled and not model.scorer.compiled
    assert "no C++ compiler" in caplog.text
    scores = model.score_request(*_probe(model.fitted, 3))
    assert scores[model.tasks[0]].shape == (3,)


def test_a_broken_package_serves_eager(artifact: Path, cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = InferenceModel(artifact)
    cache.mkdir(parents=True)
    (cache / f"{model._compile_key()}.pt2").write_bytes(b"not a package")  # e.g. a disk filled up mid-write
    assert not model.compile()
    assert "serving eager" in caplog.text
    assert model.score_request(*_probe(model.fitted, 2))[model.tasks[0]].shape == (2,)


def test_the_package_name_follows_the_artifact(artifact: Path, tmp_path: Path) -> None:
    import shutil

    other = tmp_path / "other"
    shutil.copytree(artifact, other)
    assert InferenceModel(other)._compile_key() == InferenceModel(artifact)._compile_key()  # same files
    threads = torch.get_num_threads()
    try:  # Inductor's kernels keep the thread count they were compiled with: another count, another package
        torch.set_num_threads(1)
        one = InferenceModel(artifact)._compile_key()
        torch.set_num_threads(2)
        assert InferenceModel(artifact)._compile_key() != one
    finally:
        torch.set_num_threads(threads)
    weights = next(p for p in other.rglob("*.pt") if p.is_file())
    weights.write_bytes(weights.read_bytes() + b"\0")
    changed = InferenceModel.__new__(InferenceModel)  # weights that no longer load: only the key is asked for
    changed.path, changed.experts_k = other, 0
    assert changed._compile_key() != InferenceModel(artifact)._compile_key()
    fewer = InferenceModel(artifact)
    fewer.experts_k = 1  # fewer experts per row: another network, another package
    assert fewer._compile_key() != InferenceModel(artifact)._compile_key()


def test_a_routed_model_with_large_experts_compiles_its_sparse_mixture(tmp_path: Path, cache: Path) -> None:
    """16 experts of [512, 64] served at top-1 (``experts_k``): the exported network runs each expert
    on its rows only, and AOTInductor compiles it; scores equal eager on several batch sizes."""
    from ranking.config import GateConfig

    raw = generate_day(SynthConfig(users=30, items=80, requests_per_day=20, slate_size=5), 0)
    fitted = FittedTransform.fit(raw.lazy(), load_spec("synthetic"))
    torch.manual_seed(0)
    cfg = ModelConfig.from_fitted(fitted, bottom_dims=(64,), expert_dims=(512, 64), tower_dims=(8,), num_experts=16,
                                  gate=GateConfig("noisy_topk", top_k=2))
    art = export_artifact(build_model(cfg), cfg, fitted, tmp_path / "artifact")
    eager = InferenceModel(art, experts_k=1)
    assert eager.scorer.mmoe is not None and eager.scorer.mmoe.sparse_when_exported
    compiled = InferenceModel(art, compile=True, experts_k=1)
    assert compiled.compiled
    requests = [_probe(eager.fitted, n) for n in (1, 7, 40)]
    for got, want in zip(compiled.score_requests(requests), eager.score_requests(requests), strict=True):
        for task in eager.tasks:
            np.testing.assert_allclose(got[task], want[task], atol=1e-5, rtol=0)
