"""Ray Serve as a peer of ``ranker serve``: the same model, the same requests, the same load client.

The alternative a team would otherwise build: a Ray Serve deployment that loads the inference
artifact once per replica, batches with ``@serve.batch`` and answers ``ranking.v1.Ranker/Rank``
through Ray Serve's gRPC ingress. :func:`compare_with_ray` loads it and our server with
``benchmarks/load/client.py`` (the client of bench_serving.py, same pre-serialized requests) at the
same concurrencies, one server at a time, and reports

* throughput at equal p99: the best requests/s each server reaches in closed loop with p99 under
  a common bound (default: 3x the slower server's p99 at the lowest concurrency);
* p99 at equal offered load: open-loop Poisson arrivals at the same rate for both (default 70% of
  the lower of the two closed-loop maxima);

both as ratios ours / Ray (throughput: higher is better for ours; p99: lower is better for ours).

How the peer matches our server (:class:`PeerConfig`):

* batching: our batcher cuts a batch at ``max_batch_candidates`` (1000) candidates or after
  ``max_queue_delay_us`` (2000 µs). ``@serve.batch`` counts in whatever ``batch_size_fn`` returns,
  so ``max_batch_size`` is the same candidate budget with ``batch_size_fn`` summing the requests'
  candidates (each counted as at most the budget, so that a larger request still runs, alone, as in
  ours), and ``batch_wait_timeout_s`` is the same 2 ms. Batches run one at a time per replica
  (``max_concurrent_batches=1``) on a single worker thread. One difference stays, Ray's design:
  ``@serve.batch`` cuts the next batch 2 ms after its first request even while the previous one
  still runs (it then waits for its turn), where ours lets the queue grow until the worker is free;
* the work per batch: ``serving.server.rank_batch`` on ``Job(loaded, req)``, the function our
  batcher calls (decode, one ``score_requests`` forward, respond), on a model loaded and warmed by
  our ``ModelHolder``; a batch that raises as a whole is re-run request by request, as ours does;
* CPU budget: Ray gets ``num_cpus`` = the machine's cores and one replica per core (``num_cpus=1``
  each), torch 1 thread per replica: what ``ranker serve`` does by default (``--workers``: one
  process per core on one SO_REUSEPORT port, ``--torch-threads 1``). Ray's controller, proxy,
  raylet and GCS share those cores. The load client holds one gRPC channel (one TCP connection),
  so all its calls reach one of our worker processes, while Ray's proxy spreads them over the
  replicas;
* ``max_ongoing_requests`` per replica: our ``--max-queue`` (256, per worker process), far above
  the requests one batch holds (Ray's default of 5 would starve the batcher at concurrency 32);
* no dashboard, no per-request access log (ours logs none either), a small object store.

Ray is an optional dependency (group ``peers`` in pyproject.toml; ``make setup`` never installs it).
It must not move torch, grpcio, protobuf, polars, numpy, pydantic, mlflow or prometheus-client;
what was run here (ray 2.60.0 needed none of them changed; the constraints make sure)::

    .venv/bin/python -m pip freeze | grep -iE '^(torch|grpcio|protobuf|polars|numpy|pydantic|mlflow|prometheus)' \\
        > /tmp/peer-constraints.txt
    .venv/bin/python -m pip install "ray[serve]==2.60.0" -c /tmp/peer-constraints.txt
    # equivalently: .venv/bin/python -m pip install -e ".[peers]" -c /tmp/peer-constraints.txt

Run::

    .venv/bin/python benchmarks/ray_serve_peer.py --quick          # seconds per point: a smoke run
    .venv/bin/python benchmarks/ray_serve_peer.py --seconds 15     # the figures
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import bench_serving as bs
import grpc
import numpy as np

from protos.ranking.v1 import ranker_pb2 as pb

SERVICER = "protos.ranking.v1.ranker_pb2_grpc.add_RankerServicer_to_server"
APP_NAME = "ranker"
MAX_ERROR_SHARE = 0.01  # a load point with more failed calls does not count for "throughput at equal p99"
INSTALL_HINT = 'pip install -e ".[peers]"'


class RayMissing(ImportError):
    """``ray[serve]`` is not installed (it is the optional ``peers`` group)."""


def require_ray() -> None:
    """Raise :class:`RayMissing` (one line, with the install command) unless ``ray.serve`` imports."""
    try:
        import ray.serve  # noqa: F401
    except ImportError as e:
        raise RayMissing(f"ray[serve] is not installed ({e}); install it with {INSTALL_HINT}") from e


@dataclass(frozen=True)
class PeerConfig:
    """The Ray Serve deployment's knobs, set to match ``ranker serve``'s defaults (see the module docstring).

    Args:
        cpus: Ray's ``num_cpus``; 0 = the machine's cores.
        replicas: deployment replicas, ``cpus / replicas`` CPUs each; 0 = one per CPU.
        max_batch_candidates: ``@serve.batch`` ``max_batch_size``, counted in candidates.
        max_queue_delay_us: ``batch_wait_timeout_s``, in microseconds.
        max_queue: our server's ``--max-queue`` (per worker process); each replica's ``max_ongoing_requests``.
        max_candidates: the most candidates one request may carry (``rank_batch``'s check).
        torch_threads: ``torch.set_num_threads`` in each replica.
        object_store_mib: Ray's object store (requests and responses never go through it).
    """

    cpus: int = 0
    replicas: int = 0
    max_batch_candidates: int = bs.BenchConfig.max_batch_candidates
    max_queue_delay_us: int = bs.BenchConfig.max_queue_delay_us
    max_queue: int = 256
    max_candidates: int = 1000
    torch_threads: int = 1
    object_store_mib: int = 256

    @property
    def num_cpus(self) -> int:
        return self.cpus or os.cpu_count() or 1

    @property
    def num_replicas(self) -> int:
        return self.replicas or self.num_cpus

    @property
    def max_ongoing_requests(self) -> int:
        return self.max_queue

    def __post_init__(self) -> None:
        for name in ("cpus", "replicas"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = automatic), got {getattr(self, name)}")
        for name in ("max_batch_candidates", "max_queue", "max_candidates", "torch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")


@dataclass(frozen=True)
class CompareConfig:
    """How the side-by-side run loads the two servers.

    Args:
        concurrencies: closed-loop points, calls in flight.
        warmup_s: unrecorded lead-in of each point.
        prime_s: an unrecorded run at the highest concurrency before a server's first point (cold starts).
        load_fraction: the open-loop rate as a share of the lower of the two best closed-loop req/s.
        p99_bound_ms: the common p99 bound; None = 3x the slower server's p99 at the lowest concurrency.
    """

    concurrencies: tuple[int, ...] = (1, 4, 8, 16, 32)
    warmup_s: float = 2.0
    prime_s: float = 2.0
    load_fraction: float = 0.7
    p99_bound_ms: float | None = None

    def __post_init__(self) -> None:
        if not self.concurrencies or min(self.concurrencies) < 1:
            raise ValueError(f"concurrencies must be >= 1 each, got {self.concurrencies}")
        if not 0 < self.load_fraction <= 1:
            raise ValueError(f"load_fraction must be in (0, 1], got {self.load_fraction}")


def n_candidates(req: pb.RankRequest) -> int:
    """How many item ids a request carries (0 when the column is unset)."""
    kind = req.candidates.item_ids.WhichOneof("kind")
    return 0 if kind is None else len(getattr(req.candidates.item_ids, kind).values)


# ------------------------------------------------------------------------- the deployment
def build_app(artifact: Path, peer: PeerConfig) -> Any:
    """The Ray Serve application: one ``RayRanker`` deployment, ``Rank`` batched by candidates.

    Built inside a function so that this module imports without ray. The class reaches the replicas
    pickled; what it names from this module resolves there through ``_worker_path``.
    """
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from ray import serve

    from serving.holder import ModelHolder
    from serving.server import Job, rank_batch

    budget = peer.max_batch_candidates

    def batch_candidates(requests: list[pb.RankRequest]) -> int:
        return sum(min(max(n_candidates(r), 1), budget) for r in requests)

    @serve.deployment(
        num_replicas=peer.num_replicas,
        max_ongoing_requests=peer.max_ongoing_requests,
        ray_actor_options={"num_cpus": peer.num_cpus / peer.num_replicas},
    )
    class RayRanker:
        """``ranking.v1.Ranker`` on Ray Serve: our model, our batch function, Ray's batching and routing."""

        def __init__(self, artifact: str, max_candidates: int, torch_threads: int) -> None:
            torch.set_num_threads(torch_threads)
            self.holder = ModelHolder(artifact)
            self.loaded = self.holder.load()  # loads and warms up, as our server does
            self.max_candidates = max_candidates
            self.worker = ThreadPoolExecutor(1, thread_name_prefix="forward")  # forwards one at a time
            self.totals = {"batches": 0, "requests": 0, "candidates": 0}  # since start, this replica

        def stats(self) -> tuple[int, dict[str, int]]:
            """(pid, batch totals) of the replica that answers; the driver asks until it has heard every one."""
            return os.getpid(), dict(self.totals)

        async def Rank(self, request: pb.RankRequest, grpc_context: Any) -> pb.RankResponse:
            result = await self.rank(request)
            if isinstance(result, Exception):
                code = grpc.StatusCode.INVALID_ARGUMENT if isinstance(result, ValueError) else grpc.StatusCode.INTERNAL
                grpc_context.set_code(code)
                grpc_context.set_details(str(result)[:1024])
                return pb.RankResponse()
            return result

        @serve.batch(max_batch_size=budget, batch_wait_timeout_s=peer.max_queue_delay_us / 1e6,
                     batch_size_fn=batch_candidates)
        async def rank(self, requests: list[pb.RankRequest]) -> list[pb.RankResponse | Exception]:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.worker, self.rank_blocking, requests)

        def rank_blocking(self, requests: list[pb.RankRequest]) -> list[pb.RankResponse | Exception]:
            jobs = [Job(self.loaded, r) for r in requests]
            self.totals["batches"] += 1
            self.totals["requests"] += len(requests)
            self.totals["candidates"] += sum(n_candidates(r) for r in requests)
            try:
                return rank_batch(jobs, self.max_candidates)
            except Exception:  # one bad request fails the shared forward: answer the others alone
                out: list[pb.RankResponse | Exception] = []
                for job in jobs:
                    try:
                        out += rank_batch([job], self.max_candidates)
                    except Exception as e:
                        out.append(e)
                return out

    deployment: Any = RayRanker  # serve.deployment made the class a Deployment
    return deployment.bind(str(artifact), peer.max_candidates, peer.torch_threads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ranking(target: str, payload: bytes, timeout_s: float) -> None:
    """Send one real request until it answers OK (the proxy learns the route after ``serve.run``)."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        rank = channel.unary_unary("/ranking.v1.Ranker/Rank")
        while True:
            try:
                rank(payload, timeout=10)
                return
            except grpc.RpcError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Ray Serve at {target} did not answer Rank: {e}") from e
                time.sleep(0.5)


def ray_batch_totals(replicas: int, tries: int = 200) -> dict[str, float]:
    """Batch totals summed over the replicas (diff two reads for a load point), like ``ServerProcess.batch_totals``.

    A handle call reaches one replica, chosen by Ray; calls are repeated until ``replicas`` distinct
    ones have answered (or ``tries`` calls were made: then the figures are partial, and empty).
    """
    from ray import serve

    handle = serve.get_app_handle(APP_NAME)
    seen: dict[int, dict[str, int]] = {}
    for _ in range(tries):
        pid, totals = handle.stats.remote().result()
        seen[pid] = totals
        if len(seen) >= replicas:
            return {k: float(sum(t[k] for t in seen.values())) for k in ("batches", "requests", "candidates")}
    return {}


def _worker_path() -> str:
    """PYTHONPATH of Ray's workers: this folder first, so that the deployment, which refers to this module
    by name when it is imported (from bench_serving.py), unpickles there too."""
    return os.pathsep.join(p for p in (str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")) if p)


@contextlib.contextmanager
def ray_serve(artifact: Path, peer: PeerConfig, probe: bytes, timeout_s: float = 180.0) -> Iterator[str]:
    """Start a local Ray cluster with Serve and the ranker app; yield its gRPC target; shut it all down."""
    require_ray()
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions
    from ray.serve.schema import LoggingConfig

    port = _free_port()
    ray.init(num_cpus=peer.num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
             object_store_memory=peer.object_store_mib * 2**20,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(peer.torch_threads), "PYTHONPATH": _worker_path()}})
    try:
        serve.start(http_options=HTTPOptions(host="127.0.0.1", port=_free_port()),
                    grpc_options=gRPCOptions(port=port, grpc_servicer_functions=[SERVICER]),
                    logging_config=LoggingConfig(enable_access_log=False, log_level="WARNING"))
        serve.run(build_app(artifact, peer), name=APP_NAME)
        target = f"127.0.0.1:{port}"
        _wait_ranking(target, probe, timeout_s)
        yield target
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


# ----------------------------------------------------------------------------- load runs
def _load(target: str, payloads: Path, n: int, work: Path, label: str, seconds: float, warmup_s: float, *,
          concurrency: int | None = None, rate: float | None = None,
          totals: Callable[[], dict[str, float]] | None = None) -> bs.LoadResult:
    """One load-client process against ``target``: closed loop at ``concurrency`` or open loop at ``rate``."""
    out = work / f"{label.replace(' ', '_')}.npz"
    cmd = [sys.executable, str(bs.CLIENT), "--target", target, "--payloads", str(payloads), "--out", str(out),
           "--duration-s", str(seconds), "--warmup-s", str(warmup_s)]
    cmd += ["--mode", "closed", "--concurrency", str(concurrency)] if rate is None else \
        ["--mode", "open", "--rate", f"{rate:.3f}"]
    load = bs.load_avg()
    before = totals() if totals is not None else {}
    done = subprocess.run(cmd, cwd=bs.ROOT, check=False)
    after = totals() if totals is not None else {}
    if done.returncode != 0:
        raise RuntimeError(f"load client failed ({done.returncode}): {shlex.join(cmd)}")
    data = np.load(out)
    res = bs.LoadResult(label, n, concurrency, rate, seconds, data["start"], 1e3 * data["latency"], data["code"],
                        json.loads(str(data["meta"])), load)
    batches = after.get("batches", 0.0) - before.get("batches", 0.0)
    if batches > 0:  # warm-up included: batches cut over the whole client run
        res.mean_batch_requests = (after["requests"] - before["requests"]) / batches
        res.mean_batch_candidates = (after["candidates"] - before["candidates"]) / batches
    per_batch = "" if batches <= 0 else f", {res.mean_batch_requests:.1f} requests per batch"
    print(f"  {label}: {res.req_s:,.1f} req/s, p50 {res.pct(50):.1f} ms, p99 {res.pct(99):.1f} ms, "
          f"errors {res.errors}{per_batch}, load {load}", file=sys.stderr, flush=True)
    return res


def _point(r: bs.LoadResult) -> dict[str, Any]:
    return {"concurrency": r.concurrency, "rate": r.rate, "req_s": r.req_s, "cand_s": r.cand_s,
            "p50_ms": r.pct(50), "p99_ms": r.pct(99), "errors": r.errors, "client_cpu": r.client_cpu,
            "batch_requests": r.mean_batch_requests, "batch_candidates": r.mean_batch_candidates, "load": r.load}


def server_batch_totals(sp: bs.ServerProcess) -> Callable[[], dict[str, float]]:
    """Our server's batch totals from its ``/metrics`` (empty without a metrics port), as ``ray_batch_totals`` gives."""

    def read() -> dict[str, float]:
        t = sp.batch_totals()
        if "ranker_batch_requests_count" not in t:
            return {}
        return {"batches": t["ranker_batch_requests_count"], "requests": t["ranker_batch_requests_sum"],
                "candidates": t["ranker_batch_candidates_sum"]}

    return read


@dataclass
class _Side:
    closed: list[bs.LoadResult] = field(default_factory=list)
    open: bs.LoadResult | None = None

    def best(self) -> float:
        return max(r.req_s for r in self.closed)

    def unloaded_p99(self) -> float:
        return min(self.closed, key=lambda r: r.concurrency or 0).pct(99)

    def best_under(self, bound_ms: float) -> float | None:
        ok = [r.req_s for r in self.closed if r.pct(99) <= bound_ms and (~r.ok).mean() <= MAX_ERROR_SHARE]
        return max(ok) if ok else None

    def summary(self, bound_ms: float) -> dict[str, Any]:
        return {"closed": [_point(r) for r in self.closed], "open": None if self.open is None else _point(self.open),
                "best_req_s": self.best(), "req_s_at_p99_bound": self.best_under(bound_ms)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not b else a / b


def compare_with_ray(artifact: Path, requests: list[pb.RankRequest], work: Path, ours_target: str | None,
                     seconds: float, *, cfg: CompareConfig | None = None, peer: PeerConfig | None = None,
                     ours_totals: Callable[[], dict[str, float]] | None = None) -> dict[str, Any]:
    """Load our server (at ``ours_target``, if given) and a Ray Serve peer with the same client and requests.

    One server is loaded at a time and Ray runs only while it is measured: our closed-loop points,
    then Ray up -> its closed-loop points -> its open loop -> Ray down, then our open loop at the
    same rate. Our server must already serve ``artifact`` with the knobs ``peer`` mirrors;
    ``ours_totals`` (e.g. ``server_batch_totals(sp)``) adds its mean batch sizes to the report.

    Returns:
        a JSON-able dict: per side (``ours``, ``ray``) the closed-loop points, the open-loop point,
        the best req/s and the best req/s with p99 under ``p99_bound_ms``; the ``rate`` of the open
        loop; ``throughput_ratio`` (ours/ray at the p99 bound) and ``p99_ratio`` (ours/ray at
        ``rate``), None without ``ours_target``.

    Raises:
        RayMissing: ray[serve] is not installed.
    """
    cfg = cfg or CompareConfig()
    peer = peer or PeerConfig()
    require_ray()
    if not requests:
        raise ValueError("requests: need at least one RankRequest, got none")
    n = round(float(np.mean([n_candidates(r) for r in requests])))
    payloads = bs.write_payloads(requests, work / "peer_requests.pkl")
    load_start = bs.load_avg()
    ours, ray_side = _Side(), _Side()

    def run(target: str, label: str, concurrency: int | None = None, rate: float | None = None) -> bs.LoadResult:
        totals = ours_totals if target == ours_target else functools.partial(ray_batch_totals, peer.num_replicas)
        return _load(target, payloads, n, work, label, seconds, cfg.warmup_s, concurrency=concurrency, rate=rate,
                     totals=totals)

    def prime(target: str, side: str) -> None:  # every worker / replica past its first (cold) calls, unrecorded
        _load(target, payloads, n, work, f"{side} warm-up", cfg.prime_s, 0.0, concurrency=max(cfg.concurrencies))

    if ours_target is not None:
        print(f"ours at {ours_target}: closed loop", file=sys.stderr, flush=True)
        prime(ours_target, "ours")
        ours.closed = [run(ours_target, f"ours c{c}", concurrency=c) for c in cfg.concurrencies]
    print("starting Ray Serve", file=sys.stderr, flush=True)
    t = time.monotonic()
    with ray_serve(artifact, peer, requests[0].SerializeToString()) as ray_target:
        startup_s = time.monotonic() - t
        print(f"ray at {ray_target} (up in {startup_s:.0f} s): closed loop", file=sys.stderr, flush=True)
        prime(ray_target, "ray")
        ray_side.closed = [run(ray_target, f"ray c{c}", concurrency=c) for c in cfg.concurrencies]
        rate = cfg.load_fraction * min(s.best() for s in (ours, ray_side) if s.closed)
        ray_side.open = run(ray_target, "ray open", rate=rate)
    if ours_target is not None:
        ours.open = run(ours_target, "ours open", rate=rate)
    bound = cfg.p99_bound_ms or 3 * max(s.unloaded_p99() for s in (ours, ray_side) if s.closed)
    sides = {"ray": ray_side.summary(bound)}
    if ours_target is not None:
        sides["ours"] = ours.summary(bound)
    return {
        "candidates": n, "distinct_requests": len(requests), "seconds": seconds, "cfg": asdict(cfg),
        "peer": {**asdict(peer), "num_cpus": peer.num_cpus, "num_replicas": peer.num_replicas,
                 "max_ongoing_requests": peer.max_ongoing_requests},
        "ray_version": importlib.metadata.version("ray"), "ray_startup_s": startup_s,
        "p99_bound_ms": bound, "rate": rate, **sides,
        "throughput_ratio": _ratio(ours.best_under(bound), ray_side.best_under(bound)) if ours.closed else None,
        "p99_ratio": _ratio(ours.open.pct(99), ray_side.open.pct(99))
        if ours.open is not None and ray_side.open is not None else None,
        "load_start": load_start, "load_end": bs.load_avg(),
    }


# ------------------------------------------------------------------------------- report
def _f(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or x != x else f"{x:,.{digits}f}"


def report(res: dict[str, Any], ours_command: str = "") -> str:
    """The comparison as markdown: the load points side by side, then the two ratios."""
    peer = res["peer"]
    ours = res.get("ours")
    ray_side = res["ray"]
    lines = [
        "# Ray Serve peer vs ranker serve",
        "",
        f"- {res['candidates']} candidates per request, {res['distinct_requests']} distinct requests cycled; "
        f"{res['seconds']:g} s per point after {res['cfg']['warmup_s']:g} s warm-up",
        f"- ours: `{ours_command or 'ranker serve'}`",
        f"- Ray Serve {res['ray_version']}: num_cpus={peer['num_cpus']}, {peer['num_replicas']} replicas x "
        f"{peer['num_cpus'] / peer['num_replicas']:g} CPU, torch {peer['torch_threads']} thread per replica, "
        f"@serve.batch(max_batch_size={peer['max_batch_candidates']} candidates via batch_size_fn, "
        f"batch_wait_timeout_s={peer['max_queue_delay_us'] / 1e6:g}), "
        f"max_ongoing_requests={peer['max_ongoing_requests']}; gRPC ingress via Ray's proxy; "
        f"up in {res['ray_startup_s']:.0f} s",
        f"- load average (1/5/15 min) at start {res['load_start']}, at end {res['load_end']}",
        "",
        "| load | ours req/s | ours p50 ms | ours p99 ms | Ray req/s | Ray p50 ms | Ray p99 ms "
        "| requests per batch ours / Ray | errors ours / Ray |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    empty: dict[str, Any] = {"req_s": None, "p50_ms": None, "p99_ms": None, "batch_requests": None, "errors": "-"}
    ray_points = [*ray_side["closed"], ray_side["open"]]
    ours_points = [*ours["closed"], ours["open"]] if ours else [empty] * len(ray_points)
    for o, r in zip(ours_points, ray_points, strict=True):
        load = f"closed, concurrency {r['concurrency']}" if r["rate"] is None else f"open, {r['rate']:,.1f} req/s"
        lines.append(f"| {load} | {_f(o['req_s'])} | {_f(o['p50_ms'])} | {_f(o['p99_ms'])} | {_f(r['req_s'])} "
                     f"| {_f(r['p50_ms'])} | {_f(r['p99_ms'])} | {_f(o['batch_requests'])} / {_f(r['batch_requests'])} "
                     f"| {o['errors']} / {r['errors']} |")
    o_side: dict[str, Any] = ours or {"best_req_s": None, "req_s_at_p99_bound": None, "open": empty}
    frac = res["cfg"]["load_fraction"]
    lines += [
        "",
        "| comparison | ours | Ray | ours / Ray |",
        "|---|---|---|---|",
        f"| throughput at equal p99: best req/s with p99 ≤ {_f(res['p99_bound_ms'])} ms "
        f"| {_f(o_side['req_s_at_p99_bound'])} | {_f(ray_side['req_s_at_p99_bound'])} "
        f"| {_f(res['throughput_ratio'], 2)} |",
        f"| p99 at equal load: open loop at {res['rate']:,.1f} req/s ({frac:.0%} of the lower maximum), ms "
        f"| {_f(o_side['open']['p99_ms'])} | {_f(ray_side['open']['p99_ms'])} | {_f(res['p99_ratio'], 2)} |",
        f"| best req/s at any p99 (closed loop) | {_f(o_side['best_req_s'])} | {_f(ray_side['best_req_s'])} "
        f"| {_f(_ratio(o_side['best_req_s'], ray_side['best_req_s']), 2)} |",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description="Ray Serve peer of ranker serve: the same model, requests and client.")
    ap.add_argument("--quick", action="store_true", help="2 s per point, concurrency 1/8/32: a smoke run")
    ap.add_argument("--seconds", type=float, default=None, help="measured seconds per load point (default 10)")
    ap.add_argument("--candidates", type=int, default=100, help="candidates per request")
    ap.add_argument("--replicas", type=int, default=0, help="Ray replicas; 0 = one per core")
    ap.add_argument("--p99-ms", type=float, default=None, help="common p99 bound; default 3x the slower unloaded p99")
    ap.add_argument("--work", type=Path, default=None, help="keep data, logs and raw results here")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw comparison here")
    args = ap.parse_args()
    try:
        require_ray()
    except RayMissing as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    seconds = args.seconds or (2.0 if args.quick else 10.0)
    cfg = CompareConfig(concurrencies=(1, 8, 32), warmup_s=0.5, prime_s=1.0,
                                                p99_bound_ms=args.p99_ms) if args.quick else \
        CompareConfig(p99_bound_ms=args.p99_ms)
    peer = PeerConfig(replicas=args.replicas)
    knobs = ["--max-batch-candidates", str(peer.max_batch_candidates),
             "--max-queue-delay-us", str(peer.max_queue_delay_us), "--max-queue", str(peer.max_queue)]
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ray_peer_")))
        work.mkdir(parents=True, exist_ok=True)
        print(f"building data and artifact in {work} (load {bs.load_avg()})", file=sys.stderr, flush=True)
        log, artifact, _ = bs.build_artifact(work)
        from features.fitted import FittedTransform

        fitted = FittedTransform.load(work / "feat" / "transform.json")
        requests = bs.make_requests(log, fitted, args.candidates, bs.DISTINCT_REQUESTS)
        with bs.server(artifact, work, "ours", knobs, 0) as sp:
            res = compare_with_ray(artifact, requests, work, sp.target, seconds, cfg=cfg, peer=peer,
                                   ours_totals=server_batch_totals(sp))
            command = sp.command
    text = report(res, command)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
