"""A gRPC load generator for ``ranking.v1.Ranker``, run as its own process (never inside the server).

Two arrival models, on one ``grpc.aio`` channel by default:

* ``closed``: ``--concurrency`` workers, each sends a request, waits for the answer, sends the next
  (throughput = concurrency / latency);
* ``open``: Poisson arrivals at ``--rate`` requests/s whatever the server does (what overload
  looks like to a service with many independent callers).

``--channels K`` spreads the calls over K channels, each its own TCP connection (a local
subchannel pool and a distinct channel argument per channel, so grpc does not share one
connection between them): closed-loop worker ``i`` uses channel ``i % K``, open-loop arrival ``k``
channel ``k % K``. ``ranker serve --workers N`` runs N processes on one ``SO_REUSEPORT`` port and the
kernel hands each new connection to one of them, so one channel reaches one worker; several
channels reach them all (how evenly is the kernel's hash of the connections' addresses). The
default is 1, or ``$LOAD_CLIENT_CHANNELS`` when set (for drivers that run this client with their
own arguments, such as ``benchmarks/ray_serve_peer.py``).

``--health-checks N`` times N sequential ``grpc.health.v1.Health/Check`` calls on channel 0 after
the load: the round trip of the cheapest RPC on the same connection, the floor under any Rank
latency.

Requests are pre-serialized ``RankRequest`` bytes (a pickled ``list[bytes]``) and answers are not
parsed, so the client spends as little CPU as possible on the shared machine; ``--server-time``
parses each answer for its ``server_time_us`` (the server's own time from reading the request to
the answer being ready), which splits a round trip into the server's part and the transport's.
Each call has a deadline of ``--timeout-s``.

Output (``--out``, an ``.npz``): per finished call ``start`` (s since the measured window began),
``latency`` (s), ``code`` (gRPC status code number, 0 = OK), ``channel`` (which of the K channels),
``server_time`` (s, with ``--server-time``; NaN for a call that failed);
``health_latency`` (s, one per health check); plus ``meta`` (JSON): the window, the channels,
requests the open loop had to skip because ``--max-in-flight`` calls were pending, and the
client's own CPU seconds. Calls started in the warm-up are not recorded.

    python benchmarks/load/client.py --target 127.0.0.1:50051 --payloads reqs.pkl \\
        --mode closed --concurrency 8 --duration-s 10 --out run.npz
    python benchmarks/load/client.py --target 127.0.0.1:50051 --payloads reqs.pkl \\
        --mode closed --concurrency 32 --channels 8 --duration-s 10 --out run.npz
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

METHOD = "/ranking.v1.Ranker/Rank"
HEALTH_METHOD = "/grpc.health.v1.Health/Check"
HEALTH_REQUEST = health_pb2.HealthCheckRequest(service="ranking.v1.Ranker").SerializeToString()
CHANNELS_ENV = "LOAD_CLIENT_CHANNELS"
_PARSE: Callable[[bytes], Any] | None = None  # RankResponse.FromString with --server-time
RankCall: TypeAlias = grpc.aio.UnaryUnaryMultiCallable


@dataclass
class Record:
    """What one load run saw; lists grow as calls finish."""

    start: list[float] = field(default_factory=list)  # s since the measured window began
    latency: list[float] = field(default_factory=list)  # s
    code: list[int] = field(default_factory=list)  # grpc.StatusCode number, 0 = OK
    channel: list[int] = field(default_factory=list)  # which of the K channels carried the call
    server_time: list[float] = field(default_factory=list)  # s, RankResponse.server_time_us (--server-time)
    skipped: int = 0  # open loop: arrivals not sent because max_in_flight calls were pending


async def _call(rank: grpc.aio.UnaryUnaryMultiCallable, payload: bytes, timeout_s: float) -> tuple[int, bytes]:
    try:
        return 0, await rank(payload, timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        return int(e.code().value[0]), b""


async def _timed(ranks: list[RankCall], k: int, payload: bytes, timeout_s: float,
                 t0: float, warmup_s: float, rec: Record) -> None:
    """One call of ``payload`` on channel ``k``, recorded unless it started in the warm-up."""
    start = time.perf_counter()
    code, answer = await _call(ranks[k], payload, timeout_s)
    end = time.perf_counter()
    if start - t0 >= warmup_s:
        rec.start.append(start - t0 - warmup_s)
        rec.latency.append(end - start)
        rec.code.append(code)
        rec.channel.append(k)
        if _PARSE is not None:
            rec.server_time.append(_PARSE(answer).server_time_us / 1e6 if code == 0 else float("nan"))


async def closed_loop(ranks: list[RankCall], payloads: list[bytes], concurrency: int,
                      duration_s: float, warmup_s: float, timeout_s: float) -> Record:
    """``concurrency`` workers back to back until ``warmup_s + duration_s`` has passed; worker ``i``
    on channel ``i % len(ranks)``."""
    rec = Record()
    t0 = time.perf_counter()
    stop = t0 + warmup_s + duration_s

    async def worker(i: int) -> None:
        k = i
        while time.perf_counter() < stop:
            await _timed(ranks, i % len(ranks), payloads[k % len(payloads)], timeout_s, t0, warmup_s, rec)
            k += concurrency

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return rec


async def open_loop(ranks: list[RankCall], payloads: list[bytes], rate: float,
                    duration_s: float, warmup_s: float, timeout_s: float, max_in_flight: int) -> Record:
    """Poisson arrivals at ``rate`` per second; each arrival is sent without waiting for the others,
    arrival ``k`` on channel ``k % len(ranks)``."""
    rec = Record()
    rng = random.Random(0)
    pending: set[asyncio.Task[None]] = set()
    t0 = time.perf_counter()
    stop = t0 + warmup_s + duration_s
    next_t = t0
    k = 0
    while next_t < stop:
        delay = next_t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(pending) >= max_in_flight:
            rec.skipped += next_t - t0 >= warmup_s
        else:
            call = _timed(ranks, k % len(ranks), payloads[k % len(payloads)], timeout_s, t0, warmup_s, rec)
            task = asyncio.create_task(call)
            pending.add(task)
            task.add_done_callback(pending.discard)
        k += 1
        next_t += rng.expovariate(rate)
    if pending:
        await asyncio.wait(pending)
    return rec


def channel_options(index: int, channels: int) -> list[tuple[str, int | str]]:
    """Options of channel ``index`` of ``channels``: with more than one, each gets its own subchannel
    pool and a distinct argument, so that each opens its own connection."""
    options: list[tuple[str, int | str]] = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if channels > 1:
        options += [("grpc.use_local_subchannel_pool", 1), ("load_client.channel", index)]
    return options


async def health_checks(channel: grpc.aio.Channel, count: int, timeout_s: float) -> list[float]:
    """Seconds per ``Health/Check`` call, ``count`` of them one after another on ``channel``."""
    check = channel.unary_unary(HEALTH_METHOD)
    out = []
    for _ in range(count):
        start = time.perf_counter()
        await check(HEALTH_REQUEST, timeout=timeout_s)
        out.append(time.perf_counter() - start)
    return out


async def run(args: argparse.Namespace) -> tuple[Record, list[float], float]:
    payloads: list[bytes] = pickle.loads(Path(args.payloads).read_bytes())
    channels = [grpc.aio.insecure_channel(args.target, options=channel_options(i, args.channels))
                for i in range(args.channels)]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), 10)
        ranks = [c.unary_unary(METHOD) for c in channels]  # bytes in, bytes out: no (de)serialization here
        t = time.perf_counter()
        if args.mode == "closed":
            rec = await closed_loop(ranks, payloads, args.concurrency, args.duration_s, args.warmup_s, args.timeout_s)
        else:
            rec = await open_loop(ranks, payloads, args.rate, args.duration_s, args.warmup_s, args.timeout_s,
                                  args.max_in_flight)
        wall_s = time.perf_counter() - t
        health = await health_checks(channels[0], args.health_checks, args.timeout_s)
        return rec, health, wall_s
    finally:
        await asyncio.gather(*(c.close() for c in channels))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, help="host:port of the server")
    ap.add_argument("--payloads", required=True, help="pickled list[bytes] of serialized RankRequests")
    ap.add_argument("--mode", choices=("closed", "open"), default="closed")
    ap.add_argument("--concurrency", type=int, default=1, help="closed loop: calls in flight")
    ap.add_argument("--rate", type=float, default=100.0, help="open loop: arrivals per second")
    ap.add_argument("--duration-s", type=float, default=10.0, help="measured window, seconds")
    ap.add_argument("--warmup-s", type=float, default=1.0, help="unrecorded lead-in, seconds")
    ap.add_argument("--timeout-s", type=float, default=10.0, help="deadline of each call, seconds")
    ap.add_argument("--max-in-flight", type=int, default=4096, help="open loop: cap on pending calls")
    ap.add_argument("--channels", type=int, default=int(os.environ.get(CHANNELS_ENV, "1")),
                    help=f"channels (TCP connections) to spread the calls over (default ${CHANNELS_ENV} or 1)")
    ap.add_argument("--health-checks", type=int, default=0,
                    help="after the load, time this many health checks one after another on channel 0")
    ap.add_argument("--server-time", action="store_true",
                    help="parse each answer and record its server_time_us (costs client CPU per call)")
    ap.add_argument("--out", required=True, help=".npz to write")
    args = ap.parse_args()
    if args.server_time:
        global _PARSE
        from protos.ranking.v1 import ranker_pb2

        _PARSE = ranker_pb2.RankResponse.FromString
    if args.concurrency < 1 or args.rate <= 0 or args.duration_s <= 0 or args.channels < 1 or args.health_checks < 0:
        raise ValueError(f"need concurrency >= 1, rate > 0, duration > 0, channels >= 1, health checks >= 0; "
                         f"got {args}")
    rec, health, wall_s = asyncio.run(run(args))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    meta = {"duration_s": args.duration_s, "wall_s": wall_s, "skipped": rec.skipped, "channels": args.channels,
            "client_cpu_s": usage.ru_utime + usage.ru_stime}
    np.savez(args.out, start=np.asarray(rec.start), latency=np.asarray(rec.latency),
             code=np.asarray(rec.code, dtype=np.int64), channel=np.asarray(rec.channel, dtype=np.int64),
             server_time=np.asarray(rec.server_time, dtype=np.float64),
             health_latency=np.asarray(health), meta=np.asarray(json.dumps(meta)))


if __name__ == "__main__":
    main()
