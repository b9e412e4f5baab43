"""Shared fixtures: a small synthetic log and its model-ready features, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from features.build import BuildSummary, build
from features.spec import FeatureSpec, load_spec
from features.synthetic import SynthConfig, write_log

SMALL = SynthConfig(days=3, users=200, items=3000, requests_per_day=200, slate_size=10, seed=7)


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
