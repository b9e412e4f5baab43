"""The gRPC server: ``ranking.v1.Ranker`` on ``grpc.aio``, with health checking and reflection.

Lifecycle (one log line each, logger ``serving``): bind and start with health NOT_SERVING ->
load and warm the model in a worker thread -> SERVING (and, with ``reload_interval_s``, poll the
model URI and swap in new versions) -> on SIGINT/SIGTERM NOT_SERVING, stop accepting, let requests
in flight finish within ``grace_s`` -> stopped.

Requests go through a dynamic batcher (``serving.batcher``): decoding and the fitted transform run
per request, the forward pass once per batch of requests; batching can be switched off. Metrics
(``serving.observability``) are served on their own HTTP port when ``metrics_port`` is set.

Run it from Python::

    import asyncio
    from serving.server import serve
    asyncio.run(serve("models:/ranker@champion", port=50051, tracking_uri="sqlite:///mlflow.db"))

Shape letters: C candidates, K returned candidates (``top_k`` or C).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from protos.ranking.v1 import ranker_pb2 as pb
from protos.ranking.v1 import ranker_pb2_grpc as pb_grpc
from serving import defaults
from serving.batcher import BatcherClosed, BatcherConfig, BatchObserver, DeadlineExceeded, DynamicBatcher, QueueFull
from serving.decode import DEFAULT_MAX_CANDIDATES, DecodedRequest, decode_request
from serving.holder import LoadedModel, ModelHolder, ReloadEvent
from serving.observability import ServerMetrics, start_metrics_server

log = logging.getLogger("serving")

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Ranker"].full_name  # "ranking.v1.Ranker"
if SERVICE_NAME != defaults.HEALTH_SERVICE:  # the deployment's probes ask for the name in defaults
    raise ImportError(f"serving.defaults.HEALTH_SERVICE {defaults.HEALTH_SERVICE!r} is not the API's {SERVICE_NAME!r}")
_HEALTH_SERVICES = ("", SERVICE_NAME)  # "" is the server as a whole


@dataclass(frozen=True)
class ServerOptions:
    """How a server binds, batches, reloads and reports; every ``ranker serve`` option.

    Args:
        host, port: address to bind (port 0 picks a free one).
        max_candidates: the most candidates one request may carry (more: INVALID_ARGUMENT).
        max_message_bytes: the largest request or response message, in bytes.
        tls_cert, tls_key: PEM files; both or neither (plaintext).
        batching: the dynamic batcher's knobs (``BatcherConfig``; ``enabled=False`` turns it off).
        reload_interval_s: poll the model URI this often and swap in a new version; 0 = never.
        metrics_port: serve Prometheus ``/metrics`` on this port of ``host``; None = no endpoint, 0 = a free one.
        reuse_port: bind with the gRPC option ``grpc.so_reuseport=1`` so that several processes
            share ``host:port`` (``serving.workers``); False leaves gRPC's default.
        compile: compile each loaded model's serving network ahead of time (AOTInductor, see
            ``InferenceModel.compile``: 15-50 s the first time an artifact is loaded, in the loading
            thread, then a cached package; eager when it fails or disagrees).
        experts_k: experts per row for every model this server loads (``InferenceModel``); 0 =
            each artifact's ``gate.serving_k``, else as trained.
        max_connection_age_s: close a client connection this old with GOAWAY (gRPC's
            ``grpc.max_connection_age_ms``, with :attr:`grace_s` for the calls on it to finish): the
            client reconnects at once without failing a call, and a client balancing over a headless
            Service re-resolves, so replicas added since get their share; 0 = never (gRPC's default).
        drain_s: on SIGTERM (:func:`serve`), the seconds between health going NOT_SERVING and the
            server refusing new calls: clients that watch health (``serving.client.BALANCED_SERVICE_CONFIG``)
            send their new calls elsewhere meanwhile, and the calls that still come are served.
        grace_s: at shutdown, the seconds calls in flight get to finish (also the connection-age grace).
    """

    host: str = defaults.HOST
    port: int = 0
    max_candidates: int = DEFAULT_MAX_CANDIDATES
    max_message_bytes: int = defaults.MAX_MESSAGE_MB * 1024 * 1024
    tls_cert: str | None = None
    tls_key: str | None = None
    batching: BatcherConfig = field(default_factory=BatcherConfig)
    reload_interval_s: float = defaults.RELOAD_INTERVAL_S
    metrics_port: int | None = None
    reuse_port: bool = False
    compile: bool = False
    experts_k: int = 0
    max_connection_age_s: float = defaults.MAX_CONNECTION_AGE_S
    drain_s: float = defaults.DRAIN_S
    grace_s: float = defaults.GRACE_S

    def __post_init__(self) -> None:
        if self.experts_k < 0:
            raise ValueError(f"experts_k must be >= 0 (0: the artifact's own), got {self.experts_k}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {self.max_candidates}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: file not found: {path!r}")
        if not (math.isfinite(self.reload_interval_s) and self.reload_interval_s >= 0):
            raise ValueError(f"reload_interval_s must be finite and >= 0, got {self.reload_interval_s}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        for name in ("max_connection_age_s", "drain_s", "grace_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")


@dataclass(frozen=True)
class Job:
    """One request waiting in the batcher, with the model snapshot it started on."""

    loaded: LoadedModel
    req: pb.RankRequest


def rank_batch(jobs: list[Job], max_candidates: int = DEFAULT_MAX_CANDIDATES) -> list[pb.RankResponse | Exception]:
    """Score and order requests, one forward pass per model snapshot (blocking; CPU-bound).

    Every error names the field: a malformed request (``DecodeError``), features the transform
    rejects, an unknown objective or a negative weight (``ValueError``). A request that fails to
    decode or to combine gets its own exception in its slot; the others are answered. If the
    shared forward raises (a request the transform rejects), the exception propagates and the
    batcher ranks the requests one by one, so only that request fails.
    """
    out: list[pb.RankResponse | Exception | None] = [None] * len(jobs)
    decoded: dict[int, DecodedRequest] = {}
    by_model: dict[int, list[int]] = {}  # a reload may put two snapshots in one batch
    for i, job in enumerate(jobs):
        try:
            decoded[i] = decode_request(job.req, job.loaded.model.fitted, max_candidates)
            by_model.setdefault(id(job.loaded), []).append(i)
        except ValueError as e:
            out[i] = e
    for members in by_model.values():
        loaded = jobs[members[0]].loaded
        scores = loaded.model.score_requests(
            [(decoded[i].user, decoded[i].context, decoded[i].candidates) for i in members]
        )
        for i, s in zip(members, scores, strict=True):
            try:
                out[i] = respond(loaded, jobs[i].req, decoded[i], s)
            except ValueError as e:
                out[i] = e
    return [r for r in out if r is not None]


_CANDIDATES_FORMATS = frozenset({pb.RESPONSE_FORMAT_CANDIDATES, pb.RESPONSE_FORMAT_BOTH})
_COLUMNS_FORMATS = frozenset({pb.RESPONSE_FORMAT_COLUMNS, pb.RESPONSE_FORMAT_BOTH})


def respond(
    loaded: LoadedModel, req: pb.RankRequest, decoded: DecodedRequest, scores: dict[str, np.ndarray]
) -> pb.RankResponse:
    """Combine the objectives' scores (request weights over the model's), order, cut to ``top_k``.

    The ranking goes out in the form ``req.response_format`` asks for: ``candidates`` (one message
    per candidate, v1), ``ranked`` (columns, filled with bulk ``extend``), or both.

    Raises:
        ValueError: an unknown objective or a negative weight (``combine``), or a
            ``response_format`` this server does not know (proto3 enums are open).
    """
    fmt = req.response_format
    if fmt not in _CANDIDATES_FORMATS | _COLUMNS_FORMATS:
        known = ", ".join(f"{pb.ResponseFormat.Name(v)} ({v})" for v in pb.ResponseFormat.values())
        raise ValueError(f"response_format: unknown value {fmt}; expected one of {known}")
    combined = loaded.model.combine(scores, decoded.weights)  # (C,); weights checked at decode
    order = np.argsort(-combined, kind="stable")  # (C,) best first, ties in request order
    if req.top_k:
        order = order[: req.top_k]  # (K,)
    per_task = {t: s[order].tolist() for t, s in scores.items()}  # task -> K floats
    index, score = order.tolist(), combined[order].tolist()  # (K,) each
    resp = pb.RankResponse(request_id=req.request_id, model_name=loaded.name, model_version=loaded.version)
    if fmt in _CANDIDATES_FORMATS:
        for j, (i, total) in enumerate(zip(index, score, strict=True)):
            resp.candidates.add(
                item_id=decoded.item_ids[i], index=i, score=total,
                objective_scores={t: v[j] for t, v in per_task.items()},
            )
    if fmt in _COLUMNS_FORMATS:
        _fill_columns(resp.ranked, decoded.item_ids, order, index, score, per_task)
    return resp


def _fill_columns(
    ranked: pb.RankedColumns, item_ids: list[str], order: np.ndarray, index: list[int], score: list[float],
    per_task: dict[str, list[float]],
) -> None:
    """``RankedColumns`` of the K candidates in ``order`` (K,): one bulk ``extend`` per column, no loop per candidate.

    ``item_ids`` (C,) are the request's ids; ``index``, ``score`` and every ``per_task`` list are
    already in ``order``.
    """
    ranked.SetInParent()  # present whatever the columns hold: the caller asked for this form
    ranked.item_ids.extend(np.asarray(item_ids, dtype=object)[order].tolist())  # gathered in C, (K,)
    ranked.index.extend(index)
    ranked.score.extend(score)
    for task, values in per_task.items():
        ranked.objective_scores[task].values.extend(values)


class RankerServicer(pb_grpc.RankerServicer):
    """``Rank``: snapshot the current model, queue the request in the batcher, map errors to status codes.

    The server registers :meth:`answer` through :func:`_add_ranker`, which counts every RPC with
    the status its client receives; :meth:`Rank` is the plain servicer method (nothing counted).
    """

    def __init__(self, holder: ModelHolder, batcher: DynamicBatcher[Job, pb.RankResponse]) -> None:
        self._holder = holder
        self._batcher = batcher

    async def Rank(self, request: pb.RankRequest, context: grpc.aio.ServicerContext) -> pb.RankResponse:
        result = await self.answer(request, context)
        if isinstance(result, Failure):
            await _abort(context, result)
        return result

    async def answer(self, request: pb.RankRequest, context: grpc.aio.ServicerContext) -> pb.RankResponse | Failure:
        """The ranking, or the failure to answer with; raises only on cancellation (or a bug)."""
        checked = _precondition(self._holder.current, request)  # one model snapshot per request
        return checked if isinstance(checked, Failure) else await self._submit(checked, request, context)

    async def _submit(self, loaded: LoadedModel, req: pb.RankRequest,
                      context: grpc.aio.ServicerContext) -> pb.RankResponse | Failure:
        remaining = context.time_remaining()  # None without a client deadline
        deadline = None if remaining is None else time.monotonic() + remaining
        try:
            return await self._batcher.submit(Job(loaded, req), max(_n_candidates(req), 1), deadline)
        except QueueFull as e:
            return Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded, retry later: {e}")
        except DeadlineExceeded as e:
            return Failure(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        except BatcherClosed as e:
            return Failure(grpc.StatusCode.UNAVAILABLE, str(e))
        except ValueError as e:
            log.info("rank rejected request_id=%s: %s", clip(req.request_id), clip(e, _MAX_DETAILS))
            return Failure(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:
            log.error("rank failed request_id=%s\n%s", clip(req.request_id), _clipped_traceback(e))
            return Failure(grpc.StatusCode.INTERNAL, "internal error while ranking; see the server log")


def _n_candidates(req: pb.RankRequest) -> int:
    """How many item ids a request carries (before any validation; 0 when the column is unset)."""
    kind = req.candidates.item_ids.WhichOneof("kind")
    if kind is None:
        return 0
    part = getattr(req.candidates.item_ids, kind)
    return len(part.lengths) if hasattr(part, "lengths") else len(part.values)


class _BatchMetrics(BatchObserver):
    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def on_batch(self, n_requests: int, n_candidates: int, queue_depth: int) -> None:
        self.metrics.observe_batch(n_requests, n_candidates, queue_depth)


def _reload_listener(metrics: ServerMetrics) -> Callable[[ReloadEvent], None]:
    """Holder events -> metrics: loads by outcome, the serving version, the reload-failed gauge."""

    def on_reload(event: ReloadEvent) -> None:
        if event.kind == "cleared":
            metrics.clear_reload_failed()
            return
        metrics.model_load(event.ok)
        if event.ok and event.model is not None:
            metrics.set_model(event.model.name, event.model.version)

    return on_reload


@dataclass(frozen=True)
class Failure:
    """A request that ends in a status other than OK: the code and the details its client reads."""

    code: grpc.StatusCode
    message: str


_MAX_DETAILS = 1024  # characters; gRPC clients drop trailers past 8-16 KiB and report RESOURCE_EXHAUSTED
_LOG_VALUE_CHARS = 200  # characters of one caller-sent value (a request_id) in a log line


def clip(value: object, limit: int = _LOG_VALUE_CHARS) -> str:
    """``str(value)`` cut to ``limit`` characters, saying how long it was; for caller-sent text in logs.

    Example:
        >>> clip("r-1")
        'r-1'
        >>> clip("x" * 500, limit=4)
        'xxxx... (500 characters)'
    """
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _clipped_traceback(error: BaseException, limit: int = _MAX_DETAILS) -> str:
    """The traceback of ``error`` (chained ones too), each part cut to ``limit`` characters.

    Exception messages may quote names and values sent by the caller; the frames are the code's own.
    """
    parts = traceback.TracebackException.from_exception(error).format()
    return "".join(clip(part.rstrip("\n"), limit) + "\n" for part in parts).rstrip("\n")


async def _abort(context: grpc.aio.ServicerContext, failure: Failure) -> NoReturn:
    """Answer ``failure`` (details cut to ``_MAX_DETAILS``: errors quote names and values sent by the caller)."""
    await context.abort(failure.code, clip(failure.message, _MAX_DETAILS))  # raises
    raise AssertionError("grpc.aio ServicerContext.abort returned")


def _precondition(loaded: LoadedModel | None, req: pb.RankRequest) -> LoadedModel | Failure:
    if loaded is None:
        return Failure(grpc.StatusCode.UNAVAILABLE, "model is not loaded yet; retry when health is SERVING")
    if req.model_version and req.model_version != loaded.version:
        msg = f"model_version: {req.model_version!r} requested, {loaded.version!r} is loaded"
        return Failure(grpc.StatusCode.FAILED_PRECONDITION, msg)
    return loaded


@dataclass
class RankingServer:
    """A bound (not necessarily started) server with its model holder, batcher, metrics and health.

    Unpacks as ``server, port, holder`` (what :func:`start_server` promises).
    """

    server: grpc.aio.Server
    host: str
    port: int  # the bound port (the free one picked when 0 was asked for)
    holder: ModelHolder
    health: health_aio.HealthServicer
    batcher: DynamicBatcher[Job, pb.RankResponse]
    metrics: ServerMetrics
    options: ServerOptions
    metrics_port: int | None = None  # the bound metrics port, once started
    _stop_metrics: Callable[[], None] | None = None
    _stop_polling: asyncio.Event | None = None
    _polling: asyncio.Task[None] | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.server, self.port, self.holder))

    async def start(self) -> None:
        """Start accepting RPCs with health NOT_SERVING (Rank answers UNAVAILABLE until activated)."""
        await _set_health(self.health, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.options.metrics_port is not None:
            self.metrics_port, self._stop_metrics = start_metrics_server(
                self.metrics, self.host, self.options.metrics_port
            )
        await self.server.start()
        log.info("started host=%s port=%d tls=%s metrics_port=%s health=NOT_SERVING", self.host, self.port,
                 self.options.tls_cert is not None, self.metrics_port)

    async def activate(self) -> LoadedModel:
        """Load and warm the model in a worker thread (health keeps answering), then SERVING; start polling."""
        loaded = await asyncio.to_thread(self.holder.load)
        await _set_health(self.health, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving name=%s version=%s port=%d", loaded.name, loaded.version, self.port)
        if self.options.reload_interval_s > 0:
            self._stop_polling = asyncio.Event()
            self._polling = asyncio.create_task(
                self.holder.run_polling(self.options.reload_interval_s, self._stop_polling)
            )
        return loaded

    async def stop(self, grace_s: float = defaults.GRACE_S) -> None:
        """NOT_SERVING, stop accepting RPCs, give those in flight ``grace_s`` seconds to finish."""
        log.info("stopping port=%d grace=%.1fs", self.port, grace_s)
        if self._stop_polling is not None and self._polling is not None:
            self._stop_polling.set()
            await self._polling
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        await self.batcher.close()
        self.holder.close()
        if self._stop_metrics is not None:
            self._stop_metrics()
        log.info("stopped port=%d", self.port)


def _add_ranker(servicer: RankerServicer, server: grpc.aio.Server, metrics: ServerMetrics,
                max_response_bytes: int) -> None:
    """``add_RankerServicer_to_server``, counting every Rank RPC once with the status its client receives.

    The status is decided here, and counted before the answer leaves (a client never sees an
    uncounted request): bytes that do not parse as a ``RankRequest`` answer INVALID_ARGUMENT
    (grpc.aio answers UNKNOWN when its deserializer raises); an answer over ``max_response_bytes``
    answers RESOURCE_EXHAUSTED naming both sizes (grpc would fail the send with a bare "message
    larger than max" the metric never saw); an unexpected error answers INTERNAL; a cancellation
    counts DEADLINE_EXCEEDED when the client's deadline has passed, else CANCELLED (the client
    has gone and decides its status itself). Requests that grpc refuses before this handler runs
    (over the receive limit, deadline passed on arrival) are not counted.
    """

    async def decide(request: pb.RankRequest, context: grpc.aio.ServicerContext,
                     start: int) -> pb.RankResponse | Failure:
        try:
            result = await servicer.answer(request, context)
        except grpc.aio.AbortError:  # an answer already decided (counted by ``rank``)
            raise
        except Exception as e:
            log.error("rank failed request_id=%s\n%s", clip(request.request_id), _clipped_traceback(e))
            return Failure(grpc.StatusCode.INTERNAL, "internal error while ranking; see the server log")
        if isinstance(result, Failure):
            return result
        result.server_time_us = (time.perf_counter_ns() - start) // 1000
        size = result.ByteSize()
        if size > max_response_bytes:
            msg = (f"response: {size} bytes, over the server's {max_response_bytes}-byte message limit; "
                   "ask for fewer candidates (top_k) or a shorter request_id")
            return Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, msg)
        return result

    async def rank(raw: bytes, context: grpc.aio.ServicerContext) -> pb.RankResponse | None:
        start = time.perf_counter_ns()
        code = grpc.StatusCode.UNKNOWN  # grpc.aio's answer to an exception that escapes below
        candidates = 0  # until the bytes parse
        try:
            try:
                request = pb.RankRequest.FromString(raw)
            except DecodeError as e:
                result: pb.RankResponse | Failure = Failure(
                    grpc.StatusCode.INVALID_ARGUMENT, f"request: not a RankRequest: {e}"
                )
            else:
                candidates = _n_candidates(request)
                result = await decide(request, context, start)
            code = result.code if isinstance(result, Failure) else context.code() or grpc.StatusCode.OK
        except grpc.aio.AbortError:  # aborted inside the servicer: the code it set is what the client gets
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except asyncio.CancelledError:  # the client's deadline passed, or it cancelled
            code = _cancelled_code(context)
            raise
        finally:
            metrics.observe_request(code, (time.perf_counter_ns() - start) / 1e9, candidates)
        if isinstance(result, Failure):  # set, not abort: no exception through grpc.aio per refusal
            context.set_code(result.code)
            context.set_details(clip(result.message, _MAX_DETAILS))
            return None  # grpc.aio sends no message with a non-OK status
        return result

    handler = grpc.unary_unary_rpc_method_handler(rank, response_serializer=pb.RankResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {"Rank": handler}),))


def _cancelled_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """What the client of a cancelled RPC sees: DEADLINE_EXCEEDED once its deadline has passed, else CANCELLED."""
    remaining = context.time_remaining()  # None without a deadline; 0 (never negative) once it has passed
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED


def create_server(holder: ModelHolder, options: ServerOptions | None = None, **overrides: Any) -> RankingServer:
    """Build the server and bind it; health starts NOT_SERVING.

    Args:
        holder: the model holder (not loaded yet).
        options: see :class:`ServerOptions`; ``overrides`` replace single fields (``port=0``).

    Raises:
        ValueError: bad options (named).
        RuntimeError: the address cannot be bound.
    """
    opts = dataclasses.replace(options or ServerOptions(), **overrides)
    limits = [("grpc.max_receive_message_length", opts.max_message_bytes),
              ("grpc.max_send_message_length", opts.max_message_bytes)]
    if opts.reuse_port:
        limits.append(("grpc.so_reuseport", 1))
    if opts.max_connection_age_s > 0:
        limits += [("grpc.max_connection_age_ms", round(opts.max_connection_age_s * 1000)),
                   ("grpc.max_connection_age_grace_ms", round(opts.grace_s * 1000))]
    server = grpc.aio.server(options=limits)
    metrics = ServerMetrics()
    holder.listeners.append(_reload_listener(metrics))
    batcher: DynamicBatcher[Job, pb.RankResponse] = DynamicBatcher(
        lambda jobs: rank_batch(jobs, opts.max_candidates), opts.batching, _BatchMetrics(metrics)
    )
    _add_ranker(RankerServicer(holder, batcher), server, metrics, opts.max_message_bytes)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    address = f"{opts.host}:{opts.port}"
    if opts.tls_cert is not None and opts.tls_key is not None:
        creds = grpc.ssl_server_credentials([(Path(opts.tls_key).read_bytes(), Path(opts.tls_cert).read_bytes())])
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise RuntimeError(f"cannot bind {address}")
    return RankingServer(server=server, host=opts.host, port=bound, holder=holder, health=health,
                         batcher=batcher, metrics=metrics, options=opts)


async def start_server(
    model: str | ModelHolder,
    tracking_uri: str | None = None,
    options: ServerOptions | None = None,
    **overrides: Any,
) -> RankingServer:
    """Bind, start (NOT_SERVING), load and warm the model, then report SERVING.

    Args:
        model: artifact folder or MLflow URI, or a ready :class:`ModelHolder`.
        tracking_uri: MLflow tracking/registry URI for MLflow model URIs.
        options, overrides: see :func:`create_server`.

    Returns:
        the running server; unpacks as ``server, port, holder``. Stop it with ``await rs.stop()``.
    """
    compile_model = bool(overrides.get("compile", (options or ServerOptions()).compile))
    experts_k = int(overrides.get("experts_k", (options or ServerOptions()).experts_k))
    holder = model if isinstance(model, ModelHolder) else ModelHolder(model, tracking_uri, compile_model, experts_k)
    rs = create_server(holder, options, **overrides)
    await rs.start()
    try:
        await rs.activate()
    except BaseException:
        await rs.stop(0)
        raise
    return rs


async def serve(
    model_uri: str,
    tracking_uri: str | None = None,
    grace_s: float | None = None,
    ready_file: str | None = None,
    options: ServerOptions | None = None,
    on_serving: Callable[[RankingServer], None] | None = None,
    **overrides: Any,
) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully.

    Args:
        model_uri: artifact folder or MLflow URI (``models:/ranker@champion``).
        tracking_uri: MLflow tracking/registry URI for MLflow model URIs.
        grace_s: seconds requests in flight get to finish at shutdown; None = ``options.grace_s``.
        ready_file: once SERVING, the bound port is written here (atomically) for scripts to wait on.
        options, overrides: see :class:`ServerOptions` (``host``, ``port``, ``max_candidates``, ...).
        on_serving: called once SERVING, after ``ready_file`` (a worker of ``serving.workers``
            tells its supervisor); an exception in it stops the server and propagates.
    """
    rs = await start_server(model_uri, tracking_uri, options, **overrides)
    if ready_file:
        _write_atomically(Path(ready_file), f"{rs.port}\n")
    if on_serving is not None:
        try:
            on_serving(rs)
        except BaseException:
            await rs.stop(0)
            raise
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
        drain_s = rs.options.drain_s
        log.info("signal received; NOT_SERVING, draining %.1fs, then shutting down", drain_s)
        await rs.health.enter_graceful_shutdown()  # health-checking clients stop sending here
        await asyncio.sleep(drain_s)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await rs.stop(rs.options.grace_s if grace_s is None else grace_s)


async def _set_health(health: health_aio.HealthServicer, status: Any) -> None:
    for name in _HEALTH_SERVICES:
        await health.set(name, status)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
