"""Serving throughput, latency, batching, overload, a KuaiRand model, the Ray Serve peer and a soak, in one run.

Builds the default synthetic data and an untrained model of the default size, exports the
inference artifact, then measures every target of the serving issue (each is printed with its
target and met / missed at the top of the summary):

(1) in process, no gRPC: the serving path's forward of 100 candidates (``ServingPlan.encode``, then
    ``FusedScorer.score``) and ``InferenceModel.score_requests`` end to end, next to the reference
    path (``score_frame`` on a pre-transformed frame, ``reference_score_requests``); the ceiling,
    candidates/s of both paths over batches of 50 .. 4000 candidates at 1 and N torch threads; and
    where one server batch's time goes (parse, decode, encode, forward, respond, serialize);
(2) ``ranker serve --workers N --torch-threads 1`` in its own process, unloaded (concurrency 1, one
    channel): 1- and 100-candidate requests, the health check's round trip on the same channel,
    the column-wise response (``RESPONSE_FORMAT_COLUMNS``, every figure of our server unless
    stated) and the per-candidate one;
(3) a KuaiRand-Pure model of the benchmark's shape (untrained), 1-candidate requests from real test
    rows, concurrency 1 and 8;
(4) closed loop at concurrency 1 / 8 / 32 with 100 and 500 candidates through K channels (K TCP
    connections spread over the N workers by the kernel), and the same with ``--workers 1``; the
    best candidates/s against the in-process ceiling at N threads;
(5) open loop (Poisson) at 70% of the best requests/s of the 100-candidate closed-loop points;
(6) overload: open loop at 3x that capacity, ``--max-queue 32``, with admission by expected wait
    (``--max-queue-wait-ms``, a multiple of the unloaded p99) and without;
(7) the Ray Serve peer (``benchmarks/ray_serve_peer.py``) on the same model, requests and client:
    throughput at equal p99 and p99 at equal load, as ratios ours / Ray;
(8) 50-candidate requests at concurrency 32, batching on vs ``--no-batching``; a soak at 70% of
    capacity with the server's RSS (supervisor and workers) every 10 s and p99 per minute.

The load generator is ``benchmarks/load/client.py`` (grpc.aio, pre-serialized requests, answers not
parsed), always a separate process from the server. Every figure carries the load average when it
was taken; the machine may be shared. The markdown summary goes to stdout (and ``--out``), the raw
figures to a JSON file next to it.

    .venv/bin/python benchmarks/bench_serving.py --out benchmarks/results/serving.md  # ~14 min + the soak
    .venv/bin/python benchmarks/bench_serving.py --quick      # seconds per point: a smoke run of every part
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import numpy as np
import polars as pl
import torch
from prometheus_client.parser import text_string_to_metric_families

from features.build import build, split_expr
from features.datasets import scan_dataset
from features.fitted import FittedTransform
from features.spec import load_spec
from features.synthetic import SynthConfig, write_log
from protos.ranking.v1 import ranker_pb2 as pb
from ranking.artifact import build_model, export_artifact
from ranking.config import ModelConfig
from ranking.inference import InferenceModel
from serving.client import build_request
from serving.decode import decode_request

_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parent
CLIENT = _HERE / "load" / "client.py"
KUAIRAND_DATA = ROOT.parent / "shared" / "data" / "kuairand_pure_subset"
CHANNELS_ENV = "LOAD_CLIENT_CHANNELS"  # the client's default --channels (benchmarks/load/client.py)
FORWARD_SIZES = (50, 100, 250, 500, 1000, 2000, 4000)
CONCURRENCIES = (1, 8, 32)
REQUEST_SIZES = (100, 500)
DISTINCT_REQUESTS = 64  # per request size, cycled by the client
KUAIRAND_REQUESTS = 256  # distinct 1-candidate KuaiRand requests (test rows)
KUAIRAND_MODEL = {"bottom_dims": (), "num_experts": 8, "expert_dims": (128, 64), "tower_dims": (32,)}
COLUMNS, CANDIDATES = pb.RESPONSE_FORMAT_COLUMNS, pb.RESPONSE_FORMAT_CANDIDATES
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}
RawRequest = tuple[dict[str, Any], dict[str, Any], dict[str, Any]]  # (user, context, candidates)


@dataclass(frozen=True)
class BenchConfig:
    """How long each part runs and which server knobs it uses."""

    phase_s: float = 15.0  # measured window of each load point
    warmup_s: float = 3.0  # unrecorded lead-in of each load point
    forward_s: float = 2.0  # timed loop per in-process measurement
    soak_s: float = 300.0
    rss_every_s: float = 10.0
    window_s: float = 60.0  # soak p99 per window
    workers: int = 2  # --workers of every server but the --workers 1 comparison; also the ceiling's threads
    server_threads: int = 1  # --torch-threads of every server
    channels: int = 0  # client channels for loaded points; 0 = 4 per worker
    health_checks: int = 200  # sequential health checks after each unloaded point
    max_batch_candidates: int = 1000
    max_queue_delay_us: int = 2000
    overload_max_queue: int = 32
    overload_factor: float = 3.0
    admission_factor: float = 1.5  # --max-queue-wait-ms = this x the unloaded 100-candidate p99
    load_fraction: float = 0.7  # open loop (5) and the soak, as a share of capacity
    ray: bool = True
    compile: bool = True  # every server gets --compile; the in-process figures are of the compiled network
    ray_s: float = 10.0  # measured seconds per Ray comparison point
    kuairand_data: Path = KUAIRAND_DATA

    @property
    def n_channels(self) -> int:
        return self.channels or 4 * self.workers

    @classmethod
    def quick(cls, **kw: Any) -> BenchConfig:
        return cls(**{"phase_s": 2.0, "warmup_s": 0.5, "forward_s": 0.3, "soak_s": 10.0, "rss_every_s": 2.0,
                      "window_s": 5.0, "ray_s": 2.0, "health_checks": 50, **kw})

    def __post_init__(self) -> None:
        for name in ("workers", "server_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.channels < 0:
            raise ValueError(f"channels must be >= 0 (0 = 4 per worker), got {self.channels}")


def load_avg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------ data and requests
def build_artifact(work: Path) -> tuple[Path, Path, ModelConfig]:
    """Default synthetic log -> features -> untrained default-size model -> artifact folder."""
    write_log(SynthConfig(), work / "log")
    build(work / "log", load_spec("synthetic"), work / "feat")
    fitted = FittedTransform.load(work / "feat" / "transform.json")
    torch.manual_seed(0)
    cfg = ModelConfig.from_fitted(fitted)
    art = export_artifact(build_model(cfg), cfg, fitted, work / "artifact",
                          {"model_name": "ranker", "model_version": "1"})
    return work / "log", Path(art), cfg


def make_requests(log: Path, fitted: FittedTransform, n_candidates: int, count: int,
                  response_format: pb.ResponseFormat = CANDIDATES) -> list[pb.RankRequest]:
    """``count`` requests of ``n_candidates`` real logged candidate rows each.

    Request i takes its user and context from one logged slate and its candidates from as many
    consecutive slates as it needs (a slate holds 20), cut to ``n_candidates``.
    """
    spec = fitted.spec
    keys = spec.keys
    if keys.request is None or keys.item is None:
        raise ValueError(f"spec {spec.name!r} must name a request and an item key, got {keys}")
    request_key: str = keys.request
    item_key: str = keys.item
    frame = pl.concat([pl.read_parquet(p) for p in sorted(log.rglob("*.parquet"))], how="vertical_relaxed")
    frame = frame.sort(request_key, maintain_order=True)  # slates contiguous
    item_cols = [c for c in spec.features_from("item") if c != item_key]
    slate = frame.filter(pl.col(request_key) == frame[request_key][0]).height
    per = -(-n_candidates // slate)  # slates per request, rounded up
    if count * per * slate > frame.height:
        raise ValueError(f"the log holds {frame.height} rows, {count} x {n_candidates} candidates asked for")
    out = []
    for i in range(count):
        rows = frame.slice(i * per * slate, n_candidates)
        first = rows.row(0, named=True)
        out.append(build_request(
            {c: first[c] for c in spec.features_from("user")},
            {c: first[c] for c in spec.features_from("context")},
            {c: rows[c].to_list() for c in item_cols},
            rows[item_key].to_list(),
            request_id=f"bench-{n_candidates}-{i}",
            response_format=response_format,
        ))
    return out


def build_kuairand(data: Path, work: Path, count: int) -> tuple[Path, list[pb.RankRequest], int]:
    """KuaiRand-Pure -> features -> untrained model of the benchmark's shape -> artifact; and
    ``count`` 1-candidate requests, each one real test row (user and context from the row).

    Rows with a null feature are skipped (the API has no null; 22 of the first 2,000 test rows
    lack ``video_duration``). Returns (artifact, requests, parameters).
    """
    spec = load_spec("kuairand")
    raw = scan_dataset("kuairand", data)
    build(raw, spec, work / "feat")
    fitted = FittedTransform.load(work / "feat" / "transform.json")
    torch.manual_seed(0)
    cfg = ModelConfig.from_fitted(fitted, **KUAIRAND_MODEL)
    model = build_model(cfg)
    art = export_artifact(model, cfg, fitted, work / "artifact", {"model_name": "kuairand", "model_version": "1"})
    item_key = spec.keys.item
    if item_key is None:
        raise ValueError(f"spec {spec.name!r} must name an item key")
    user, context, item = (spec.features_from(s) for s in ("user", "context", "item"))
    rows = raw.filter(split_expr(raw, spec) == "test").select(*user, *context, *item).drop_nulls().head(count)
    requests = [
        build_request({c: r[c] for c in user}, {c: r[c] for c in context},
                      {c: [r[c]] for c in item if c != item_key}, [r[item_key]],
                      request_id=f"kuairand-{i}", response_format=COLUMNS)
        for i, r in enumerate(rows.collect().iter_rows(named=True))
    ]
    return Path(art), requests, sum(p.numel() for p in model.parameters())


def write_payloads(requests: list[pb.RankRequest], path: Path) -> Path:
    path.write_bytes(pickle.dumps([r.SerializeToString() for r in requests]))
    return path


# ---------------------------------------------------------------------- (1) in process
def _best_rate(fn: Callable[[], Any], n: int, seconds: float) -> tuple[float, float]:
    """Run ``fn`` repeatedly for ``seconds``; (items/s over the loop, median ms per call)."""
    fn()  # warm-up
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n * len(times) / sum(times), 1e3 * float(np.median(times))


def _raw(model: InferenceModel, requests: list[pb.RankRequest]) -> list[RawRequest]:
    return [(d.user, d.context, d.candidates) for d in (decode_request(r, model.fitted, 10_000) for r in requests)]


def forward_latency(model: InferenceModel, req: pb.RankRequest, seconds: float,
                    eager: InferenceModel | None = None) -> dict[str, float]:
    """Median ms per call for one request (100 candidates), each step of both paths on its own;
    with ``eager``, the eager forward (and ``score_requests``) of a model that ``model`` compiles."""
    raw = _raw(model, [req])
    encoded = model.plan.encode(raw)
    frame = model.fitted.transform_requests(raw)
    extra: dict[str, Callable[[], Any]] = {} if eager is None else {
        "forward eager": lambda: eager.scorer.score(encoded),
        "score_requests eager": lambda: eager.score_requests(raw),
    }
    steps: dict[str, Callable[[], Any]] = {
        **extra,
        "encode": lambda: model.plan.encode(raw),
        "forward": lambda: model.scorer.score(encoded),
        "score_requests": lambda: model.score_requests(raw),
        "transform": lambda: model.fitted.transform_requests(raw),
        "score_frame": lambda: model.score_frame(frame),
        "reference_score_requests": lambda: model.reference_score_requests(raw),
    }
    return {name: _best_rate(fn, 1, seconds)[1] for name, fn in steps.items()}


def forward_ceiling(model: InferenceModel, full: list[pb.RankRequest], half: pb.RankRequest,
                    seconds: float) -> list[dict[str, Any]]:
    """Candidates/s per batch size: ``score_requests`` (serving path), ``score_frame`` on frames
    transformed beforehand (the old ceiling) and ``reference_score_requests`` (the old path end to end).

    A batch of n candidates is what the batcher cuts: n // 100 of the 100-candidate requests
    ``full``, plus the 50-candidate ``half`` when n ends in 50.
    """
    pool, extra = _raw(model, full), _raw(model, [half])
    rows = []
    for n in FORWARD_SIZES:
        q, r = divmod(n, 100)
        if r not in (0, 50) or q > len(pool):
            raise ValueError(f"batch of {n} candidates: need a multiple of 50 up to {100 * len(pool) + 50}")
        batch = pool[:q] + extra[: r // 50]
        frame = model.fitted.transform_requests(batch)
        row: dict[str, Any] = {"batch": n}
        for name, fn in (("serving", lambda b=batch: model.score_requests(b)),
                         ("frame", lambda f=frame: model.score_frame(f)),
                         ("reference", lambda b=batch: model.reference_score_requests(b))):
            row[f"{name}_cand_s"], row[f"{name}_ms"] = _best_rate(fn, n, seconds)
        rows.append({**row, "load": load_avg()})
    return rows


def stage_breakdown(model: InferenceModel, requests: list[pb.RankRequest], as_candidates: list[pb.RankRequest],
                    seconds: float) -> dict[str, float]:
    """Where one server batch's time goes, per candidate (µs): the steps of ``serving.server.rank_batch``
    on ``requests`` (column-wise responses), and the per-candidate response of ``as_candidates``."""
    from serving.holder import LoadedModel
    from serving.server import respond

    loaded = LoadedModel(model=model, name="ranker", version="1", uri=str(model.path), loaded_at=time.time())
    n = sum(len(r.candidates.item_ids.ints.values) or len(r.candidates.item_ids.strings.values) for r in requests)
    decoded = [decode_request(r, model.fitted) for r in requests]
    raw = [(d.user, d.context, d.candidates) for d in decoded]
    encoded = model.plan.encode(raw)
    scores = model.score_requests(raw)
    payloads = [r.SerializeToString() for r in requests]

    def answers(reqs: list[pb.RankRequest]) -> list[pb.RankResponse]:
        return [respond(loaded, r, d, s) for r, d, s in zip(reqs, decoded, scores, strict=True)]

    columns, per_candidate = answers(requests), answers(as_candidates)
    steps: dict[str, Callable[[], Any]] = {
        "parse request bytes": lambda: [pb.RankRequest.FromString(p) for p in payloads],
        "decode_request": lambda: [decode_request(r, model.fitted) for r in requests],
        "ServingPlan.encode": lambda: model.plan.encode(raw),
        "FusedScorer.score (forward)": lambda: model.scorer.score(encoded),
        "respond (combine, sort, build columns)": lambda: answers(requests),
        "serialize response (columns)": lambda: [r.SerializeToString() for r in columns],
        "respond, per-candidate messages (instead)": lambda: answers(as_candidates),
        "serialize response, per-candidate (instead)": lambda: [r.SerializeToString() for r in per_candidate],
    }
    return {name: 1e6 / _best_rate(fn, n, seconds)[0] for name, fn in steps.items()}


IDLE_GAP_S = 0.002  # what an unloaded server sees between requests (the client's turn + the transport)


def idle_gap_cost(model: InferenceModel, requests: dict[int, pb.RankRequest],
                  seconds: float) -> dict[int, dict[str, Any]]:
    """Median µs of the server's per-request steps (``serving.server.rank_batch`` and its parts) back to back
    ("hot") and each after ``IDLE_GAP_S`` of sleep ("after idle"): an unloaded server runs every request on
    a core that has just been idle, and that costs more than the same code in a loop."""
    from serving.holder import LoadedModel
    from serving.server import Job, rank_batch, respond

    loaded = LoadedModel(model=model, name="ranker", version="1", uri=str(model.path), loaded_at=time.time())
    out: dict[int, dict[str, Any]] = {}
    for n, req in requests.items():
        d = decode_request(req, model.fitted)
        raw = [(d.user, d.context, d.candidates)]
        scores = model.score_requests(raw)[0]
        steps: dict[str, Callable[[], Any]] = {
            "rank_batch": lambda r=req: rank_batch([Job(loaded, r)]),
            "decode_request": lambda r=req: decode_request(r, model.fitted),
            "score_requests": lambda r=raw: model.score_requests(r),
            "respond": lambda r=req, d=d, s=scores: respond(loaded, r, d, s),
        }
        row: dict[str, Any] = {}
        for name, fn in steps.items():
            for label, gap in (("hot", 0.0), ("after idle", IDLE_GAP_S)):
                times: list[float] = []
                fn()
                t_end = time.perf_counter() + seconds / 8
                while time.perf_counter() < t_end or len(times) < 20:
                    if gap:
                        time.sleep(gap)
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
                row[f"{name} {label}"] = 1e6 * float(np.median(times))
        out[n] = row
    return out


# ------------------------------------------------------------------------- the server process
def process_tree(root: int) -> list[int]:
    """``root`` and every process below it (from ``/proc/*/stat``), root first."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    out, frontier = [root], [root]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        out += frontier
    return out


def _sockets(port: int) -> dict[str, str]:
    """inode -> TCP state (``0A`` listening, ``01`` established) of the sockets on local ``port``."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if int(f[1].rsplit(":", 1)[1], 16) == port:
                    out[f[9]] = f[3]
    return out


@dataclass
class ServerProcess:
    """``python -m pipelines serve --workers N`` in its own process; ``target`` once it is SERVING."""

    artifact: Path
    work: Path
    name: str
    args: list[str]
    workers: int
    threads: int = 0  # --torch-threads; 0 = the CLI default (1)
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    metrics_port: int = 0
    command: str = ""

    def start(self, timeout_s: float = 180.0) -> None:
        ready = self.work / f"{self.name}.port"
        ready.unlink(missing_ok=True)
        log = self.work / f"{self.name}.log"
        cmd = [sys.executable, "-m", "pipelines", "serve", "--model", str(self.artifact), "--port", "0",
               "--ready-file", str(ready), "--metrics-port", "0", "--log-format", "json",
               "--workers", str(self.workers), *(["--torch-threads", str(self.threads)] if self.threads else []),
               *self.args]
        self.command = shlex.join(["ranker", *cmd[3:]]).replace(str(self.artifact), "<artifact>").replace(
            str(self.work), "<work>")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdout=log.open("wb"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not ready.exists() or not ready.read_text().strip():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server {self.name} did not start; see {log}:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        self.port = int(ready.read_text())
        found = re.search(r"metrics_port=(\d+)", log.read_text())
        self.metrics_port = int(found.group(1)) if found else 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        if self.proc is None:
            raise RuntimeError(f"server {self.name} is not running")
        return process_tree(self.proc.pid)

    def rss_mib(self) -> float:
        """Resident set size of the server's processes together (``VmRSS``: supervisor and workers), MiB."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total / 1024

    def connections(self) -> list[int]:
        """Established client connections per worker (a process listening on the port), most first."""
        sockets = _sockets(self.port)
        counts = []
        for pid in self.pids():
            states = []
            with contextlib.suppress(OSError):
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    with contextlib.suppress(OSError):
                        link = os.readlink(fd)
                        if link.startswith("socket:[") and link[8:-1] in sockets:
                            states.append(sockets[link[8:-1]])
            if "0A" in states:
                counts.append(states.count("01"))
        return sorted(counts, reverse=True)

    def batch_totals(self) -> dict[str, float]:
        """Sums and counts of the batch histograms from ``/metrics`` (diff two reads for a phase)."""
        if not self.metrics_port:
            return {}
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name.startswith(("ranker_batch_requests_", "ranker_batch_candidates_")) and \
                        s.name.endswith(("_sum", "_count")):
                    out[s.name] = out.get(s.name, 0.0) + s.value  # summed over any per-worker series
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def server(artifact: Path, work: Path, name: str, args: list[str], threads: int = 0, workers: int = 0
           ) -> Iterator[ServerProcess]:
    """A started :class:`ServerProcess`, stopped on exit; ``workers`` 0 = one per core, ``threads`` 0 = the
    CLI default (1)."""
    sp = ServerProcess(artifact, work, name, args, workers or os.cpu_count() or 1, threads)
    print(f"starting {name}: --workers {sp.workers} {' '.join(args)} (load {load_avg()})", file=sys.stderr,
          flush=True)
    try:
        sp.start()
        yield sp
    finally:
        sp.stop()


# ----------------------------------------------------------------------------- a load run
@dataclass
class LoadResult:
    """Client-side view of one load run (latencies in ms)."""

    label: str
    candidates: int
    concurrency: int | None
    rate: float | None  # offered arrivals/s (open loop)
    duration_s: float
    start: np.ndarray
    latency_ms: np.ndarray
    code: np.ndarray
    meta: dict[str, Any]
    load: str
    health_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    server_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))  # RankResponse.server_time_us, OK calls
    connections: list[int] = field(default_factory=list)  # per worker, most first
    mean_batch_requests: float = float("nan")
    mean_batch_candidates: float = float("nan")
    codes: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.codes = Counter(CODE_NAMES.get(int(c), str(c)) for c in self.code)

    @property
    def ok(self) -> np.ndarray:
        return self.code == 0

    @property
    def refused(self) -> np.ndarray:
        return self.code == RESOURCE_EXHAUSTED

    @property
    def req_s(self) -> float:
        return float(self.ok.sum()) / self.duration_s

    @property
    def cand_s(self) -> float:
        return self.req_s * self.candidates

    @property
    def channels(self) -> int:
        return int(self.meta.get("channels", 1))

    def pct(self, q: float, mask: np.ndarray | None = None) -> float:
        lat = self.latency_ms[self.ok if mask is None else mask]
        return float(np.percentile(lat, q)) if lat.size else float("nan")

    def health_pct(self, q: float) -> float:
        return float(np.percentile(self.health_ms, q)) if self.health_ms.size else float("nan")

    def server_pct(self, q: float) -> float:
        """Percentile of the server's own time per answered call (ms; NaN unless ``--server-time``)."""
        t = self.server_ms[np.isfinite(self.server_ms)]
        return float(np.percentile(t, q)) if t.size else float("nan")

    @property
    def errors(self) -> str:
        bad = {k: v for k, v in self.codes.items() if k != "OK"}
        return ", ".join(f"{k} {v}" for k, v in sorted(bad.items())) or "0"

    @property
    def client_cpu(self) -> float:
        """The load generator's CPU use over its run, in cores."""
        return float(self.meta["client_cpu_s"]) / float(self.meta["wall_s"])

    def summary(self) -> dict[str, Any]:
        """The figures of this run for the JSON file."""
        ok, refused = self.ok, self.refused
        return {
            "label": self.label, "candidates": self.candidates, "concurrency": self.concurrency,
            "rate": self.rate, "channels": self.channels, "duration_s": self.duration_s,
            "calls": len(self.code), "req_s": self.req_s, "cand_s": self.cand_s,
            **{f"p{q:g}_ms": self.pct(q) for q in (50, 90, 99, 99.9)},
            "refused": int(refused.sum()), "refused_p50_ms": self.pct(50, refused),
            "refused_p99_ms": self.pct(99, refused), "admitted": int(ok.sum()), "codes": dict(self.codes),
            "health_p50_ms": self.health_pct(50), "health_p99_ms": self.health_pct(99),
            "server_p50_ms": self.server_pct(50), "server_p99_ms": self.server_pct(99),
            "connections_per_worker": self.connections, "mean_batch_requests": self.mean_batch_requests,
            "mean_batch_candidates": self.mean_batch_candidates, "client_cpu": self.client_cpu,
            "skipped": self.meta.get("skipped", 0), "load": self.load,
        }


def run_load(sp: ServerProcess, payloads: Path, n_candidates: int, cfg: BenchConfig, label: str, *,
             concurrency: int | None = None, rate: float | None = None, duration_s: float | None = None,
             channels: int = 1, health_checks: int = 0, server_time: bool = False,
             on_tick: Callable[[], None] | None = None) -> LoadResult:
    """One client process against ``sp``: closed loop at ``concurrency`` or open loop at ``rate``."""
    duration = duration_s or cfg.phase_s
    out = sp.work / f"{sp.name}_{re.sub(r'[^A-Za-z0-9.]+', '_', label)}.npz"
    cmd = [sys.executable, str(CLIENT), "--target", sp.target, "--payloads", str(payloads), "--out", str(out),
           "--duration-s", str(duration), "--warmup-s", str(cfg.warmup_s), "--channels", str(channels),
           "--health-checks", str(health_checks), *(["--server-time"] if server_time else [])]
    cmd += ["--mode", "closed", "--concurrency", str(concurrency)] if rate is None else \
        ["--mode", "open", "--rate", f"{rate:.3f}"]
    load = load_avg()
    before = sp.batch_totals()
    client = subprocess.Popen(cmd, cwd=ROOT)
    conns: list[int] = []
    next_look = time.monotonic() + 1.0
    while client.poll() is None:
        if on_tick is not None:
            on_tick()
        if time.monotonic() >= next_look:  # the most connections seen: all channels up
            seen = sp.connections()
            conns = seen if sum(seen) > sum(conns) else conns
            next_look += 1.0
        time.sleep(0.2)
    if client.returncode != 0:
        raise RuntimeError(f"load client failed ({client.returncode}): {shlex.join(cmd)}")
    after = sp.batch_totals()
    data = np.load(out)
    res = LoadResult(label, n_candidates, concurrency, rate, duration, data["start"], 1e3 * data["latency"],
                     data["code"], json.loads(str(data["meta"])), load, 1e3 * data["health_latency"],
                     1e3 * data["server_time"], conns)
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    if d.get("ranker_batch_requests_count"):
        res.mean_batch_requests = d["ranker_batch_requests_sum"] / d["ranker_batch_requests_count"]
        res.mean_batch_candidates = d["ranker_batch_candidates_sum"] / d["ranker_batch_candidates_count"]
    health = f", health p50 {res.health_pct(50):.2f} ms" if res.health_ms.size else ""
    health += f", in the server p50 {res.server_pct(50):.2f} ms" if res.server_ms.size else ""
    print(f"  {label}: {res.cand_s:,.0f} cand/s, {res.req_s:,.1f} req/s, p50 {res.pct(50):.2f} ms, "
          f"p99 {res.pct(99):.2f} ms, errors {res.errors}{health}, connections {conns}, load {load}",
          file=sys.stderr, flush=True)
    return res


def closed(sp: ServerProcess, payloads: Path, n: int, c: int, cfg: BenchConfig, label: str,
           health: bool = False) -> LoadResult:
    """A closed-loop point: one channel at concurrency 1 (the server's own time per call recorded, health
    checks after it if asked), else K channels."""
    return run_load(sp, payloads, n, cfg, label, concurrency=c, channels=1 if c == 1 else cfg.n_channels,
                    health_checks=cfg.health_checks if health else 0, server_time=c == 1)


# ----------------------------------------------------------------------------------- soak
@dataclass
class Soak:
    result: LoadResult
    rss: list[tuple[float, float]]  # (s since start, MiB)

    def slope_mib_per_min(self, after_s: float = 0.0) -> float:
        """Least-squares RSS slope over the samples taken ``after_s`` seconds or later."""
        t, m = np.asarray([x for x in self.rss if x[0] >= after_s]).reshape(-1, 2).T
        return float(np.polyfit(t / 60.0, m, 1)[0]) if len(t) > 2 else float("nan")

    def p99_windows(self, window_s: float) -> list[float]:
        r = self.result
        edges = np.arange(0.0, r.duration_s + 1e-9, window_s)
        out = []
        for lo, hi in itertools.pairwise(edges):
            mask = r.ok & (r.start >= lo) & (r.start < hi)
            out.append(r.pct(99, mask))
        return out


def soak(sp: ServerProcess, payloads: Path, rate: float, cfg: BenchConfig) -> Soak:
    rss: list[tuple[float, float]] = []
    t0 = time.monotonic()
    next_sample = [t0]

    def tick() -> None:
        now = time.monotonic()
        if now >= next_sample[0]:
            rss.append((now - t0, sp.rss_mib()))
            next_sample[0] += cfg.rss_every_s

    res = run_load(sp, payloads, 100, cfg, "soak", rate=rate, duration_s=cfg.soak_s, channels=cfg.n_channels,
                   on_tick=tick)
    rss.append((time.monotonic() - t0, sp.rss_mib()))
    return Soak(res, rss)


# -------------------------------------------------------------------------- (7) Ray Serve
@contextlib.contextmanager
def client_channels(k: int) -> Iterator[None]:
    """Clients started meanwhile by other drivers (``ray_serve_peer``) open ``k`` channels by default."""
    before = os.environ.get(CHANNELS_ENV)
    os.environ[CHANNELS_ENV] = str(k)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(CHANNELS_ENV, None)
        else:
            os.environ[CHANNELS_ENV] = before


def ray_comparison(sp: ServerProcess, artifact: Path, requests: list[pb.RankRequest], cfg: BenchConfig,
                   ) -> tuple[dict[str, Any] | None, str, str]:
    """``ray_serve_peer.compare_with_ray`` against the running server ``sp``: (result, its report, note)."""
    if not cfg.ray:
        return None, "", "skipped (--no-ray)"
    try:
        import ray_serve_peer as peer
    except ImportError as e:
        return None, "", f"skipped: benchmarks/ray_serve_peer.py does not import ({e})"
    try:
        peer.require_ray()
    except peer.RayMissing as e:
        return None, "", f"skipped: {e}"
    compare = peer.CompareConfig(concurrencies=CONCURRENCIES, warmup_s=cfg.warmup_s,
                                 prime_s=min(2.0, cfg.phase_s), load_fraction=cfg.load_fraction)
    knobs = peer.PeerConfig(replicas=cfg.workers, torch_threads=cfg.server_threads,
                            max_batch_candidates=cfg.max_batch_candidates, max_queue_delay_us=cfg.max_queue_delay_us)
    work = sp.work / "ray"
    work.mkdir(exist_ok=True)
    try:
        with client_channels(cfg.n_channels):
            res = peer.compare_with_ray(artifact, requests, work, sp.target, cfg.ray_s, cfg=compare, peer=knobs,
                                        ours_totals=peer.server_batch_totals(sp))
    except Exception as e:  # a peer that fails to start must not lose the rest of the run
        traceback.print_exc()
        return None, "", f"failed: {type(e).__name__}: {str(e)[:300]}"
    return res, peer.report(res, sp.command), ""


# ------------------------------------------------------------------------------- report
def machine() -> dict[str, str]:
    """``lscpu`` model name and cores, memory, versions."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    cores = "?"
    with contextlib.suppress(KeyError, ValueError):
        cores = str(int(info["Core(s) per socket"]) * int(info["Socket(s)"]))
    mem = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
    return {"model": info.get("Model name", "?"), "cores": cores, "logical_cpus": str(os.cpu_count()),
            "memory_gib": f"{mem / 2**20:.0f}", "torch": torch.__version__, "grpcio": grpc.__version__,
            "python": sys.version.split()[0]}


def _f(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or x != x else f"{x:,.{digits}f}"


class Target(NamedTuple):
    """One target of the issue: what is asked, what was measured, whether it was met (None: not measured)."""

    name: str
    goal: str
    measured: str
    met: bool | None


def _best(rows: list[dict[str, Any]], key: str, threads: int | None = None) -> dict[str, Any]:
    return max((r for r in rows if threads is None or r["threads"] == threads), key=lambda r: r[key])


def targets(ctx: dict[str, Any]) -> list[Target]:
    cfg: BenchConfig = ctx["cfg"]
    w = cfg.workers
    lat1 = ctx["latency"][1]
    fwd = lat1["encode"] + lat1["forward"]
    ceiling = ctx["ceiling"]
    new, old = _best(ceiling, "serving_cand_s"), _best(ceiling, "frame_cand_s")
    new_w = _best(ceiling, "serving_cand_s", w)
    main: dict[str, LoadResult] = ctx["main"]
    u100, u1 = main["100 c1"], main["1 c1"]
    floor = f"health check {_f(u100.health_pct(50), 2)} ms"
    idle = ctx["idle"]
    e2e = max((r for r in main.values() if r.concurrency), key=lambda r: r.cand_s)
    o70: LoadResult = main["open 70%"]
    over_on, over_off = ctx["overload"]["with"], ctx["overload"]["without"]
    on, off = main["50 c32"], ctx["off"]
    ratio = on.cand_s / off.cand_s if off.cand_s else float("nan")
    kr: LoadResult | None = ctx["kuairand"].get("1 c8")
    ray = ctx["ray"]["result"]
    sk: Soak = ctx["soak"]
    rss = [m for _, m in sk.rss]
    slope = sk.slope_mib_per_min(cfg.window_s)
    out = [
        Target("1. forward, 100 candidates (encode + FusedScorer.score, 1 thread"
               + (", compiled)" if cfg.compile else ")"), "≤ 1.0 ms",
               f"{_f(fwd, 3)} ms (encode {_f(lat1['encode'], 3)} + forward {_f(lat1['forward'], 3)}); old "
               f"`score_frame` {_f(lat1['score_frame'], 3)} ms = {lat1['score_frame'] / fwd:.1f}x slower", fwd <= 1.0),
        Target("1. `score_requests` end to end, 100 candidates, 1 thread", "≤ 1.0 ms (the strict reading)",
               f"{_f(lat1['score_requests'], 3)} ms; old `reference_score_requests` "
               f"{_f(lat1['reference_score_requests'], 3)} ms = "
               f"{lat1['reference_score_requests'] / lat1['score_requests']:.1f}x slower",
               lat1["score_requests"] <= 1.0),
        Target("1. in-process ceiling, best batch", "≥ 1.5x the old (`score_frame`)",
               f"{new['serving_cand_s']:,.0f} cand/s ({new['batch']}, {new['threads']} thr) vs "
               f"{old['frame_cand_s']:,.0f} ({old['batch']}, {old['threads']} thr) = "
               f"{new['serving_cand_s'] / old['frame_cand_s']:.2f}x",
               new["serving_cand_s"] >= 1.5 * old["frame_cand_s"]),
        Target("2. unloaded p50, 100 candidates (columns)", "≤ 2 ms",
               f"{_f(u100.pct(50), 2)} ms ({floor}; {_inside(u100, idle[100])})", u100.pct(50) <= 2.0),
        Target("2. unloaded p99, 100 candidates (columns)", "≤ 3 ms", f"{_f(u100.pct(99), 2)} ms", u100.pct(99) <= 3.0),
        Target("2. unloaded p50, 1 candidate (columns)", "≤ 1 ms",
               f"{_f(u1.pct(50), 2)} ms (health check {_f(u1.health_pct(50), 2)} ms; {_inside(u1, idle[1])})",
               u1.pct(50) <= 1.0),
        Target("3. KuaiRand, 1 candidate, concurrency 8", "≥ 3,000 req/s",
               f"{kr.req_s:,.0f} req/s, p99 {_f(kr.pct(99), 2)} ms" if kr else ctx["kuairand"]["note"],
               kr.req_s >= 3000 if kr else None),
        Target(f"4. end to end (--workers {w}) vs in-process ceiling at {w} threads", "≥ 80%",
               f"{e2e.cand_s:,.0f} ({e2e.candidates} cands, c{e2e.concurrency}) / {new_w['serving_cand_s']:,.0f} = "
               f"{e2e.cand_s / new_w['serving_cand_s']:.0%}", e2e.cand_s >= 0.8 * new_w["serving_cand_s"]),
        Target(f"5. p99 at {cfg.load_fraction:.0%} of max throughput", "≤ 3x unloaded p50",
               f"{_f(o70.pct(99), 2)} ms at {o70.rate:,.0f} req/s vs 3 x {_f(u100.pct(50), 2)} = "
               f"{_f(3 * u100.pct(50), 2)} ms", o70.pct(99) <= 3 * u100.pct(50)),
        Target(f"6. overload {cfg.overload_factor:g}x: admitted p99 (--max-queue-wait-ms {ctx['budget_ms']:g})",
               "≤ 2x unloaded p99",
               f"{_f(over_on.pct(99), 2)} ms vs 2 x {_f(u100.pct(99), 2)} = {_f(2 * u100.pct(99), 2)} ms "
               f"(without the budget: {_f(over_off.pct(99), 2)} ms)", over_on.pct(99) <= 2 * u100.pct(99)),
        Target("6. overload: refusals p99 (with the budget)", "≤ 5 ms",
               f"{_f(over_on.pct(99, over_on.refused), 2)} ms of {int(over_on.refused.sum())} "
               f"(without: {_f(over_off.pct(99, over_off.refused), 2)} ms of {int(over_off.refused.sum())})",
               over_on.pct(99, over_on.refused) <= 5.0 if over_on.refused.any() else None),
    ]
    if ray is not None:
        tr, pr = ray["throughput_ratio"], ray["p99_ratio"]
        met = None if tr is None or pr is None else tr >= 1.0 and pr <= 1.0
        out.append(Target("7. ours vs Ray Serve (same model, load, client)",
                          "throughput at equal p99 ≥ 1x, p99 at equal load ≤ 1x",
                          f"throughput {_f(tr, 2)}x, p99 {_f(pr, 2)}x", met))
    else:
        out.append(Target("7. ours vs Ray Serve", "ratios", ctx["ray"]["note"], None))
    out += [
        Target("8. batching on vs off (50 cands, c32)", "≥ 3x", f"{ratio:.2f}x", ratio >= 3),
        Target("8. soak: RSS flat, 0 errors", "|slope| ≤ 1 MiB/min after the first window, 0 errors",
               f"{rss[0]:.0f} -> {rss[-1]:.0f} MiB, {slope:+.2f} MiB/min; errors {sk.result.errors}",
               abs(slope) <= 1.0 and sk.result.errors == "0" if slope == slope else None),
    ]
    return out


def _inside(r: LoadResult, idle: dict[str, float]) -> str:
    """Where an unloaded round trip goes: the server's own time, and its ``rank_batch`` after an idle gap vs hot."""
    cold, hot = idle["rank_batch after idle"] / 1e3, idle["rank_batch hot"] / 1e3
    return (f"in the server {_f(r.server_pct(50), 2)} ms; `rank_batch` in process {_f(cold, 2)} ms after "
            f"{IDLE_GAP_S * 1e3:g} ms idle, {_f(hot, 2)} ms back to back")


def _closed_rows(results: list[tuple[int, LoadResult]]) -> list[str]:
    return [
        f"| {w} | {r.candidates} | {r.concurrency} | {r.channels} | {'/'.join(map(str, r.connections)) or '?'} "
        f"| {r.cand_s:,.0f} | {r.req_s:,.1f} | {_f(r.pct(50), 2)} | {_f(r.pct(99), 2)} | {r.errors} "
        f"| {_f(r.mean_batch_requests)} / {_f(r.mean_batch_candidates, 0)} | {r.client_cpu:.2f} | {r.load} |"
        for w, r in results
    ]


def report(ctx: dict[str, Any]) -> str:
    cfg: BenchConfig = ctx["cfg"]
    w = cfg.workers
    m = ctx["machine"]
    main: dict[str, LoadResult] = ctx["main"]
    tlist = ctx["targets"]
    lines = [
        "# Serving benchmark",
        "",
        f"- command: `{ctx['command']}`",
        f"- date: {ctx['date']} (UTC); total {ctx['elapsed_min']:.1f} min, of which the soak "
        f"{ctx['soak_min']:.1f} min ({ctx['elapsed_min'] - ctx['soak_min']:.1f} min without it)",
        f"- machine: {m['model']}, {m['cores']} cores ({m['logical_cpus']} logical CPUs), {m['memory_gib']} GiB; "
        f"torch {m['torch']}, grpcio {m['grpcio']}, Python {m['python']}",
        f"- load average (1/5/15 min) at start: {ctx['load_start']}, at end: {ctx['load_end']}; per point in "
        f"each table",
        f"- models (untrained): default `ModelConfig.from_fitted` on default `SynthConfig()` data, "
        f"{ctx['params']:,} parameters; KuaiRand-Pure {KUAIRAND_MODEL} ({ctx['kuairand'].get('params', 0):,} "
        f"parameters)",
        f"- our server: `{ctx['main_cmd']}` (every start passes `--workers`; the others differ only as stated)",
        "- responses: `RESPONSE_FORMAT_COLUMNS` (column-wise `RankResponse.ranked`) for every figure of our "
        "server unless a row says per-candidate (`RESPONSE_FORMAT_CANDIDATES`, the v1 default)",
        f"- load generator: `benchmarks/load/client.py`, one grpc.aio process per point, pre-serialized requests, "
        f"answers not parsed; concurrency 1 on one channel, every other point on {cfg.n_channels} channels "
        f"(`--channels`, one TCP connection each; connections per worker as counted in /proc during the point); "
        f"{cfg.phase_s:g} s measured after {cfg.warmup_s:g} s warm-up per point",
        "",
        "## Targets (measured, not asserted)",
        "",
        "| target | goal | measured | met? |",
        "|---|---|---|---|",
        *(f"| {t.name} | {t.goal} | {t.measured} | {'n/a' if t.met is None else 'met' if t.met else 'MISSED'} |"
          for t in tlist),
        "",
        f"Met {sum(t.met is True for t in tlist)} of {sum(t.met is not None for t in tlist)} measured targets.",
        "",
        "## (1) In process: the serving path vs the reference path",
        "",
        "One request of 100 (and of 1) candidates, median ms per call"
        + (" (forward: the network compiled ahead of time, as `--compile` serves it; eager beside it):"
           if cfg.compile else ":"),
        "",
        "| candidates | torch threads | encode | forward | forward eager | encode + forward | `score_requests` "
        "| `score_requests` eager | transform (Polars) | `score_frame` | `reference_score_requests` "
        "| forward old / new | end to end old / new |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, key in ((100, "latency"), (1, "latency_1")):
        for t, lat in ctx[key].items():
            fwd = lat["encode"] + lat["forward"]
            lines.append(
                f"| {n} | {t} | {lat['encode']:.3f} | {lat['forward']:.3f} | {_f(lat.get('forward eager'), 3)} "
                f"| {fwd:.3f} | {lat['score_requests']:.3f} | {_f(lat.get('score_requests eager'), 3)} "
                f"| {lat['transform']:.3f} | {lat['score_frame']:.3f} | {lat['reference_score_requests']:.3f} "
                f"| {lat['score_frame'] / fwd:.1f}x | {lat['reference_score_requests'] / lat['score_requests']:.1f}x |")
    lines += [
        "",
        "Ceiling: candidates/s per batch (k requests of 100 candidates, plus one of 50), `score_requests` "
        "(raw features in) vs the old ceiling `score_frame` (frames transformed beforehand) and "
        "`reference_score_requests` (raw features in, Polars transform):",
        "",
        "| torch threads | candidates per batch | `score_requests` cand/s (ms) | `score_frame` cand/s (ms) "
        "| `reference_score_requests` cand/s (ms) | new / `score_frame` | load |",
        "|---:|---:|---:|---:|---:|---:|---|",
        *(f"| {r['threads']} | {r['batch']} | {r['serving_cand_s']:,.0f} ({r['serving_ms']:.2f}) "
          f"| {r['frame_cand_s']:,.0f} ({r['frame_ms']:.2f}) | {r['reference_cand_s']:,.0f} ({r['reference_ms']:.2f}) "
          f"| {r['serving_cand_s'] / r['frame_cand_s']:.2f}x | {r['load']} |" for r in ctx["ceiling"]),
        "",
        "Where one server batch's time goes (`serving.server.rank_batch` steps, 10 requests x 100 candidates, "
        "1 torch thread, µs per candidate):",
        "",
        "| step | µs / candidate | share |",
        "|---|---:|---:|",
    ]
    stages: dict[str, float] = ctx["stages"]
    main_steps = {k: v for k, v in stages.items() if "(instead)" not in k}
    total = sum(main_steps.values())
    lines += [f"| {k} | {v:.2f} | {100 * v / total:.0f}% |" for k, v in main_steps.items()]
    lines += [f"| total | {total:.2f} | (= {1e6 / total:,.0f} candidates/s on one thread) |"]
    lines += [f"| {k} | {v:.2f} | |" for k, v in stages.items() if "(instead)" in k]
    lines += [
        "",
        f"## (2) Unloaded: concurrency 1, one channel, `--workers {w}`",
        "",
        "| request | response | requests/s | p50 ms | p90 ms | p99 ms | errors | in the server p50 / p99 ms "
        "| health check on the same channel p50 / p99 ms | load |",
        "|---|---|---:|---:|---:|---:|---|---|---|---|",
    ]
    for label, what, fmt in (("1 c1", "1 candidate", "columns"), ("100 c1", "100 candidates", "columns"),
                             ("100 c1 per-candidate", "100 candidates", "per candidate")):
        r = main[label]
        health = f"{_f(r.health_pct(50), 2)} / {_f(r.health_pct(99), 2)}" if r.health_ms.size else ""
        lines.append(f"| {what} | {fmt} | {r.req_s:,.1f} | {_f(r.pct(50), 2)} | {_f(r.pct(90), 2)} "
                     f"| {_f(r.pct(99), 2)} | {r.errors} | {_f(r.server_pct(50), 2)} / {_f(r.server_pct(99), 2)} "
                     f"| {health} | {r.load} |")
    lines += [
        "",
        "\"In the server\" is the answer's `server_time_us` (from reading the request to the answer being ready); "
        "the rest of the round trip is the transport and both ends' gRPC, which the health check's round trip "
        "bounds from below. The server's steps in process (1 thread, µs, median), back to back and each after "
        f"{IDLE_GAP_S * 1e3:g} ms of sleep (what an unloaded server's core has just done):",
        "",
        "| candidates | step | back to back | after idle | ratio |",
        "|---:|---|---:|---:|---:|",
    ]
    for n, row in ctx["idle"].items():
        for step in ("rank_batch", "decode_request", "score_requests", "respond"):
            hot, cold = row[f"{step} hot"], row[f"{step} after idle"]
            lines.append(f"| {n} | `{step}` | {hot:,.0f} | {cold:,.0f} | {cold / hot:.2f}x |")
    kr = ctx["kuairand"]
    lines += ["", "## (3) KuaiRand-Pure model, 1-candidate requests from test rows", ""]
    if "1 c8" in kr:
        lines += [
            f"`{kr['cmd']}`; {KUAIRAND_REQUESTS} distinct requests (the first test rows without a null feature).",
            "",
            "| concurrency | channels | connections per worker | requests/s | p50 ms | p99 ms | errors "
            "| mean batch (requests) | health p50 ms | load |",
            "|---:|---:|---|---:|---:|---:|---|---:|---|---|",
            *(f"| {r.concurrency} | {r.channels} | {'/'.join(map(str, r.connections)) or '?'} | {r.req_s:,.0f} "
              f"| {_f(r.pct(50), 2)} | {_f(r.pct(99), 2)} | {r.errors} | {_f(r.mean_batch_requests)} "
              f"| {_f(r.health_pct(50), 2)} | {r.load} |" for r in (kr["1 c1"], kr["1 c8"])),
        ]
    else:
        lines.append(f"Skipped: {kr['note']}.")
    closed_main = [(w, r) for r in main.values() if r.concurrency]
    lines += [
        "",
        f"## (4) Closed loop: `--workers {w}` and `--workers 1`",
        "",
        f"`--workers 1`: `{ctx['w1_cmd']}`.",
        "",
        "| workers | cands/request | concurrency | channels | connections per worker | candidates/s | requests/s "
        "| p50 ms | p99 ms | errors | mean batch (requests / candidates) | client CPU (cores) | load |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---|---:|---|",
        *_closed_rows(closed_main),
        *_closed_rows([(1, r) for r in ctx["w1"].values()]),
        "",
    ]
    ceil = {t: _best(ctx["ceiling"], "serving_cand_s", t)["serving_cand_s"] for t in sorted({1, w})}
    best_w = max((r for _, r in closed_main), key=lambda r: r.cand_s)
    best_1 = max(ctx["w1"].values(), key=lambda r: r.cand_s)
    lines += [
        f"Best end to end: `--workers {w}` {best_w.cand_s:,.0f} cand/s = {best_w.cand_s / ceil[w]:.0%} of the "
        f"in-process ceiling at {w} threads ({ceil[w]:,.0f}); `--workers 1` {best_1.cand_s:,.0f} = "
        f"{best_1.cand_s / ceil[1]:.0%} of the 1-thread ceiling ({ceil[1]:,.0f}).",
        "",
    ]
    o70 = main["open 70%"]
    lines += [
        f"## (5) Open loop at {cfg.load_fraction:.0%} of capacity",
        "",
        f"Capacity = best requests/s of the 100-candidate closed-loop points: {ctx['capacity']:,.1f} req/s. Offered "
        f"{o70.rate:,.1f} req/s (Poisson, {o70.channels} channels, connections {o70.connections}): served "
        f"{o70.req_s:,.1f} req/s, p50 {_f(o70.pct(50), 2)} ms, p90 {_f(o70.pct(90), 2)} ms, p99 "
        f"{_f(o70.pct(99), 2)} ms, p99.9 {_f(o70.pct(99.9), 2)} ms; errors {o70.errors}; mean batch "
        f"{_f(o70.mean_batch_requests)} requests; load {o70.load}.",
        "",
        f"## (6) Overload: open loop at {cfg.overload_factor:g}x capacity, `--max-queue {cfg.overload_max_queue}`",
        "",
        f"With the budget: `--max-queue-wait-ms {ctx['budget_ms']:g}` = {cfg.admission_factor:g} x the unloaded "
        f"100-candidate p99 ({_f(main['100 c1'].pct(99), 2)} ms): the budget bounds the expected time in the "
        f"batcher, transport and the event loop come on top.",
        "",
        "| server | offered req/s | sent req/s | admitted (OK) per s | admitted p50 / p99 ms | refused "
        "(RESOURCE_EXHAUSTED) | refused p50 / p99 ms | other codes | mean batch (requests) | load |",
        "|---|---:|---:|---:|---|---:|---|---|---:|---|",
    ]
    for name, r in (("with the budget", ctx["overload"]["with"]), ("without (`--max-queue` only)",
                                                                   ctx["overload"]["without"])):
        other = {k: v for k, v in r.codes.items() if k not in ("OK", "RESOURCE_EXHAUSTED")}
        lines.append(
            f"| {name} | {r.rate:,.1f} | {len(r.code) / r.duration_s:,.1f} | {r.ok.sum() / r.duration_s:,.1f} "
            f"| {_f(r.pct(50), 2)} / {_f(r.pct(99), 2)} | {int(r.refused.sum())} "
            f"| {_f(r.pct(50, r.refused), 2)} / {_f(r.pct(99, r.refused), 2)} | {other or '-'} "
            f"| {_f(r.mean_batch_requests)} | {r.load} |")
    lines += ["", f"## (7) Ray Serve peer (100 candidates, {cfg.n_channels} channels for both)", ""]
    if ctx["ray"]["result"] is not None:
        lines += [ln.replace("# Ray Serve peer vs ranker serve", "").strip() or "" for ln in
                  ctx["ray"]["report"].splitlines()[1:]]
    else:
        lines.append(f"Ray Serve: {ctx['ray']['note']}.")
    off = ctx["off"]
    on = main["50 c32"]
    ratio = on.cand_s / off.cand_s if off.cand_s else float("nan")
    lines += [
        "",
        f"## (8) Batching on vs off (50 candidates/request, concurrency 32, {cfg.n_channels} channels)",
        "",
        "| batching | candidates/s | requests/s | p50 ms | p99 ms | errors | mean batch (requests / candidates) "
        "| load |",
        "|---|---:|---:|---:|---:|---|---|---|",
        *(f"| {name} | {r.cand_s:,.0f} | {r.req_s:,.1f} | {_f(r.pct(50), 2)} | {_f(r.pct(99), 2)} | {r.errors} "
          f"| {_f(r.mean_batch_requests)} / {_f(r.mean_batch_candidates, 0)} | {r.load} |"
          for name, r in (("on", on), ("off (`--no-batching`)", off))),
        "",
        f"Ratio on / off: **{ratio:.2f}x**.",
        "",
    ]
    sk: Soak = ctx["soak"]
    sr = sk.result
    rss = [x for _, x in sk.rss]
    lines += [
        f"## (8) Soak: {cfg.soak_s:.0f} s open loop at {cfg.load_fraction:.0%} of capacity "
        f"({sr.rate:,.1f} req/s offered, 100 candidates, `--workers {w}`)",
        "",
        f"- served {sr.req_s:,.1f} req/s ({sr.cand_s:,.0f} candidates/s); p50 {_f(sr.pct(50), 2)} ms, "
        f"p99 {_f(sr.pct(99), 2)} ms; errors {sr.errors}; load at start {sr.load}, at end {ctx['soak_load_end']}",
        f"- p99 per {cfg.window_s:.0f} s window (ms): {', '.join(_f(x, 2) for x in sk.p99_windows(cfg.window_s))}",
        f"- server RSS, supervisor and workers together (MiB, every {cfg.rss_every_s:.0f} s): start {rss[0]:.1f}, "
        f"end {rss[-1]:.1f}, max {max(rss):.1f}; least-squares slope {sk.slope_mib_per_min():+.2f} MiB/min over "
        f"the whole soak, {sk.slope_mib_per_min(cfg.window_s):+.2f} MiB/min after the first {cfg.window_s:g} s",
        f"- RSS samples: {', '.join(f'{x:.0f}' for x in rss)}",
    ]
    return "\n".join(lines)


def raw_figures(ctx: dict[str, Any]) -> dict[str, Any]:
    """Everything the report shows, as JSON-able values."""
    cfg: BenchConfig = ctx["cfg"]
    sk: Soak = ctx["soak"]
    return {
        "command": ctx["command"], "date": ctx["date"], "machine": ctx["machine"],
        "config": {k: os.path.relpath(v, ROOT) if isinstance(v, Path) else v  # no machine paths in records
                   for k, v in dataclasses.asdict(cfg).items()},
        "elapsed_min": ctx["elapsed_min"], "soak_min": ctx["soak_min"], "load_start": ctx["load_start"],
        "load_end": ctx["load_end"], "params": ctx["params"],
        "targets": [t._asdict() for t in ctx["targets"]],
        "in_process": {"latency_ms": {str(t): v for t, v in ctx["latency"].items()},
                       "latency_ms_1_candidate": {str(t): v for t, v in ctx["latency_1"].items()},
                       "ceiling": ctx["ceiling"],
                       "stages_us_per_candidate": ctx["stages"],
                       "idle_gap_us": {str(n): v for n, v in ctx["idle"].items()}},
        "servers": {"main": ctx["main_cmd"], "workers_1": ctx["w1_cmd"], "batching_off": ctx["off_cmd"],
                    "overload": ctx["overload"]["cmds"], "kuairand": ctx["kuairand"].get("cmd")},
        "main": {k: r.summary() for k, r in ctx["main"].items()},
        "workers_1": {k: r.summary() for k, r in ctx["w1"].items()},
        "batching_off": ctx["off"].summary(),
        "capacity_req_s": ctx["capacity"], "budget_ms": ctx["budget_ms"],
        "overload": {k: ctx["overload"][k].summary() for k in ("with", "without")},
        "kuairand": {k: v.summary() if isinstance(v, LoadResult) else v for k, v in ctx["kuairand"].items()},
        "ray": ctx["ray"]["result"], "ray_note": ctx["ray"]["note"],
        "soak": {**sk.result.summary(), "rss_mib": sk.rss, "p99_windows_ms": sk.p99_windows(cfg.window_s),
                 "slope_mib_per_min": sk.slope_mib_per_min(),
                 "slope_after_first_window": sk.slope_mib_per_min(cfg.window_s)},
    }


# --------------------------------------------------------------------------------- main
def _serving_model(artifact: Path, cfg: BenchConfig) -> InferenceModel:
    """The artifact as the server loads it: compiled with ``cfg.compile`` at the current torch thread count
    (Inductor's kernels keep the count they were compiled with)."""
    model = InferenceModel(artifact, compile=cfg.compile)
    if cfg.compile and not model.compiled:
        raise RuntimeError("--compile: the serving network did not compile; see the warning above (or --no-compile)")
    return model


def in_process(ctx: dict[str, Any], artifact: Path, reqs: dict[str, list[pb.RankRequest]], cfg: BenchConfig) -> None:
    """Part (1): latency of one request, the ceiling, the stage split, each at 1 and N torch threads with
    the network compiled for that count (and its eager forward beside it); torch threads restored after."""
    default_threads = torch.get_num_threads()
    ctx["latency"], ctx["latency_1"], ctx["ceiling"] = {}, {}, []
    eager = InferenceModel(artifact) if cfg.compile else None
    try:
        for threads in sorted({1, cfg.workers}, reverse=True):  # 1 thread last: the stage split uses it
            torch.set_num_threads(threads)
            print(f"(1) in process, {threads} torch thread(s)", file=sys.stderr, flush=True)
            model = _serving_model(artifact, cfg)
            ctx["latency"][threads] = forward_latency(model, reqs["100"][0], cfg.forward_s, eager)
            ctx["latency_1"][threads] = forward_latency(model, reqs["1"][0], cfg.forward_s, eager)
            ctx["ceiling"] += [{"threads": threads, **r}
                               for r in forward_ceiling(model, reqs["100"][:40], reqs["50"][0], cfg.forward_s)]
        ctx["stages"] = stage_breakdown(model, reqs["100"][:10], reqs["100 per-candidate"][:10], cfg.forward_s)
        ctx["idle"] = idle_gap_cost(model, {1: reqs["1"][0], 100: reqs["100"][0]}, cfg.forward_s)
    finally:
        torch.set_num_threads(default_threads)
    ctx["latency"] = dict(sorted(ctx["latency"].items()))
    ctx["latency_1"] = dict(sorted(ctx["latency_1"].items()))
    ctx["ceiling"].sort(key=lambda r: (r["threads"], r["batch"]))


def kuairand_part(ctx: dict[str, Any], cfg: BenchConfig, work: Path, knobs: list[str]) -> None:
    """Part (3), or a note saying why not."""
    if not (cfg.kuairand_data / "log_standard_20220425_to_20220508.parquet").is_file() and \
            not any(cfg.kuairand_data.glob("log_standard_*")):
        ctx["kuairand"] = {"note": f"skipped: no KuaiRand data in {cfg.kuairand_data}"}
        return
    print("(3) KuaiRand artifact", file=sys.stderr, flush=True)
    kwork = work / "kuairand"
    artifact, requests, params = build_kuairand(cfg.kuairand_data, kwork, KUAIRAND_REQUESTS)
    payloads = write_payloads(requests, kwork / "requests_1.pkl")
    out: dict[str, Any] = {"params": params, "requests": len(requests), "note": ""}
    with server(artifact, work, "kuairand", knobs, cfg.server_threads, cfg.workers) as sp:
        out["cmd"] = sp.command
        out["1 c1"] = closed(sp, payloads, 1, 1, cfg, "kuairand 1 c1", health=True)
        out["1 c8"] = closed(sp, payloads, 1, 8, cfg, "kuairand 1 c8")
    ctx["kuairand"] = out


def run(cfg: BenchConfig, work: Path, command: str) -> dict[str, Any]:
    t_start = time.monotonic()
    ctx: dict[str, Any] = {"cfg": cfg, "command": command, "load_start": load_avg(), "machine": machine(),
                           "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M")}
    print(f"building data and artifact in {work} (load {load_avg()})", file=sys.stderr, flush=True)
    log, artifact, _ = build_artifact(work)
    os.environ["RANKER_COMPILE_CACHE"] = str(work / "compiled")  # this process and every server it starts
    model = InferenceModel(artifact)
    ctx["params"] = sum(p.numel() for p in model.model.parameters())
    reqs = {str(n): make_requests(log, model.fitted, n, DISTINCT_REQUESTS, COLUMNS) for n in (1, 50, *REQUEST_SIZES)}
    reqs["100 per-candidate"] = make_requests(log, model.fitted, 100, DISTINCT_REQUESTS, CANDIDATES)
    payloads = {k: write_payloads(r, work / f"requests_{k.replace(' ', '_')}.pkl") for k, r in reqs.items()}
    del model
    in_process(ctx, artifact, reqs, cfg)

    w, threads = cfg.workers, cfg.server_threads
    knobs = ["--max-batch-candidates", str(cfg.max_batch_candidates),
             "--max-queue-delay-us", str(cfg.max_queue_delay_us), *(["--compile"] if cfg.compile else [])]
    main: dict[str, LoadResult] = {}
    with server(artifact, work, "main", knobs, threads, w) as sp:
        ctx["main_cmd"] = sp.command
        print(f"(2) unloaded, (4) closed loop against {sp.target}", file=sys.stderr, flush=True)
        main["1 c1"] = closed(sp, payloads["1"], 1, 1, cfg, "1 c1", health=True)
        main["100 c1"] = closed(sp, payloads["100"], 100, 1, cfg, "100 c1", health=True)
        main["100 c1 per-candidate"] = closed(sp, payloads["100 per-candidate"], 100, 1, cfg, "100 c1 per-candidate",
                                              health=True)
        for n in REQUEST_SIZES:
            for c in CONCURRENCIES:
                if (n, c) != (100, 1):
                    main[f"{n} c{c}"] = closed(sp, payloads[str(n)], n, c, cfg, f"{n} c{c}")
        ctx["capacity"] = max(r.req_s for r in main.values() if r.candidates == 100 and r.concurrency)
        rate = cfg.load_fraction * ctx["capacity"]
        print(f"(5) open loop at {rate:.1f} req/s", file=sys.stderr, flush=True)
        main["open 70%"] = run_load(sp, payloads["100"], 100, cfg, "open 70%", rate=rate, channels=cfg.n_channels)
        print("(8) batching on", file=sys.stderr, flush=True)
        main["50 c32"] = closed(sp, payloads["50"], 50, 32, cfg, "50 c32")
        print("(7) Ray Serve peer", file=sys.stderr, flush=True)
        result, text, note = ray_comparison(sp, artifact, reqs["100"], cfg)
        ctx["ray"] = {"result": result, "report": text, "note": note}
    ctx["main"] = main

    with server(artifact, work, "workers_1", knobs, threads, 1) as sp:
        ctx["w1_cmd"] = sp.command
        ctx["w1"] = {f"{n} c32": closed(sp, payloads[str(n)], n, 32, cfg, f"workers 1 {n} c32") for n in REQUEST_SIZES}
    with server(artifact, work, "batching_off", [*knobs, "--no-batching"], threads, w) as sp:
        ctx["off_cmd"] = sp.command
        print("(8) batching off", file=sys.stderr, flush=True)
        ctx["off"] = closed(sp, payloads["50"], 50, 32, cfg, "50 c32 off")

    unloaded_p99 = main["100 c1"].pct(99)
    ctx["budget_ms"] = round(max(cfg.admission_factor * unloaded_p99, 0.1), 1)
    overload_rate = cfg.overload_factor * ctx["capacity"]
    ctx["overload"] = {"cmds": {}}
    for name, extra in (("without", []), ("with", ["--max-queue-wait-ms", str(ctx["budget_ms"])])):
        args = [*knobs, "--max-queue", str(cfg.overload_max_queue), *extra]
        with server(artifact, work, f"overload_{name}", args, threads, w) as sp:
            ctx["overload"]["cmds"][name] = sp.command
            print(f"(6) overload at {overload_rate:.1f} req/s, {name} the budget", file=sys.stderr, flush=True)
            ctx["overload"][name] = run_load(sp, payloads["100"], 100, cfg, f"overload {name}", rate=overload_rate,
                                             duration_s=2 * cfg.phase_s, channels=cfg.n_channels)

    kuairand_part(ctx, cfg, work, knobs)

    t_soak = time.monotonic()
    with server(artifact, work, "soak", knobs, threads, w) as sp:
        print(f"(8) soak {cfg.soak_s:.0f} s at {cfg.load_fraction * ctx['capacity']:.1f} req/s", file=sys.stderr,
              flush=True)
        ctx["soak"] = soak(sp, payloads["100"], cfg.load_fraction * ctx["capacity"], cfg)
        ctx["soak_load_end"] = load_avg()
    ctx["soak_min"] = (time.monotonic() - t_soak) / 60
    ctx["elapsed_min"] = (time.monotonic() - t_start) / 60
    ctx["load_end"] = load_avg()
    ctx["targets"] = targets(ctx)
    return ctx


def main() -> None:
    ap = argparse.ArgumentParser(description="Serving benchmark: every target of the serving issue in one run.")
    ap.add_argument("--quick", action="store_true", help="seconds per point: a smoke run of every part")
    ap.add_argument("--soak-s", type=float, default=None, help="soak length in seconds (default 300; quick: 10)")
    ap.add_argument("--phase-s", type=float, default=None, help="measured seconds per load point (default 15)")
    ap.add_argument("--workers", type=int, default=BenchConfig.workers,
                    help="--workers of the servers (and the in-process ceiling's second thread count)")
    ap.add_argument("--channels", type=int, default=BenchConfig.channels,
                    help="client channels for points above concurrency 1 (default 0: 4 per worker)")
    ap.add_argument("--server-threads", type=int, default=BenchConfig.server_threads, help="--torch-threads")
    ap.add_argument("--max-batch-candidates", type=int, default=BenchConfig.max_batch_candidates)
    ap.add_argument("--max-queue-delay-us", type=int, default=BenchConfig.max_queue_delay_us)
    ap.add_argument("--admission-factor", type=float, default=BenchConfig.admission_factor,
                    help="overload: --max-queue-wait-ms = this x the unloaded 100-candidate p99")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray Serve peer")
    ap.add_argument("--no-compile", action="store_true",
                    help="serve and measure the eager network (default: --compile, AOTInductor)")
    ap.add_argument("--ray-s", type=float, default=None, help="measured seconds per Ray comparison point (default 10)")
    ap.add_argument("--kuairand-data", type=Path, default=KUAIRAND_DATA, help="KuaiRand-Pure files (skipped if absent)")
    ap.add_argument("--work", type=Path, default=None, help="keep data, logs and raw results here")
    ap.add_argument("--out", type=Path, default=None,
                    help="also write the markdown summary here, and the raw figures next to it (.json)")
    args = ap.parse_args()
    overrides: dict[str, Any] = {
        "workers": args.workers, "channels": args.channels, "server_threads": args.server_threads,
        "max_batch_candidates": args.max_batch_candidates, "max_queue_delay_us": args.max_queue_delay_us,
        "admission_factor": args.admission_factor, "ray": not args.no_ray, "compile": not args.no_compile,
        "kuairand_data": args.kuairand_data,
    }
    if args.soak_s is not None:
        overrides["soak_s"] = args.soak_s
        overrides["window_s"] = min(60.0, args.soak_s / 5) if args.quick else 60.0
    for name in ("phase_s", "ray_s"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    cfg = BenchConfig.quick(**overrides) if args.quick else BenchConfig(**overrides)
    command = shlex.join([".venv/bin/python", "benchmarks/bench_serving.py", *sys.argv[1:]])
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_serving_")))
        work.mkdir(parents=True, exist_ok=True)
        ctx = run(cfg, work, command)
        text = report(ctx)
        figures = json.dumps(raw_figures(ctx), indent=1, default=float) + "\n"
        raw_path = args.out.with_suffix(".json") if args.out is not None else work / "bench_serving.json"
        raw_path.write_text(figures)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(f"raw figures: {raw_path}" + ("" if args.out or args.work else " (deleted with the work folder; "
                                         "pass --out or --work to keep them)"), file=sys.stderr)


if __name__ == "__main__":
    main()
