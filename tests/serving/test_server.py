"""The gRPC server in-process on 127.0.0.1 (free port) with a real artifact."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.ranking.v1 import ranker_pb2 as pb
from protos.ranking.v1 import ranker_pb2_grpc as pb_grpc
from ranking.inference import InferenceModel
from serving.client import RankerClient, encode_column, format_ranking
from serving.holder import ModelHolder
from serving.server import SERVICE_NAME, create_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_goes_not_serving_to_serving_and_back(workspace: Any, raw_request: Any) -> None:
    async def scenario() -> list[Any]:
        rs = create_server(ModelHolder(str(workspace.artifact)), port=0)
        seen: list[Any] = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{rs.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def status(service: str) -> Any:
                return (await health.Check(health_pb2.HealthCheckRequest(service=service))).status

            await rs.start()  # start_server's sequence, step by step
            seen += [await status(""), await status(SERVICE_NAME)]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.RankerStub(channel).Rank(raw_request.to_proto())
            seen.append(err.value.code())
            await rs.activate()
            seen += [await status(""), await status(SERVICE_NAME)]
            await rs.health.enter_graceful_shutdown()
            seen += [await status(""), await status(SERVICE_NAME)]
        await rs.stop(0)
        return seen

    seen = asyncio.run(scenario())
    unavailable = grpc.StatusCode.UNAVAILABLE
    assert seen == [NOT_SERVING, NOT_SERVING, unavailable, SERVING, SERVING, NOT_SERVING, NOT_SERVING]


@pytest.fixture(scope="module")
def stub(server: Any) -> Any:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.RankerStub(channel)


def _expected(model: InferenceModel, raw: Any, weights: dict[str, float] | None = None) -> tuple[Any, Any]:
    scores = model.score_request(raw.user, raw.context, raw.all_candidates())
    return scores, model.combine(scores, weights)


def test_rank_returns_all_candidates_best_first_with_model_scores(
    stub: Any, raw_request: Any, model: InferenceModel
) -> None:
    resp = stub.Rank(raw_request.to_proto(request_id="r-1"))
    scores, combined = _expected(model, raw_request)
    n = len(raw_request.item_ids)
    assert (resp.request_id, resp.model_name, resp.model_version) == ("r-1", "ranker", "1")
    assert resp.server_time_us > 0
    assert len(resp.candidates) == n
    idx = [c.index for c in resp.candidates]
    assert sorted(idx) == list(range(n))
    got = np.array([c.score for c in resp.candidates])
    assert np.all(np.diff(got) <= 0), "not sorted by combined score, descending"
    np.testing.assert_allclose(got, combined[idx], rtol=1e-6)
    assert idx == np.argsort(-combined, kind="stable").tolist()
    assert [c.item_id for c in resp.candidates] == [str(raw_request.item_ids[i]) for i in idx]
    for task, s in scores.items():
        np.testing.assert_allclose([c.objective_scores[task] for c in resp.candidates], s[idx], rtol=1e-6)


def test_top_k_returns_the_best_k(stub: Any, raw_request: Any) -> None:
    full = stub.Rank(raw_request.to_proto())
    top = stub.Rank(raw_request.to_proto(top_k=3))
    assert [c.index for c in top.candidates] == [c.index for c in full.candidates][:3]
    assert len(stub.Rank(raw_request.to_proto(top_k=1000)).candidates) == len(raw_request.item_ids)


def test_weight_override_follows_combine(stub: Any, raw_request: Any, model: InferenceModel) -> None:
    weights = {"click": 0.0, "like": 0.0, "dismiss": 0.0, "watch_time": 1.0}
    resp = stub.Rank(raw_request.to_proto(objective_weights=weights))
    scores, combined = _expected(model, raw_request, weights)
    idx = [c.index for c in resp.candidates]
    assert idx == np.argsort(-combined, kind="stable").tolist()
    np.testing.assert_allclose([c.score for c in resp.candidates], scores["watch_time"][idx], rtol=1e-6)
    assert idx != [c.index for c in stub.Rank(raw_request.to_proto()).candidates]


def _short_duration(req: pb.RankRequest) -> None:
    req.candidates.features["duration_s"].CopyFrom(encode_column([1.0, 2.0]))


def _unknown_context(req: pb.RankRequest) -> None:
    req.context["weather"].string_value = "rain"


def _unknown_objective(req: pb.RankRequest) -> None:
    req.objective_weights["revenue"] = 1.0


def _negative_weight(req: pb.RankRequest) -> None:
    req.objective_weights["like"] = -1.0


def _too_many(req: pb.RankRequest) -> None:
    ids = list(range(1001))
    req.candidates.CopyFrom(pb.Candidates(item_ids=encode_column(ids)))


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_short_duration, "candidates.features['duration_s']: 2 values, expected 10"),
        (_unknown_context, "context['weather']"),
        (_unknown_objective, "unknown objective 'revenue'"),
        (_negative_weight, "objective weight for 'like'"),
        (_too_many, "candidates.item_ids: 1001 candidates, at most 1000"),
    ],
)
def test_bad_requests_are_invalid_argument(stub: Any, raw_request: Any, mutate: Any, field: str) -> None:
    req = raw_request.to_proto()
    mutate(req)
    with pytest.raises(grpc.RpcError) as err:
        stub.Rank(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


def test_model_version_pin(stub: Any, raw_request: Any) -> None:
    assert stub.Rank(raw_request.to_proto(model_version="1")).model_version == "1"
    with pytest.raises(grpc.RpcError) as err:
        stub.Rank(raw_request.to_proto(model_version="2"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "model_version: '2' requested, '1' is loaded" in err.value.details()


def test_reflection_lists_the_ranker(server: Any) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        (resp,) = list(stub.ServerReflectionInfo(iter([req]), timeout=5))
    names = {s.name for s in resp.list_services_response.service}
    assert {"ranking.v1.Ranker", "grpc.health.v1.Health"} <= names


def test_client_ranks_against_the_server(server: Any, raw_request: Any, model: InferenceModel) -> None:
    with RankerClient(server.target) as client:
        client.wait_ready(timeout_s=5)
        resp = client.rank(
            raw_request.user,
            raw_request.context,
            raw_request.candidates,
            raw_request.item_ids,
            objective_weights={"like": 3.0},
            top_k=5,
            request_id="client-1",
        )
    _, combined = _expected(model, raw_request, {"like": 3.0})
    assert [c.index for c in resp.candidates] == np.argsort(-combined, kind="stable")[:5].tolist()
    table = format_ranking(resp, limit=3).splitlines()
    assert table[0].startswith("ranker v1, 5 candidates, ") and table[0].endswith(" ms on the server")
    assert table[1].split() == ["rank", "item_id", "score", "click", "dismiss", "like", "watch_time"]
    assert len(table) == 2 + 3
    assert table[2].split()[:2] == ["1", resp.candidates[0].item_id]


def test_client_errors_carry_the_status(server: Any, raw_request: Any) -> None:
    with RankerClient(server.target) as client, pytest.raises(grpc.RpcError) as err:
        client.rank(raw_request.user, {}, raw_request.candidates, raw_request.item_ids)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context['device']: missing context feature" in err.value.details()


def test_wait_ready_times_out_without_a_server() -> None:
    with RankerClient("127.0.0.1:1") as client, pytest.raises(TimeoutError, match="not SERVING"):
        client.wait_ready(timeout_s=0.3)


def test_serve_writes_ready_file_and_stops_on_sigterm(workspace: Any, raw_request: Any, tmp_path: Path) -> None:
    ready = tmp_path / "port"
    code = (
        "import asyncio, logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr); "
        "from serving.server import serve; "
        f"asyncio.run(serve({str(workspace.artifact)!r}, port=0, grace_s=1.0, ready_file={str(ready)!r}))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), f"server did not get ready (exit code {proc.poll()})"
        with RankerClient(f"127.0.0.1:{int(ready.read_text())}") as client:
            client.wait_ready(timeout_s=5)
            resp = client.rank(raw_request.user, raw_request.context, raw_request.candidates, raw_request.item_ids)
        assert len(resp.candidates) == len(raw_request.item_ids)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    for event in (
        "started host=127.0.0.1",
        "model loaded name=ranker version=1",
        "serving name=ranker",
        "signal received",
        "stopped port=",
    ):
        assert event in err


def test_start_server_result_unpacks_as_server_port_holder(server: Any) -> None:
    grpc_server, port, holder = server.rs
    assert grpc_server is server.rs.server and port == server.rs.port > 0
    assert holder.current is not None and holder.current.version == "1"
