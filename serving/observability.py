"""Operations layer of the ranking server: Prometheus metrics, a ``/metrics`` endpoint, JSON logs.

Metrics live on a :class:`prometheus_client.CollectorRegistry` owned by each :class:`ServerMetrics`
(never the process-global one), so several servers, or several tests, in one process do not
collide. The server calls four small methods (``observe_request``, ``observe_batch``,
``set_model``, ``model_load``) and :func:`start_metrics_server` exposes the registry over HTTP.

Exported series (default ``namespace="ranker"``; units in the names):

* ``ranker_requests_total{code}`` counter: finished Rank RPCs by gRPC status name (``OK``, ...).
* ``ranker_request_latency_seconds`` histogram: server-side latency of one Rank RPC.
* ``ranker_request_candidates`` histogram: candidates in one request.
* ``ranker_batch_candidates`` histogram: candidates in one model batch.
* ``ranker_batch_requests`` histogram: requests merged into one model batch.
* ``ranker_queue_depth`` gauge: requests waiting for the batcher.
* ``ranker_model_info{name,version}`` gauge (value 1): the model serving now; replaced on swap.
* ``ranker_model_loads_total{outcome}`` counter: load attempts, ``ok`` / ``failed``.
* ``ranker_model_reload_failed`` gauge: 1 while the newest load attempt failed, else 0
  (cleared by the next successful load or :meth:`ServerMetrics.clear_reload_failed`).
* ``ranker_model_last_reload_failure_timestamp_seconds`` gauge: unix time of the last failed
  load (0: none yet).

Counters and histograms also export ``*_created`` series (prometheus_client's default).

Several worker processes (``ranker serve --workers N``, :mod:`serving.workers`) use prometheus_client's
multiprocess mode: the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` to a fresh directory before the
workers start, each worker's :class:`ServerMetrics` then writes its values to files there, and the
supervisor serves :class:`WorkerMetrics` (a ``MultiProcessCollector`` over that directory) on the one
``/metrics`` port. Counters and histograms are summed over every worker that ever ran (a restarted
worker's counts are kept); ``queue_depth`` is summed over live workers; ``model_info`` and
``model_reload_failed`` are the maximum over live workers (a version shows while any worker serves
it; 1 while any worker's newest load failed); the failure timestamp is the newest of all.
Multiprocess mode exports no ``*_created`` series. The supervisor adds ``ranker_workers_serving``
(gauge) and ``ranker_worker_restarts_total`` (counter).

Logs: :class:`JsonFormatter` writes one JSON object per line; :func:`setup_json_logging` installs
it on the root logger. Existing ``log.info("loaded %s", v)`` calls keep working unchanged; fields
given as ``extra={...}`` become top-level JSON keys.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TextIO
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

# Latency from a fast rejection (~0.5 ms) to a slow, large request (~2 s).
LATENCY_BUCKETS_S: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
# Candidates per request (DEFAULT_MAX_CANDIDATES is 1000) and per batch (several requests).
CANDIDATE_BUCKETS: tuple[float, ...] = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
REQUESTS_PER_BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128)

STATUS_CODES: tuple[str, ...] = tuple(c.name for c in grpc.StatusCode)  # "OK", "CANCELLED", ...
LOAD_OUTCOMES: tuple[str, ...] = ("ok", "failed")


class ServerMetrics:
    """Prometheus metrics of one ranking server, on a registry of its own.

    All methods are thread-safe (prometheus_client locks per series) and cheap enough for the
    request path. Every gRPC status code and both load outcomes are exported from the start
    (value 0), so ``rate()`` and absence-free alerts work before the first event.

    Args:
        registry: where to register; ``None`` creates a fresh :class:`CollectorRegistry`.
        namespace: prefix of every metric name.

    Example:
        >>> m = ServerMetrics()
        >>> m.observe_request("OK", 0.004, candidates=50)
        >>> m.registry.get_sample_value("ranker_requests_total", {"code": "OK"})
        1.0
        >>> m.set_model("ranker", "3")
        >>> m.registry.get_sample_value("ranker_model_info", {"name": "ranker", "version": "3"})
        1.0
    """

    def __init__(self, registry: CollectorRegistry | None = None, namespace: str = "ranker") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        on: dict[str, Any] = {"namespace": namespace, "registry": self.registry}
        self.requests = Counter("requests", "Finished Rank RPCs by gRPC status code.", ["code"], **on)
        self.latency = Histogram(
            "request_latency_seconds", "Server-side latency of one Rank RPC.", buckets=LATENCY_BUCKETS_S, **on
        )
        self.request_candidates = Histogram(
            "request_candidates", "Candidates in one Rank request.", buckets=CANDIDATE_BUCKETS, **on
        )
        self.batch_candidates = Histogram(
            "batch_candidates", "Candidates in one model batch.", buckets=CANDIDATE_BUCKETS, **on
        )
        self.batch_requests = Histogram(
            "batch_requests", "Requests merged into one model batch.", buckets=REQUESTS_PER_BATCH_BUCKETS, **on
        )
        # multiprocess_mode: how the supervisor of several workers merges a gauge (ignored in one process)
        self.queue_depth = Gauge("queue_depth", "Requests waiting for the batcher.", multiprocess_mode="livesum", **on)
        self.model = Gauge("model_info", "The model serving now (value 1).", ["name", "version"],
                           multiprocess_mode="livemax", **on)
        self._model_labels: tuple[str, str] | None = None
        self._model_lock = threading.Lock()
        # a value in a multiprocess file cannot be removed, only set to 0 (WorkerMetrics drops those)
        self._multiprocess = bool(getattr(values.ValueClass, "_multiprocess", False))
        self.model_loads = Counter("model_loads", "Model load attempts by outcome (ok / failed).", ["outcome"], **on)
        self.reload_failed = Gauge("model_reload_failed", "1 while the newest model load attempt failed, else 0.",
                                   multiprocess_mode="livemax", **on)
        self.last_reload_failure = Gauge(
            "model_last_reload_failure_timestamp_seconds", "Unix time of the last failed model load; 0: none.",
            multiprocess_mode="max", **on
        )
        for code in STATUS_CODES:
            self.requests.labels(code=code)
        for outcome in LOAD_OUTCOMES:
            self.model_loads.labels(outcome=outcome)

    def observe_request(self, code: str | grpc.StatusCode, seconds: float, candidates: int) -> None:
        """Record one finished Rank RPC.

        Args:
            code: gRPC status, as a name (``"OK"``, ``"INVALID_ARGUMENT"``) or a ``grpc.StatusCode``.
            seconds: server-side latency.
            candidates: candidates the request carried (0 if it could not be decoded).

        Raises:
            ValueError: ``code`` is not a gRPC status name (keeps label cardinality bounded), or
                ``seconds`` / ``candidates`` is negative.
        """
        name = code.name if isinstance(code, grpc.StatusCode) else code
        if name not in STATUS_CODES:
            raise ValueError(f"code: {code!r} is not a gRPC status code name (one of {', '.join(STATUS_CODES)})")
        if seconds < 0 or candidates < 0:
            raise ValueError(f"seconds={seconds!r} and candidates={candidates!r} must be >= 0")
        self.requests.labels(code=name).inc()
        self.latency.observe(seconds)
        self.request_candidates.observe(candidates)

    def observe_batch(self, requests: int, candidates: int, queue_depth: int) -> None:
        """Record one model batch formed by the dynamic batcher.

        Args:
            requests: requests merged into the batch.
            candidates: candidates in the batch (sum over its requests).
            queue_depth: requests still waiting after the batch was taken.

        Raises:
            ValueError: a negative count.
        """
        if requests < 0 or candidates < 0 or queue_depth < 0:
            msg = f"requests={requests!r}, candidates={candidates!r}, queue_depth={queue_depth!r} must be >= 0"
            raise ValueError(msg)
        self.batch_requests.observe(requests)
        self.batch_candidates.observe(candidates)
        self.queue_depth.set(queue_depth)

    def set_queue_depth(self, depth: int) -> None:
        """Update the queue depth between batches (e.g. on enqueue)."""
        self.queue_depth.set(depth)

    def set_model(self, name: str, version: str) -> None:
        """Publish the model serving now; replaces the previous ``name``/``version`` label set.

        The new series is added before the old one is removed, so a scrape never sees no model. In
        multiprocess mode the old series is set to 0 instead (files keep every series), and
        :class:`WorkerMetrics` leaves out the versions no live worker serves.
        """
        with self._model_lock:
            old, self._model_labels = self._model_labels, (name, version)
            self.model.labels(name=name, version=version).set(1)
            if old is not None and old != self._model_labels:
                if self._multiprocess:
                    self.model.labels(*old).set(0)
                else:
                    self.model.remove(*old)

    def model_load(self, ok: bool) -> None:
        """Record one model load attempt (initial load or reload).

        A failure sets ``model_reload_failed`` to 1 and stamps the failure time; the next success
        clears it. Call :meth:`set_model` as well after a successful load.
        """
        self.model_loads.labels(outcome="ok" if ok else "failed").inc()
        if ok:
            self.reload_failed.set(0)
        else:
            self.reload_failed.set(1)
            self.last_reload_failure.set_to_current_time()

    def clear_reload_failed(self) -> None:
        """The failed version no longer stands (e.g. the alias moved back); no load is counted."""
        self.reload_failed.set(0)


class _MergedWorkers(Collector):
    """Every worker's series from a multiprocess directory, merged; ``model_info`` only where 1."""

    def __init__(self, path: str, namespace: str) -> None:
        self._files = MultiProcessCollector(None, path)
        self._model_info = f"{namespace}_model_info"

    def collect(self) -> Iterator[Metric]:
        for metric in self._files.collect():
            if metric.name == self._model_info:  # versions that no live worker serves any more read 0
                metric.samples = [s for s in metric.samples if s.value != 0]
            yield metric


