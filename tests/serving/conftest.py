"""Shared fixtures: a real (untrained) inference artifact, one logged request, a running server."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from features.build import build
from features.fitted import FittedTransform
from features.spec import load_spec
from features.synthetic import SynthConfig, write_log
from protos.ranking.v1 import ranker_pb2 as pb
from ranking.artifact import build_model, export_artifact
from ranking.config import ModelConfig
from ranking.inference import InferenceModel
from serving.client import build_request
from serving.server import RankingServer, ServerOptions, start_server


@dataclass(frozen=True)
class Workspace:
    log: Path  # raw impression log (date-partitioned Parquet)
    artifact: Path  # exported inference artifact


@dataclass(frozen=True)
class RawRequest:
    """One logged slate as Python values (what a client would send)."""

    user: dict[str, Any]
    context: dict[str, Any]
    candidates: dict[str, list[Any]]  # the item key excluded
    item_ids: list[int]

    def all_candidates(self, item_key: str = "item_id") -> dict[str, list[Any]]:
        """Candidate columns including the item key, as ``InferenceModel.score_request`` takes them."""
        return {**self.candidates, item_key: self.item_ids}

    def to_proto(self, **kwargs: Any) -> pb.RankRequest:
        return build_request(self.user, self.context, self.candidates, self.item_ids, **kwargs)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    root = tmp_path_factory.mktemp("serving")
    write_log(SynthConfig(days=2, users=50, items=200, requests_per_day=50, slate_size=10), root / "log")
    build(root / "log", load_spec("synthetic"), root / "feat")
    fitted = FittedTransform.load(root / "feat" / "transform.json")
    cfg = ModelConfig.from_fitted(fitted, bottom_dims=(16,), expert_dims=(16,), tower_dims=(8,), num_experts=2)
    art = export_artifact(
        build_model(cfg), cfg, fitted, root / "artifact", {"model_name": "ranker", "model_version": "1"}
    )
    return Workspace(log=root / "log", artifact=art)


@pytest.fixture(scope="session")
def model(workspace: Workspace) -> InferenceModel:
    return InferenceModel(workspace.artifact)


@pytest.fixture(scope="session")
def fitted(model: InferenceModel) -> FittedTransform:
    return model.fitted


@pytest.fixture(scope="session")
def raw_request(workspace: Workspace, fitted: FittedTransform) -> RawRequest:
    """The first logged slate (10 candidates) with its real feature values."""
    spec = fitted.spec
    log = pl.read_parquet(sorted(workspace.log.rglob("*.parquet"))[0])
    slate = log.filter(pl.col(spec.keys.request) == log[spec.keys.request][0])
    first = slate.row(0, named=True)
    item_key = spec.keys.item
    return RawRequest(
        user={c: first[c] for c in spec.features_from("user")},
        context={c: first[c] for c in spec.features_from("context")},
        candidates={c: slate[c].to_list() for c in spec.features_from("item") if c != item_key},
        item_ids=slate[item_key].to_list(),
    )


class BackgroundServer:
    """The ``grpc.aio`` server on an event loop in a daemon thread, for blocking clients."""

    def __init__(self, artifact: Path, options: ServerOptions | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.rs: RankingServer = self.call(start_server(str(artifact), options=options))
        self.target = f"127.0.0.1:{self.rs.port}"

    def call(self, coro: Any, timeout_s: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.call(self.rs.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def server(workspace: Workspace) -> Iterator[BackgroundServer]:
    bg = BackgroundServer(workspace.artifact)
    yield bg
    bg.close()
