"""The gRPC server: ``ranking.v1.Ranker`` on ``grpc.aio``, with health checking and reflection.

Lifecycle (one log line each, logger ``serving``): bind and start with health NOT_SERVING ->
load and warm the model in a worker thread -> SERVING -> on SIGINT/SIGTERM NOT_SERVING, stop
accepting, let requests in flight finish within ``grace_s`` -> stopped.

Run it from Python::

    import asyncio
    from serving.server import serve
    asyncio.run(serve("models:/ranker@champion", port=50051, tracking_uri="sqlite:///mlflow.db"))

Shape letters: C candidates, K returned candidates (``top_k`` or C).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from protos.ranking.v1 import ranker_pb2 as pb
from protos.ranking.v1 import ranker_pb2_grpc as pb_grpc
from serving.decode import DEFAULT_MAX_CANDIDATES, decode_request
from serving.holder import LoadedModel, ModelHolder

log = logging.getLogger("serving")

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Ranker"].full_name  # "ranking.v1.Ranker"
_HEALTH_SERVICES = ("", SERVICE_NAME)  # "" is the server as a whole


def rank(loaded: LoadedModel, req: pb.RankRequest, max_candidates: int = DEFAULT_MAX_CANDIDATES) -> pb.RankResponse:
    """Score and order one request with one model snapshot (blocking; CPU-bound).

    Raises:
        ValueError: a malformed request (``DecodeError``), features the transform rejects, or an
            unknown objective / negative weight; the message names the field.
    """
    model = loaded.model
    user, context, candidates, item_ids = decode_request(req, model.fitted, max_candidates)
    scores = model.score_request(user, context, candidates)  # task -> (C,)
    combined = model.combine(scores, dict(req.objective_weights))  # (C,)
    order = np.argsort(-combined, kind="stable")  # (C,) best first, ties in request order
    if req.top_k:
        order = order[: req.top_k]  # (K,)
    per_task = {t: s[order].tolist() for t, s in scores.items()}
    resp = pb.RankResponse(request_id=req.request_id, model_name=loaded.name, model_version=loaded.version)
    for j, (i, score) in enumerate(zip(order.tolist(), combined[order].tolist(), strict=True)):
        resp.candidates.add(
            item_id=item_ids[i], index=i, score=score, objective_scores={t: v[j] for t, v in per_task.items()}
        )
    return resp


class RankerServicer(pb_grpc.RankerServicer):
    """``Rank``: snapshot the current model, rank in a worker thread, map errors to status codes."""

    def __init__(self, holder: ModelHolder, max_candidates: int = DEFAULT_MAX_CANDIDATES) -> None:
        self._holder = holder
        self._max = max_candidates

    async def Rank(self, request: pb.RankRequest, context: grpc.aio.ServicerContext) -> pb.RankResponse:
        start = time.perf_counter_ns()
        checked = _precondition(self._holder.current, request)  # one model snapshot per request
        result = checked if isinstance(checked, Failure) else await _rank_safely(checked, request, self._max)
        if isinstance(result, Failure):
            await _abort(context, result)
        result.server_time_us = (time.perf_counter_ns() - start) // 1000
        return result


@dataclass(frozen=True)
class Failure:
    """A request that ends in a status other than OK."""

    code: grpc.StatusCode
    message: str


async def _abort(context: grpc.aio.ServicerContext, failure: Failure) -> NoReturn:
    await context.abort(failure.code, failure.message)  # raises
    raise AssertionError("grpc.aio ServicerContext.abort returned")


def _precondition(loaded: LoadedModel | None, req: pb.RankRequest) -> LoadedModel | Failure:
    if loaded is None:
        return Failure(grpc.StatusCode.UNAVAILABLE, "model is not loaded yet; retry when health is SERVING")
    if req.model_version and req.model_version != loaded.version:
        msg = f"model_version: {req.model_version!r} requested, {loaded.version!r} is loaded"
        return Failure(grpc.StatusCode.FAILED_PRECONDITION, msg)
    return loaded


async def _rank_safely(loaded: LoadedModel, req: pb.RankRequest, max_candidates: int) -> pb.RankResponse | Failure:
    """Run :func:`rank` off the event loop; user errors -> INVALID_ARGUMENT, bugs -> INTERNAL."""
    try:
        return await asyncio.to_thread(rank, loaded, req, max_candidates)
    except ValueError as e:
        log.info("rank rejected request_id=%s: %s", req.request_id, e)
        return Failure(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except Exception:
        log.exception("rank failed request_id=%s", req.request_id)
        return Failure(grpc.StatusCode.INTERNAL, "internal error while ranking; see the server log")


@dataclass
class RankingServer:
    """A bound (not necessarily started) server with its model holder and health servicer.

    Unpacks as ``server, port, holder`` (what :func:`start_server` promises).
    """

    server: grpc.aio.Server
    host: str
    port: int  # the bound port (the free one picked when 0 was asked for)
    holder: ModelHolder
    health: health_aio.HealthServicer

    def __iter__(self) -> Iterator[Any]:
        return iter((self.server, self.port, self.holder))

    async def start(self) -> None:
        """Start accepting RPCs with health NOT_SERVING (Rank answers UNAVAILABLE until activated)."""
        await _set_health(self.health, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        log.info("started host=%s port=%d health=NOT_SERVING", self.host, self.port)

    async def activate(self) -> LoadedModel:
        """Load and warm the model in a worker thread (health keeps answering), then SERVING."""
        loaded = await asyncio.to_thread(self.holder.load)
        await _set_health(self.health, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving name=%s version=%s port=%d", loaded.name, loaded.version, self.port)
        return loaded

    async def stop(self, grace_s: float = 5.0) -> None:
        """NOT_SERVING, stop accepting RPCs, give those in flight ``grace_s`` seconds to finish."""
        log.info("stopping port=%d grace=%.1fs", self.port, grace_s)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        self.holder.close()
        log.info("stopped port=%d", self.port)


def create_server(
    holder: ModelHolder,
    host: str = "127.0.0.1",
    port: int = 0,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
) -> RankingServer:
    """Build the server and bind ``host:port`` (0 picks a free port); health starts NOT_SERVING.

    Raises:
        RuntimeError: the address cannot be bound.
    """
    server = grpc.aio.server()
    pb_grpc.add_RankerServicer_to_server(RankerServicer(holder, max_candidates), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind {host}:{port}")
    return RankingServer(server=server, host=host, port=bound, holder=holder, health=health)


async def start_server(
    model: str | ModelHolder,
    host: str = "127.0.0.1",
    port: int = 0,
    tracking_uri: str | None = None,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
) -> RankingServer:
    """Bind, start (NOT_SERVING), load and warm the model, then report SERVING.

    Args:
        model: artifact folder or MLflow URI, or a ready :class:`ModelHolder`.

    Returns:
        the running server; unpacks as ``server, port, holder``. Stop it with ``await rs.stop()``.
    """
    holder = model if isinstance(model, ModelHolder) else ModelHolder(model, tracking_uri)
    rs = create_server(holder, host, port, max_candidates)
    await rs.start()
    try:
        await rs.activate()
    except BaseException:
        await rs.stop(0)
        raise
    return rs


async def serve(
    model_uri: str,
    host: str = "127.0.0.1",
    port: int = 50051,
    tracking_uri: str | None = None,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    grace_s: float = 5.0,
    ready_file: str | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully.

    Args:
        model_uri: artifact folder or MLflow URI (``models:/ranker@champion``).
        host, port: address to bind; port 0 picks a free one (see ``ready_file``).
        tracking_uri: MLflow tracking/registry URI for MLflow model URIs.
        max_candidates: the most candidates one request may carry.
        grace_s: seconds requests in flight get to finish at shutdown.
        ready_file: once SERVING, the bound port is written here (atomically) for scripts to wait on.
    """
    rs = await start_server(model_uri, host, port, tracking_uri, max_candidates)
    if ready_file:
        _write_atomically(Path(ready_file), f"{rs.port}\n")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
        log.info("signal received; shutting down")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await rs.stop(grace_s)


async def _set_health(health: health_aio.HealthServicer, status: Any) -> None:
    for name in _HEALTH_SERVICES:
        await health.set(name, status)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
