"""Metrics scraped over real HTTP on loopback, and the JSON log formatter."""

from __future__ import annotations

import io
import json
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.observability import (
    LATENCY_BUCKETS_S,
    STATUS_CODES,
    JsonFormatter,
    ServerMetrics,
    setup_json_logging,
    start_metrics_server,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """GET /metrics and parse every sample into ``{(name, labels): value}``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[(metric, frozenset(labels.items()))]


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    """The label sets exported under ``name``."""
    return [dict(labels) for (n, labels) in samples if n == name]


@pytest.fixture
def served() -> Iterator[tuple[ServerMetrics, int]]:
    metrics = ServerMetrics()
    port, stop = start_metrics_server(metrics)
    yield metrics, port
    stop()


def test_requests_counted_by_code(served: tuple[ServerMetrics, int]) -> None:
    m, port = served
    for _ in range(3):
        m.observe_request("OK", 0.002, candidates=10)
    m.observe_request("INVALID_ARGUMENT", 0.0003, candidates=0)
    m.observe_request(grpc.StatusCode.RESOURCE_EXHAUSTED, 0.0001, candidates=0)

    s = scrape(port)
    assert value(s, "ranker_requests_total", code="OK") == 3
    assert value(s, "ranker_requests_total", code="INVALID_ARGUMENT") == 1
    assert value(s, "ranker_requests_total", code="RESOURCE_EXHAUSTED") == 1
    # every code is exported from the start, so rate() works before the first error
    assert value(s, "ranker_requests_total", code="INTERNAL") == 0
    assert {d["code"] for d in series(s, "ranker_requests_total")} == set(STATUS_CODES)


def test_unknown_code_and_negative_values_rejected() -> None:
    m = ServerMetrics()
    with pytest.raises(ValueError, match="'BOGUS'"):
        m.observe_request("BOGUS", 0.001, candidates=1)
    with pytest.raises(ValueError, match="seconds=-1"):
        m.observe_request("OK", -1, candidates=1)
    with pytest.raises(ValueError, match="queue_depth=-2"):
        m.observe_batch(requests=1, candidates=1, queue_depth=-2)
    assert m.registry.get_sample_value("ranker_requests_total", {"code": "OK"}) == 0


def test_latency_and_candidate_histograms(served: tuple[ServerMetrics, int]) -> None:
    m, port = served
    assert LATENCY_BUCKETS_S[0] == 0.0005 and LATENCY_BUCKETS_S[-1] == 2.0
    m.observe_request("OK", 0.0004, candidates=3)
    m.observe_request("OK", 0.0007, candidates=40)
    m.observe_request("OK", 0.003, candidates=900)
    m.observe_request("DEADLINE_EXCEEDED", 3.0, candidates=1000)

    s = scrape(port)
    bucket = "ranker_request_latency_seconds_bucket"
    assert value(s, bucket, le="0.0005") == 1
    assert value(s, bucket, le="0.001") == 2
    assert value(s, bucket, le="0.005") == 3
    assert value(s, bucket, le="2.0") == 3  # 3 s is slower than the last finite bucket
    assert value(s, bucket, le="+Inf") == 4
    assert value(s, "ranker_request_latency_seconds_count") == 4
    assert value(s, "ranker_request_latency_seconds_sum") == pytest.approx(3.0041)
    assert value(s, "ranker_request_candidates_count") == 4
    assert value(s, "ranker_request_candidates_sum") == 1943
    assert value(s, "ranker_request_candidates_bucket", le="50.0") == 2
    assert value(s, "ranker_request_candidates_bucket", le="1000.0") == 4


def test_batches_and_queue_depth(served: tuple[ServerMetrics, int]) -> None:
    m, port = served
    m.observe_batch(requests=1, candidates=10, queue_depth=5)
    m.observe_batch(requests=6, candidates=600, queue_depth=2)
    s = scrape(port)
    assert value(s, "ranker_batch_requests_count") == 2
    assert value(s, "ranker_batch_requests_sum") == 7
    assert value(s, "ranker_batch_requests_bucket", le="1.0") == 1
    assert value(s, "ranker_batch_requests_bucket", le="8.0") == 2
    assert value(s, "ranker_batch_candidates_sum") == 610
    assert value(s, "ranker_batch_candidates_bucket", le="10.0") == 1
    assert value(s, "ranker_queue_depth") == 2  # the latest value, not a sum

    m.set_queue_depth(9)
    assert value(scrape(port), "ranker_queue_depth") == 9


def test_model_version_swap_replaces_label_set(served: tuple[ServerMetrics, int]) -> None:
    m, port = served
    assert series(scrape(port), "ranker_model_info") == []  # nothing claims to serve before a load
    m.set_model("ranker", "1")
    assert series(scrape(port), "ranker_model_info") == [{"name": "ranker", "version": "1"}]
    m.set_model("ranker", "2")
    s = scrape(port)
    assert series(s, "ranker_model_info") == [{"name": "ranker", "version": "2"}]
    assert value(s, "ranker_model_info", name="ranker", version="2") == 1


def test_model_loads_and_reload_failure(served: tuple[ServerMetrics, int]) -> None:
    m, port = served
    s = scrape(port)
    assert value(s, "ranker_model_loads_total", outcome="ok") == 0
    assert value(s, "ranker_model_loads_total", outcome="failed") == 0
    assert value(s, "ranker_model_reload_failed") == 0
    assert value(s, "ranker_model_last_reload_failure_timestamp_seconds") == 0

    m.model_load(ok=True)
    m.set_model("ranker", "1")
    before = datetime.now(UTC).timestamp()
    m.model_load(ok=False)  # version 2 is broken; version 1 keeps serving
    s = scrape(port)
    assert value(s, "ranker_model_loads_total", outcome="ok") == 1
    assert value(s, "ranker_model_loads_total", outcome="failed") == 1
    assert value(s, "ranker_model_reload_failed") == 1
    assert value(s, "ranker_model_last_reload_failure_timestamp_seconds") >= before - 1
    assert series(s, "ranker_model_info") == [{"name": "ranker", "version": "1"}]

    m.model_load(ok=True)
    s = scrape(port)
    assert value(s, "ranker_model_reload_failed") == 0
    assert value(s, "ranker_model_loads_total", outcome="ok") == 2
    assert value(s, "ranker_model_last_reload_failure_timestamp_seconds") >= before - 1  # history kept

    m.model_load(ok=False)
    m.clear_reload_failed()  # the alias moved back to the serving version: nothing was loaded
    s = scrape(port)
    assert value(s, "ranker_model_reload_failed") == 0
    assert value(s, "ranker_model_loads_total", outcome="ok") == 2
    assert value(s, "ranker_model_loads_total", outcome="failed") == 2


def test_two_instances_are_independent() -> None:
    a, b = ServerMetrics(), ServerMetrics()  # a second registration on one registry would raise
    port_a, stop_a = start_metrics_server(a)
    port_b, stop_b = start_metrics_server(b)
    try:
        assert port_a != port_b and port_a > 0 and port_b > 0
        a.observe_request("OK", 0.001, candidates=5)
        a.set_model("ranker", "7")
        b.observe_batch(requests=2, candidates=20, queue_depth=4)
        sa, sb = scrape(port_a), scrape(port_b)
        assert value(sa, "ranker_requests_total", code="OK") == 1
        assert value(sb, "ranker_requests_total", code="OK") == 0
        assert series(sb, "ranker_model_info") == []
        assert value(sa, "ranker_queue_depth") == 0
        assert value(sb, "ranker_queue_depth") == 4
    finally:
        stop_a()
        stop_b()


def test_stop_closes_the_port_and_is_idempotent() -> None:
    port, stop = start_metrics_server(ServerMetrics())
    assert "ranker_queue_depth" in {name for name, _ in scrape(port)}
    stop()
    stop()
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    """A record as ``logger.info(msg, *args, extra=extra)`` would make it, raising inside to get exc_info."""
    logger = logging.getLogger("serving.test")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        return logger.makeRecord(logger.name, logging.ERROR, __file__, 1, msg, args, sys.exc_info(), extra=extra)


def test_json_formatter_fields_extra_and_exception() -> None:
    rec = _record("rank failed request_id=%s n=%d", "r-1", 3, request_id="r-1", candidates=3, code="INTERNAL")
    line = JsonFormatter().format(rec)
    assert "\n" not in line  # one object per line, even with a multi-line traceback
    out = json.loads(line)
    assert out["level"] == "ERROR"
    assert out["logger"] == "serving.test"
    assert out["message"] == "rank failed request_id=r-1 n=3"
    assert (out["request_id"], out["candidates"], out["code"]) == ("r-1", 3, "INTERNAL")
    assert out["exc_info"].startswith("Traceback") and "RuntimeError: boom" in out["exc_info"]
    ts = datetime.fromisoformat(out["ts"])
    assert ts.utcoffset() == timedelta(0)
    assert abs(ts.timestamp() - rec.created) < 0.001
    # nothing of LogRecord's internals leaks
    assert not {"args", "msg", "levelno", "pathname", "exc_text"} & out.keys()


def test_json_formatter_odd_extras() -> None:
    class Opaque:
        def __repr__(self) -> str:
            return "Opaque()"

        __str__ = __repr__

    rec = logging.getLogger("x").makeRecord(
        "x", logging.INFO, __file__, 1, "hi", (), None, extra={"obj": Opaque(), "level": "mine"}
    )
    out = json.loads(JsonFormatter().format(rec))
    assert out["obj"] == "Opaque()"
    assert out["level"] == "INFO" and out["extra_level"] == "mine"
    assert "exc_info" not in out


@pytest.fixture
def root_logger() -> Iterator[Callable[[], list[logging.Handler]]]:
    """Restore the root logger's handlers and level after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield lambda: [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]
    for h in root.handlers:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def test_setup_json_logging_is_idempotent(root_logger: Callable[[], list[logging.Handler]]) -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_json_logging("DEBUG", stream=first)
    handler = setup_json_logging(logging.INFO, stream=second)
    assert root_logger() == [handler]
    assert logging.getLogger().level == logging.INFO

    log = logging.getLogger("serving")
    log.debug("hidden")
    log.info("model loaded name=%s version=%s", "ranker", "3", extra={"load_s": 1.5})
    assert first.getvalue() == ""
    lines = second.getvalue().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["message"] == "model loaded name=ranker version=3" and out["load_s"] == 1.5
