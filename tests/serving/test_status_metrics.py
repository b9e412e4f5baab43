"""Server metrics agree with what clients see, and no log line grows with a request.

A real server on loopback answers hostile requests (bytes that are not a ``RankRequest``, an
answer over the message limit, an expired client deadline, a client cancel, a 4 MiB
``request_id``); ``ranker_requests_total{code}`` scraped from its ``/metrics`` endpoint must count
each RPC once, with the very status code the client received.
"""

from __future__ import annotations

import logging
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.ranking.v1 import ranker_pb2 as pb
from protos.ranking.v1 import ranker_pb2_grpc as pb_grpc
from serving.batcher import BatcherConfig
from serving.client import build_request
from serving.observability import STATUS_CODES
from serving.server import ServerOptions, _clipped_traceback, clip

from .conftest import BackgroundServer, RawRequest

Code = grpc.StatusCode
RANK = "/ranking.v1.Ranker/Rank"
BIG = 250_000  # candidates (12 MB): ranked in about a second here, well past a 0.4 s deadline
SMALL_LIMIT = 4096  # bytes: a few dozen candidates fit in a request, not in their answer
LOG_RECORD_LIMIT = 4096  # characters: what one log record of a 4 MiB request may write at most


def scrape(port: int) -> dict[str, float]:
    """``ranker_requests_total`` by code, plus the latency and candidate histogram counts, from ``/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "ranker_requests_total":
                out[s.labels["code"]] = s.value
            elif s.name in ("ranker_request_latency_seconds_count", "ranker_request_candidates_count",
                            "ranker_batch_requests_count"):
                out[s.name] = s.value
    return out


def counted_since(before: dict[str, float], port: int) -> dict[str, float]:
    """Non-zero increases of every series in :func:`scrape` since ``before``."""
    now = scrape(port)
    return {k: now[k] - before.get(k, 0.0) for k in now if now[k] != before.get(k, 0.0)}


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll until ``condition()`` holds (a client-side deadline or cancel reaches the server a little later)."""
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"not reached within {timeout_s}s")
        time.sleep(0.02)


