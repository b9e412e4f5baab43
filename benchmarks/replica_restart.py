"""Two ``ranker serve`` replicas behind one round-robin client, restarted one at a time under load.

What a Kubernetes rolling restart does to the scorer (``deploy/k8s/deployment.yaml``), on one
machine: two replicas on their own ports (the pods), one client channel balancing over both
addresses with the settings the README gives clients (``serving.client.balanced_channel_options``:
round robin, client-side health checks, a retry on UNAVAILABLE), and a closed-loop load of
``--concurrency`` callers. Then each replica in turn gets SIGTERM (it goes NOT_SERVING, lets the
calls in flight finish within its grace period and exits), is started again on the same port and,
once SERVING, is left ``--settle-s`` seconds before the next one goes (the Deployment's
``minReadySeconds``). Every call is recorded: the phase it started in (``before``, ``restart``,
``after``), its latency and its status code.

The figures: calls sent and failed (the target is 0), p50 / p99 latency before the restart and
during it, and the calls each replica answered before and after (read from its ``/metrics``), which
shows that the client really used both and came back to each restarted one.

    .venv/bin/python benchmarks/replica_restart.py                  # the figures (~1 min)
    .venv/bin/python benchmarks/replica_restart.py --quick          # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from protos.ranking.v1 import ranker_pb2 as pb
from protos.ranking.v1 import ranker_pb2_grpc as pb_grpc
from serving.client import balanced_channel_options

RANKER = str(Path(sys.executable).parent / "ranker")
PHASES = ("before", "restart", "after")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Replica:
    """One ``ranker serve`` process on a fixed port (so that a restart comes back at the same address)."""

    model: str
    work: Path
    name: str
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    args: Sequence[str] = ()
    workers: int = 1
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def command(self) -> list[str]:
        return [RANKER, "serve", "--model", self.model, "--port", str(self.port), "--metrics-port",
                str(self.metrics_port), "--workers", str(self.workers), "--reload-interval-s", "0",
                "--log-format", "json", "--ready-file", str(self.work / f"{self.name}.ready"), *self.args]

    def start(self, timeout_s: float = 180.0) -> float:
        """Start and wait until SERVING (the ready file); the seconds that took."""
        ready = self.work / f"{self.name}.ready"
        ready.unlink(missing_ok=True)
        self.starts += 1
        log = (self.work / f"{self.name}.{self.starts}.log").open("wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        while not (ready.is_file() and ready.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"replica {self.name} did not start (exit {self.proc.poll()}): "
                                   f"{(self.work / f'{self.name}.{self.starts}.log').read_text()[-2000:]}")
            time.sleep(0.05)
        return time.monotonic() - t0

    def stop(self, timeout_s: float = 60.0) -> tuple[int, float]:
        """SIGTERM and wait: (exit code, seconds until it exited)."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        return code, time.monotonic() - t0

    def answered(self) -> int:
        """Rank calls this process finished with OK since it started (its ``/metrics``)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return int(sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                       if s.name == "ranker_requests_total" and s.labels.get("code") == "OK"))


class Load:
    """``concurrency`` threads calling Rank in a closed loop on one balanced channel to every replica."""

    def __init__(self, targets: Sequence[str], requests: Sequence[bytes], concurrency: int,
                 timeout_s: float = 5.0) -> None:
        self.channel = grpc.insecure_channel("ipv4:" + ",".join(targets), balanced_channel_options())
        self.rank = self.channel.unary_unary("/ranking.v1.Ranker/Rank", request_serializer=None,
                                             response_deserializer=pb.RankResponse.FromString)
        self.requests, self.concurrency, self.timeout_s = list(requests), concurrency, timeout_s
        self.phase = PHASES[0]
        self.calls: list[tuple[str, float, int, str]] = []  # (phase, latency s, status code, details)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._caller, args=(i,), daemon=True) for i in range(concurrency)]
        _ = pb_grpc  # the stubs define the method path used above

    def _caller(self, i: int) -> None:
        k = i
        while not self._stop.is_set():
            phase, t0 = self.phase, time.perf_counter()
            try:
                self.rank(self.requests[k % len(self.requests)], timeout=self.timeout_s)
                code, details = 0, ""
            except grpc.RpcError as e:
                code, details = e.code().value[0], f"{e.code().name}: {e.details()}"
            self.calls.append((phase, time.perf_counter() - t0, code, details))  # list.append: thread-safe
            k += self.concurrency

    def __enter__(self) -> Load:
        grpc.channel_ready_future(self.channel).result(timeout=30)
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout_s + 5)
        self.channel.close()


@dataclass(frozen=True)
class RestartReport:
    sent: int
    failed: int
    failures: dict[str, int]  # "phase: CODE: details" -> calls
    by_phase: dict[str, dict[str, float]]  # phase -> calls, failed, p50_ms, p99_ms
    answered_before: dict[str, int]  # replica -> OK calls it answered before its restart
    answered_after: dict[str, int]  # replica -> OK calls it answered after every restart
    exit_codes: list[int]  # of the replicas stopped with SIGTERM
    stop_s: list[float]  # SIGTERM to exit
    start_s: list[float]  # start to SERVING, each restart
    seconds: float


def rolling_restart(model: str, requests: Sequence[bytes], work: Path, *, concurrency: int = 4,
                    before_s: float = 3.0, settle_s: float = 2.0, after_s: float = 3.0,
                    args: Sequence[str] = ()) -> RestartReport:
    """Start two replicas, load them, restart each in turn, and count what the callers saw."""
    replicas = [Replica(model, work, f"replica{i}", args=args) for i in range(2)]
    t0 = time.monotonic()
    try:
        for r in replicas:
            r.start()
        with Load([f"127.0.0.1:{r.port}" for r in replicas], requests, concurrency) as load:
            time.sleep(before_s)
            before = {r.name: r.answered() for r in replicas}
            load.phase = "restart"
            codes, stops, starts = [], [], []
            for r in replicas:
                code, took = r.stop()
                codes.append(code)
                stops.append(took)
                starts.append(r.start())
                time.sleep(settle_s)  # minReadySeconds: the client reconnects before the next one goes
            load.phase = "after"
            time.sleep(after_s)
            after = {r.name: r.answered() for r in replicas}
        calls = load.calls
    finally:
        for r in replicas:
            if r.proc is not None and r.proc.poll() is None:
                r.stop()
    failures: dict[str, int] = {}
    for phase, _, code, details in calls:
        if code:
            failures[f"{phase}: {details}"] = failures.get(f"{phase}: {details}", 0) + 1
    by_phase = {}
    for phase in PHASES:
        lat = np.array([c[1] for c in calls if c[0] == phase and not c[2]]) * 1000
        by_phase[phase] = {"calls": float(sum(c[0] == phase for c in calls)),
                           "failed": float(sum(c[0] == phase and c[2] != 0 for c in calls)),
                           "p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
                           "p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan")}
    return RestartReport(sent=len(calls), failed=sum(failures.values()), failures=failures, by_phase=by_phase,
                         answered_before=before, answered_after=after, exit_codes=codes, stop_s=stops,
                         start_s=starts, seconds=time.monotonic() - t0)


def report(r: RestartReport, command: str, candidates: int, concurrency: int) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d")
    lines = [f"# Replica restart under load ({when})", "",
             f"`{command}`; {os.cpu_count()} cores; 2 replicas x 1 worker, {concurrency} closed-loop callers, "
             f"{candidates} candidates per request, one round-robin channel (serving.client.balanced_channel_options).",
             "", "| phase | calls | failed | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for phase, row in r.by_phase.items():
        lines.append(f"| {phase} | {row['calls']:.0f} | {row['failed']:.0f} | {row['p50_ms']:.1f} | "
                     f"{row['p99_ms']:.1f} |")
    lines += ["", f"sent {r.sent}, failed {r.failed}" + (f" ({r.failures})" if r.failures else ""),
              f"answered per replica before the restart {r.answered_before}, after it {r.answered_after}",
              f"SIGTERM to exit {', '.join(f'{s:.1f}' for s in r.stop_s)} s (exit codes {r.exit_codes}); "
              f"start to SERVING {', '.join(f'{s:.1f}' for s in r.start_s)} s; whole run {r.seconds:.0f} s"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--before-s", type=float, default=10.0)
    ap.add_argument("--settle-s", type=float, default=5.0)
    ap.add_argument("--after-s", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true", help="2 s phases")
    ap.add_argument("--out", type=Path, help="write the report (Markdown) and a .json beside it")
    args = ap.parse_args()
    if args.quick:
        args.before_s = args.settle_s = args.after_s = 2.0
    import bench_serving as bs  # the serving benchmark's synthetic artifact and logged requests

    from features.fitted import FittedTransform

    with tempfile.TemporaryDirectory(prefix="replica_restart_") as tmp:
        work = Path(tmp)
        log, artifact, _ = bs.build_artifact(work)
        fitted = FittedTransform.load(artifact / "transform.json")
        requests = [r.SerializeToString() for r in bs.make_requests(log, fitted, args.candidates, 64)]
        r = rolling_restart(str(artifact), requests, work, concurrency=args.concurrency, before_s=args.before_s,
                            settle_s=args.settle_s, after_s=args.after_s)
    command = shlex.join([".venv/bin/python", "benchmarks/replica_restart.py", *sys.argv[1:]])
    text = report(r, command, args.candidates, args.concurrency)
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(asdict(r), indent=1))
    with contextlib.suppress(Exception):
        sys.stdout.flush()


if __name__ == "__main__":
    main()