class _Supervisor(Collector):
    """The supervisor's own series, read from :class:`WorkerMetrics` at scrape time."""

    def __init__(self, owner: WorkerMetrics, namespace: str) -> None:
        self._owner = owner
        self._namespace = namespace

    def collect(self) -> Iterator[Metric]:
        serving = GaugeMetricFamily(f"{self._namespace}_workers_serving", "Worker processes reporting SERVING.")
        serving.add_metric([], float(self._owner.serving))
        restarts = CounterMetricFamily(
            f"{self._namespace}_worker_restarts", "Worker processes restarted after an unexpected exit."
        )
        restarts.add_metric([], float(self._owner.restarts))
        yield serving
        yield restarts


class WorkerMetrics:
    """The supervisor's registry: every worker's :class:`ServerMetrics` merged, plus its own two series.

    The workers must run with ``PROMETHEUS_MULTIPROC_DIR=path`` in their environment from their
    start (prometheus_client picks multiprocess mode when it is imported); the supervisor itself
    writes nothing there.

    Args:
        path: the multiprocess directory (fresh and empty when the first worker starts).
        namespace: the workers' metric prefix.

    Raises:
        ValueError: ``path`` is not a directory.

    Example:
        >>> import tempfile
        >>> m = WorkerMetrics(tempfile.mkdtemp())
        >>> m.set_serving(2)
        >>> m.registry.get_sample_value("ranker_workers_serving")
        2.0
    """

    def __init__(self, path: str, namespace: str = "ranker") -> None:
        self.path = path
        self.serving = 0  # written by the supervisor loop, read by scrapes (an int store is atomic)
        self.restarts = 0
        self.registry = CollectorRegistry()
        self.registry.register(_MergedWorkers(path, namespace))
        self.registry.register(_Supervisor(self, namespace))

    def set_serving(self, n: int) -> None:
        """How many workers report SERVING now."""
        self.serving = n

    def worker_restarted(self) -> None:
        """Count one restart of a worker that exited unexpectedly."""
        self.restarts += 1

    def worker_exited(self, pid: int) -> None:
        """Forget the live gauges (queue depth, model, reload failed) of a worker that is gone; its counts stay."""
        mark_process_dead(pid, self.path)