def tiled(raw: RawRequest, n: int, **kwargs: Any) -> pb.RankRequest:
    """The logged slate repeated to ``n`` candidates."""
    reps = -(-n // len(raw.item_ids))
    candidates = {k: (v * reps)[:n] for k, v in raw.candidates.items()}
    return build_request(raw.user, raw.context, candidates, (raw.item_ids * reps)[:n], **kwargs)


def requests_total(counts: dict[str, float]) -> float:
    return sum(v for k, v in counts.items() if k in STATUS_CODES)


@pytest.fixture(scope="module")
def bg(workspace: Any) -> Iterator[BackgroundServer]:
    """Batching off: a request runs at once on its own thread, so nothing but its size makes it slow."""
    opts = ServerOptions(metrics_port=0, max_candidates=2 * BIG, batching=BatcherConfig(enabled=False))
    server = BackgroundServer(workspace.artifact, opts)
    yield server
    server.close()


@pytest.fixture(scope="module")
def channel(bg: BackgroundServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(bg.target) as ch:
        yield ch


def metrics_port(bg: BackgroundServer) -> int:
    assert bg.rs.metrics_port is not None
    return bg.rs.metrics_port


def test_garbage_bytes_answer_and_count_invalid_argument(bg: BackgroundServer, channel: grpc.Channel) -> None:
    raw_rank = channel.unary_unary(RANK, request_serializer=None, response_deserializer=None)
    before = scrape(metrics_port(bg))
    with pytest.raises(grpc.RpcError) as err:
        raw_rank(b"\xff\xff\xff\xff not a protobuf", timeout=10)
    assert err.value.code() == Code.INVALID_ARGUMENT
    assert err.value.details().startswith("request: not a RankRequest")
    assert counted_since(before, metrics_port(bg)) == {
        "INVALID_ARGUMENT": 1,
        "ranker_request_latency_seconds_count": 1,
        "ranker_request_candidates_count": 1,
    }


def test_answer_over_the_message_limit_is_resource_exhausted_on_both_sides(
    workspace: Any, raw_request: RawRequest
) -> None:
    server = BackgroundServer(workspace.artifact, ServerOptions(metrics_port=0, max_message_bytes=SMALL_LIMIT))
    try:
        port = server.rs.metrics_port
        assert port is not None
        req = tiled(raw_request, 60)
        assert req.ByteSize() < SMALL_LIMIT  # the request itself is let in
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.RankerStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.Rank(req, timeout=30)
            assert err.value.code() == Code.RESOURCE_EXHAUSTED
            details = err.value.details()
            assert f"over the server's {SMALL_LIMIT}-byte message limit" in details and "top_k" in details
            size = int(details.removeprefix("response: ").split(" bytes")[0])
            assert size > SMALL_LIMIT
            short = stub.Rank(tiled(raw_request, 60, top_k=5), timeout=30)  # the same request, cut: it fits
            assert len(short.candidates) == 5
        counts = scrape(port)
        assert counts["RESOURCE_EXHAUSTED"] == 1 and counts["OK"] == 1
        assert requests_total(counts) == 2 == counts["ranker_request_latency_seconds_count"]
    finally:
        server.close()


def test_expired_client_deadline_counts_deadline_exceeded(
    bg: BackgroundServer, channel: grpc.Channel, raw_request: RawRequest
) -> None:
    port = metrics_port(bg)
    before = scrape(port)
    t = time.perf_counter()
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.RankerStub(channel).Rank(tiled(raw_request, BIG, top_k=1), timeout=0.4)
    assert err.value.code() == Code.DEADLINE_EXCEEDED
    assert time.perf_counter() - t < 5  # the client gave up at its deadline, not when the server finished
    wait_for(lambda: requests_total(counted_since(before, port)) >= 1)
    counted = counted_since(before, port)
    assert counted["DEADLINE_EXCEEDED"] == 1
    assert requests_total(counted) == 1  # neither CANCELLED nor, once the thread finishes, OK


def test_client_cancel_counts_cancelled(bg: BackgroundServer, channel: grpc.Channel, raw_request: RawRequest) -> None:
    port = metrics_port(bg)
    before = scrape(port)
    future = pb_grpc.RankerStub(channel).Rank.future(tiled(raw_request, BIG, top_k=1), timeout=60)
    # the server has the request once it started ranking it (one "batch" per request, batching off)
    wait_for(lambda: counted_since(before, port).get("ranker_batch_requests_count", 0) >= 1)
    assert future.cancel()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    wait_for(lambda: requests_total(counted_since(before, port)) >= 1)
    counted = counted_since(before, port)
    assert counted["CANCELLED"] == 1 and requests_total(counted) == 1
    assert counted["ranker_request_candidates_count"] == 1


def test_rejected_request_with_a_4_mib_request_id_logs_a_few_kb(
    bg: BackgroundServer, channel: grpc.Channel, raw_request: RawRequest, caplog: pytest.LogCaptureFixture
) -> None:
    huge = "r" * (4 << 20)
    stub = pb_grpc.RankerStub(channel)
    requests = [
        raw_request.to_proto(request_id=huge, objective_weights={"nope": 1.0}),  # unknown objective
        raw_request.to_proto(request_id=huge, objective_weights={"o" * (1 << 20): 1.0}),  # quoted in the error
    ]
    caplog.set_level(logging.DEBUG, logger="serving")
    for req in requests:
        with pytest.raises(grpc.RpcError) as err:
            stub.Rank(req, timeout=30)
        assert err.value.code() == Code.INVALID_ARGUMENT
        assert len(err.value.details()) < 2000  # the client's details are bounded as well
    records = [r for r in caplog.records if r.name.startswith("serving")]
    rejected = [r for r in records if r.getMessage().startswith("rank rejected")]
    assert len(rejected) == 2, [r.getMessage()[:100] for r in records]
    for r in records:
        assert len(r.getMessage()) < LOG_RECORD_LIMIT, r.getMessage()[:300]
    assert f"({len(huge)} characters)" in rejected[0].getMessage()  # cut, and says so


def test_every_call_counted_once_with_the_clients_code(
    workspace: Any, raw_request: RawRequest
) -> None:
    """A fresh server, a mix of answers: per code and in total, the metric equals what clients saw."""
    server = BackgroundServer(workspace.artifact, ServerOptions(metrics_port=0, max_message_bytes=SMALL_LIMIT))
    try:
        port = server.rs.metrics_port
        assert port is not None
        calls: list[tuple[str, Any]] = [
            ("stub", raw_request.to_proto(request_id="fine")),
            ("stub", raw_request.to_proto(top_k=3)),
            ("stub", raw_request.to_proto(model_version="1")),
            ("raw", b"\x0a\xff"),  # a truncated length-delimited field
            ("stub", raw_request.to_proto(objective_weights={"nope": 1.0})),
            ("stub", raw_request.to_proto(model_version="2")),
            ("stub", tiled(raw_request, 60)),  # answer over the limit
            ("stub", tiled(raw_request, 200)),  # request over the limit: refused before any handler
        ]
        seen: dict[str, int] = {}
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.RankerStub(ch)
            raw_rank = ch.unary_unary(RANK, request_serializer=None, response_deserializer=None)
            for kind, req in calls:
                try:
                    (raw_rank if kind == "raw" else stub.Rank)(req, timeout=30)
                    code = Code.OK
                except grpc.RpcError as e:
                    code = e.code()
                seen[code.name] = seen.get(code.name, 0) + 1
        assert seen == {"OK": 3, "INVALID_ARGUMENT": 2, "FAILED_PRECONDITION": 1, "RESOURCE_EXHAUSTED": 2}
        counts = scrape(port)
        # grpc refuses a request over the receive limit before the handler sees it: the one uncounted case
        expected = {**seen, "RESOURCE_EXHAUSTED": 1}
        assert {k: v for k, v in counts.items() if k in STATUS_CODES and v} == expected
        assert requests_total(counts) == len(calls) - 1 == counts["ranker_request_latency_seconds_count"]
    finally:
        server.close()


def test_clip_and_clipped_traceback_bound_caller_text() -> None:
    assert clip("r-1") == "r-1"
    assert clip("x" * 201) == "x" * 200 + "... (201 characters)"
    assert clip(KeyError("k"), limit=10) == "'k'"
    try:
        try:
            raise KeyError("a" * 1_000_000)
        except KeyError as inner:
            raise RuntimeError("b" * 1_000_000) from inner
    except RuntimeError as e:
        text = _clipped_traceback(e)
    assert len(text) < 5000
    assert "KeyError: 'aaa" in text and "RuntimeError: bbb" in text  # both links of the chain, cut
    lengths = [int(n) for n in re.findall(r"\.\.\. \((\d+) characters\)", text)]
    assert len(lengths) == 2 and min(lengths) > 1_000_000  # each message cut, saying how long it was
    assert "test_clip_and_clipped_traceback_bound_caller_text" in text  # the frames are kept
