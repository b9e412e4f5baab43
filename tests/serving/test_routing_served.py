"""Every routing strategy exported and served over gRPC, equal to the training network; --experts-k."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from protos.ranking.v1 import ranker_pb2_grpc as pb_grpc
from ranking.artifact import build_model, export_artifact
from ranking.config import GateConfig, ModelConfig
from ranking.inference import InferenceModel
from serving.server import ServerOptions
from tests.serving.conftest import BackgroundServer

GATES = [GateConfig("top_p", top_p=0.7), GateConfig("hash"), GateConfig("expert_choice", top_k=1),
         GateConfig("shared_topk", top_k=2), GateConfig("noisy_topk", top_k=3)]


def _artifact(fitted: Any, gate: GateConfig, out: Path, seed: int = 4) -> Path:
    cfg = ModelConfig.from_fitted(fitted, bottom_dims=(16,), expert_dims=(16,), tower_dims=(8,), num_experts=4,
                                  gate=gate)
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():  # gates of trained magnitude, so routing differs between candidates
        for name, p in model.named_parameters():
            if "gates" in name and p.dim() == 2:
                p.normal_(0.0, 2.0)
    return export_artifact(model, cfg, fitted, out, {"model_name": "ranker", "model_version": "1"})


def _served(artifact: Path, raw: Any, options: ServerOptions | None = None) -> dict[str, np.ndarray]:
    bg = BackgroundServer(artifact, options)
    try:
        with grpc.insecure_channel(bg.target) as channel:
            resp = pb_grpc.RankerStub(channel).Rank(raw.to_proto(), timeout=30)
    finally:
        bg.close()
    order = np.argsort([c.index for c in resp.candidates])
    tasks = list(resp.candidates[0].objective_scores)
    return {t: np.array([c.objective_scores[t] for c in resp.candidates])[order] for t in tasks}


@pytest.mark.parametrize("gate", GATES, ids=lambda g: g.kind)
def test_each_strategy_serves_what_the_training_network_scores(gate: GateConfig, fitted: Any, raw_request: Any,
                                                               tmp_path: Path) -> None:
    artifact = _artifact(fitted, gate, tmp_path / "artifact")
    model = InferenceModel(artifact)
    request = (raw_request.user, raw_request.context, raw_request.all_candidates())
    want = model.reference_score_requests([request])[0]  # the Polars transform and the training network
    got = _served(artifact, raw_request)
    for task, scores in want.items():
        np.testing.assert_allclose(got[task], scores, atol=1e-5)
    assert len({round(float(s), 5) for s in want["click"]}) > 1  # the candidates differ


def test_experts_k_lowers_the_experts_the_server_runs(fitted: Any, raw_request: Any, tmp_path: Path) -> None:
    artifact = _artifact(fitted, GateConfig(), tmp_path / "dense")
    request = (raw_request.user, raw_request.context, raw_request.all_candidates())
    dense = InferenceModel(artifact).score_requests([request])[0]
    top1 = InferenceModel(artifact, experts_k=1)
    reference = InferenceModel(artifact)
    reference.model.set_top_k(1)  # the training network with one expert per row
    want = reference.reference_score_requests([request])[0]
    got = top1.score_requests([request])[0]
    assert max(np.abs(want["click"] - dense["click"])) > 1e-4  # one expert really changes the scores
    np.testing.assert_allclose(got["click"], want["click"], atol=1e-5)
    served = _served(artifact, raw_request, ServerOptions(experts_k=1))
    np.testing.assert_allclose(served["click"], want["click"], atol=1e-5)
    with pytest.raises(ValueError, match=r"experts_k 9 does not fit .*: top_k must be an integer in \[1, 4\]"):
        InferenceModel(artifact, experts_k=9)
    with pytest.raises(ValueError, match="hash routing runs one expert per row"):
        InferenceModel(_artifact(fitted, GateConfig("hash"), tmp_path / "hash"), experts_k=1)


def test_the_artifacts_serving_k_is_the_default(fitted: Any, raw_request: Any, tmp_path: Path) -> None:
    request = (raw_request.user, raw_request.context, raw_request.all_candidates())
    own = InferenceModel(_artifact(fitted, GateConfig(serving_k=1), tmp_path / "k1"))
    given = InferenceModel(_artifact(fitted, GateConfig(), tmp_path / "plain"), experts_k=1)
    assert own.experts_k == 1
    np.testing.assert_allclose(own.score_requests([request])[0]["click"], given.score_requests([request])[0]["click"],
                               atol=1e-6)
