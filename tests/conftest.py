"""Shared fixtures: a small synthetic log and its model-ready features, made once per session."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from features.build import BuildSummary, build
from features.spec import FeatureSpec, load_spec
from features.synthetic import SynthConfig, write_log

SMALL = SynthConfig(days=3, users=200, items=3000, requests_per_day=200, slate_size=10, seed=7)
KUAIRAND = Path(__file__).resolve().parents[2] / "shared" / "data" / "kuairand_pure_subset"  # CI has it
KUAIRAND_LOG = "log_standard_20220425_to_20220508.parquet"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (the folder holds scripts, not a package), registered in
    ``sys.modules``, which dataclasses need to resolve their module."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


MLFLOW_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(scope="module", autouse=True)
def _no_mlflow_store_leaks() -> Iterator[None]:
    """Each test module leaves MLflow's process-wide stores as it found them.

    ``mlflow.set_tracking_uri`` and ``mlflow.set_registry_uri`` also export ``MLFLOW_TRACKING_URI`` and
    ``MLFLOW_REGISTRY_URI``, so a module that points MLflow at its store would otherwise send every later
    module's ``ranker`` subprocesses (which inherit the environment) to register in it.
    """
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    saved = {k: os.environ.get(k) for k in MLFLOW_URI_VARIABLES}
    uris = tracking._tracking_uri, registry._registry_uri
    yield
    tracking._tracking_uri, registry._registry_uri = uris
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def load_benchmark() -> Callable[[str], ModuleType]:
    """``load_benchmark("quality")``: :func:`load_benchmark_script` as a fixture."""
    return load_benchmark_script


@pytest.fixture(scope="session")
def kuairand_data() -> Path:
    """The real KuaiRand-Pure files; a test that needs them fails (never skips) when they are missing."""
    if not (KUAIRAND / KUAIRAND_LOG).is_file():
        pytest.fail(f"KuaiRand data missing: expected {str(KUAIRAND / KUAIRAND_LOG)!r} "
                    "(the repo's sibling shared/data folder)")
    return KUAIRAND


@pytest.fixture(scope="session")
def spec() -> FeatureSpec:
    return load_spec("synthetic")


@pytest.fixture(scope="session")
def small_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("log")
    write_log(SMALL, out)
    return out


@pytest.fixture(scope="session")
def small_features(tmp_path_factory: pytest.TempPathFactory, small_log: Path, spec: FeatureSpec) -> Path:
    out = tmp_path_factory.mktemp("features")
    build(small_log, spec, out)
    return out


@pytest.fixture(scope="session")
def small_summary(small_features: Path) -> BuildSummary:
    import json

    return BuildSummary(**json.loads((small_features / "summary.json").read_text()))
