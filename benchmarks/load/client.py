"""A gRPC load generator for ``ranking.v1.Ranker``, run as its own process (never inside the server).

Two arrival models, both on one ``grpc.aio`` channel:

* ``closed``: ``--concurrency`` workers, each sends a request, waits for the answer, sends the next
  (throughput = concurrency / latency);
* ``open``: Poisson arrivals at ``--rate`` requests/s whatever the server does (what overload
  looks like to a service with many independent callers).

Requests are pre-serialized ``RankRequest`` bytes (a pickled ``list[bytes]``) and answers are not
parsed, so the client spends as little CPU as possible on the shared machine. Each call has a
deadline of ``--timeout-s``.

Output (``--out``, an ``.npz``): per finished call ``start`` (s since the measured window began),
``latency`` (s), ``code`` (gRPC status code number, 0 = OK); plus ``meta`` (JSON): the window,
requests the open loop had to skip because ``--max-in-flight`` calls were pending, and the
client's own CPU seconds. Calls started in the warm-up are not recorded.

    python benchmarks/load/client.py --target 127.0.0.1:50051 --payloads reqs.pkl \\
        --mode closed --concurrency 8 --duration-s 10 --out run.npz
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

METHOD = "/ranking.v1.Ranker/Rank"


@dataclass
class Record:
    """What one load run saw; lists grow as calls finish."""

    start: list[float] = field(default_factory=list)  # s since the measured window began
    latency: list[float] = field(default_factory=list)  # s
    code: list[int] = field(default_factory=list)  # grpc.StatusCode number, 0 = OK
    skipped: int = 0  # open loop: arrivals not sent because max_in_flight calls were pending


async def _call(rank: grpc.aio.UnaryUnaryMultiCallable, payload: bytes, timeout_s: float) -> int:
    try:
        await rank(payload, timeout=timeout_s)
        return 0
    except grpc.aio.AioRpcError as e:
        return int(e.code().value[0])


async def _timed(rank: grpc.aio.UnaryUnaryMultiCallable, payload: bytes, timeout_s: float,
                 t0: float, warmup_s: float, rec: Record) -> None:
    start = time.perf_counter()
    code = await _call(rank, payload, timeout_s)
    end = time.perf_counter()
    if start - t0 >= warmup_s:
        rec.start.append(start - t0 - warmup_s)
        rec.latency.append(end - start)
        rec.code.append(code)


async def closed_loop(rank: grpc.aio.UnaryUnaryMultiCallable, payloads: list[bytes], concurrency: int,
                      duration_s: float, warmup_s: float, timeout_s: float) -> Record:
    """``concurrency`` workers back to back until ``warmup_s + duration_s`` has passed."""
    rec = Record()
    t0 = time.perf_counter()
    stop = t0 + warmup_s + duration_s

    async def worker(i: int) -> None:
        k = i
        while time.perf_counter() < stop:
            await _timed(rank, payloads[k % len(payloads)], timeout_s, t0, warmup_s, rec)
            k += concurrency

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return rec


async def open_loop(rank: grpc.aio.UnaryUnaryMultiCallable, payloads: list[bytes], rate: float,
                    duration_s: float, warmup_s: float, timeout_s: float, max_in_flight: int) -> Record:
    """Poisson arrivals at ``rate`` per second; each arrival is sent without waiting for the others."""
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
            task = asyncio.create_task(_timed(rank, payloads[k % len(payloads)], timeout_s, t0, warmup_s, rec))
            pending.add(task)
            task.add_done_callback(pending.discard)
        k += 1
        next_t += rng.expovariate(rate)
    if pending:
        await asyncio.wait(pending)
    return rec


async def run(args: argparse.Namespace) -> tuple[Record, float]:
    payloads: list[bytes] = pickle.loads(Path(args.payloads).read_bytes())
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(args.target, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        rank = channel.unary_unary(METHOD)  # bytes in, bytes out: no (de)serialization here
        t = time.perf_counter()
        if args.mode == "closed":
            rec = await closed_loop(rank, payloads, args.concurrency, args.duration_s, args.warmup_s, args.timeout_s)
        else:
            rec = await open_loop(rank, payloads, args.rate, args.duration_s, args.warmup_s, args.timeout_s,
                                  args.max_in_flight)
        return rec, time.perf_counter() - t


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
    ap.add_argument("--out", required=True, help=".npz to write")
    args = ap.parse_args()
    if args.concurrency < 1 or args.rate <= 0 or args.duration_s <= 0:
        raise ValueError(f"need concurrency >= 1, rate > 0, duration > 0; got {args}")
    rec, wall_s = asyncio.run(run(args))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    meta = {"duration_s": args.duration_s, "wall_s": wall_s, "skipped": rec.skipped,
            "client_cpu_s": usage.ru_utime + usage.ru_stime}
    np.savez(args.out, start=np.asarray(rec.start), latency=np.asarray(rec.latency),
             code=np.asarray(rec.code, dtype=np.int64), meta=np.asarray(json.dumps(meta)))


if __name__ == "__main__":
    main()