class _QuietHandler(WSGIRequestHandler):
    """Request handler that does not write an access-log line to stderr for every scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def start_metrics_server(
    metrics: ServerMetrics | WorkerMetrics, host: str = "127.0.0.1", port: int = 0
) -> tuple[int, Callable[[], None]]:
    """Serve ``metrics.registry`` in Prometheus text format over HTTP on a daemon thread.

    The app is prometheus_client's :func:`~prometheus_client.make_wsgi_app` (content negotiation,
    gzip, ``?name[]=`` filters) on its threading WSGI server, i.e. what ``start_http_server`` runs;
    the serving thread is started here instead so that it polls for shutdown every 50 ms rather
    than every 500 ms, which keeps ``stop()`` (server shutdown, every test) fast. Any path answers;
    Prometheus scrapes ``/metrics``. Nothing runs on the gRPC event loop.

    Args:
        metrics: whose registry to expose (one server's, or the merged registry of several workers).
        host: address to bind (IPv4 or IPv6; ``0.0.0.0`` to be scraped from other hosts).
        port: port to bind; 0 picks a free one.

    Returns:
        ``(bound_port, stop)``; ``stop()`` shuts the HTTP server down, closes its socket and joins
        its thread. It is idempotent.

    Raises:
        OSError: the address cannot be bound.

    Example:
        >>> port, stop = start_metrics_server(ServerMetrics())
        >>> port > 0
        True
        >>> stop()
    """
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_cls: type[ThreadingWSGIServer] = type(
        "MetricsHTTPServer", (ThreadingWSGIServer,), {"address_family": family}
    )
    httpd = make_server(host, port, make_wsgi_app(metrics.registry), server_cls, handler_class=_QuietHandler)
    bound = int(httpd.server_address[1])
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"metrics-http-{bound}", daemon=True
    )
    thread.start()
    lock = threading.Lock()
    stopped = False

    def stop() -> None:
        nonlocal stopped
        with lock:
            if stopped:
                return
            stopped = True
        httpd.shutdown()  # ends serve_forever within one poll interval
        httpd.server_close()
        thread.join(timeout=5.0)

    return bound, stop


# Attributes every LogRecord has; anything else on a record came from ``extra={...}``.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}
_HANDLER_NAME = "serving.json"  # marks the handler setup_json_logging installs


class JsonFormatter(logging.Formatter):
    """One JSON object per log record, on one line.

    Keys: ``ts`` (ISO-8601 UTC, milliseconds), ``level``, ``logger``, ``message`` (``%``-args
    applied), then every ``extra={...}`` field, then ``exc_info`` / ``stack_info`` as strings when
    present. An extra field named like a base key is written as ``extra_<name>`` instead of
    overwriting it; values JSON cannot encode are written with ``str()``.

    Example:
        >>> rec = logging.LogRecord("serving", logging.INFO, __file__, 1, "loaded %s", ("v3",), None)
        >>> rec.request_id = "r1"
        >>> out = json.loads(JsonFormatter().format(rec))
        >>> out["level"], out["logger"], out["message"], out["request_id"]
        ('INFO', 'serving', 'loaded v3', 'r1')
    """

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds")
        payload: dict[str, Any] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS:
                payload[f"extra_{key}" if key in payload else key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            payload["exc_info"] = record.exc_text
        if record.stack_info:
            payload["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(payload, default=str)


def setup_json_logging(level: int | str = logging.INFO, stream: TextIO | None = None) -> logging.Handler:
    """Log JSON lines (:class:`JsonFormatter`) from the root logger to ``stream`` (default stderr).

    Idempotent: a second call replaces the handler the first one installed (so the stream or level
    can change) rather than adding another. Other handlers on the root logger are left alone; call
    this instead of ``logging.basicConfig``, not after it, or records are written twice.

    Args:
        level: root logger level (``logging.INFO`` or ``"INFO"``).
        stream: where to write; ``None`` means ``sys.stderr``.

    Returns:
        the installed handler.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.name == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    return handler
