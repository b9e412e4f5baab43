"""A capacity plan from measurements: the scorer's CPU per request, then cores and replicas for a load.

Measured here (``--measure``): one ``ranker serve --workers 1 --torch-threads 1`` process (one core's
worth of serving) under a closed-loop load at several candidate counts; the server process's own
CPU seconds (``/proc/<pid>/stat``, so the load client sharing the machine does not count) divided by
the calls it answered give the CPU per request at each size, and a least-squares line through them
splits it into a fixed cost per request and a cost per candidate::

    cpu_ms(C) = fixed_ms + per_candidate_us * C / 1000

The plan (``plan``): ``N`` requests/s of ``C`` candidates need ``N * cpu_ms(C) / 1000`` busy cores;
at a target utilisation ``rho`` (the HPA's 60 %: headroom for bursts and a restarting replica) that
is ``cores = N * cpu_ms(C) / 1000 / rho``, in replicas of ``--cores-per-replica`` cores (one worker
per core, ``deploy/k8s``). The p99 budget is checked against the measured p99 at that size at low load
(a request's own service time, which no number of replicas shortens): a budget below it needs a
smaller model or fewer candidates, not more replicas. Feature builds and training epochs scale the
measured rows/s per worker by the worker count (linear: partitions are independent and DDP steps
add one all-reduce; the efficiency factor ``--efficiency`` discounts it).

Checked against what this machine can run: ``--measure`` ends with two such replicas behind one
round-robin channel at 100 candidates (``benchmarks/replica_restart.py``'s setup), and the plan sets
the requests/s its fit predicts for the CPU they spent beside the requests/s they answered.

    .venv/bin/python benchmarks/capacity.py --measure --out benchmarks/results/capacity.json   # ~2 min
    .venv/bin/python benchmarks/capacity.py --plan benchmarks/results/capacity.json \\
        --rps 100000 --candidates 500 --p99-ms 100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

SIZES = (1, 100, 500)
CHECK_CANDIDATES = 100  # benchmarks/replica_restart.py's default


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Point:
    candidates: int
    callers: int
    calls: int
    seconds: float
    server_cpu_s: float
    cpu_ms_per_request: float
    req_s: float
    p50_ms: float
    p99_ms: float


def _window(load: Any, pids: list[int], secs: float) -> tuple[list[Any], float, float]:
    """The calls answered during ``secs`` seconds of ``load`` (after a 0.5 s warm-up), the CPU seconds the
    server processes ``pids`` spent meanwhile, and the window's length."""
    time.sleep(0.5)  # warm-up, not counted
    n0, cpu0, t0 = len(load.calls), sum(map(cpu_seconds, pids)), time.monotonic()
    time.sleep(secs)
    n1, cpu1, t1 = len(load.calls), sum(map(cpu_seconds, pids)), time.monotonic()
    return load.calls[n0:n1], cpu1 - cpu0, t1 - t0


def _pid(replica: Any) -> int:
    assert replica.proc is not None, f"{replica.name} is not running"
    return int(replica.proc.pid)


def _point(candidates: int, callers: int, window: list[Any], cpu: float, secs: float) -> Point:
    lat = np.array([x[1] for x in window if x[2] == 0]) * 1000
    calls = len(window)
    return Point(candidates, callers, calls, secs, cpu, cpu * 1000 / max(calls, 1), calls / secs,
                 float(np.percentile(lat, 50)), float(np.percentile(lat, 99)))


def measure(seconds: float, concurrency: int, work: Path) -> dict[str, Any]:
    """Serve the serving benchmark's default model with one worker and load it at each size in :data:`SIZES`;
    then the same at :data:`CHECK_CANDIDATES` over two such replicas behind one round-robin channel (the
    replica restart benchmark's setup), whose CPU per request the plan assumes equal to one replica's."""
    import bench_serving as bs  # this folder is on sys.path when the script runs
    import replica_restart as rr

    from features.fitted import FittedTransform

    log, artifact, _ = bs.build_artifact(work)
    fitted = FittedTransform.load(artifact / "transform.json")
    replicas = [rr.Replica(str(artifact), work, f"capacity{i}", args=["--torch-threads", "1"]) for i in range(2)]
    replicas[0].start()
    points, two = [], None
    try:
        for c in SIZES:
            reqs = [r.SerializeToString() for r in bs.make_requests(log, fitted, c, 32)]
            for conc, secs in ((1, max(2.0, seconds / 3)), (concurrency, seconds)):  # low load: p99; high: CPU
                with rr.Load([f"127.0.0.1:{replicas[0].port}"], reqs, conc) as load:
                    points.append(_point(c, conc, *_window(load, [_pid(replicas[0])], secs)))
                print(f"{c} candidates, {conc} callers: {points[-1]}", file=sys.stderr, flush=True)
        replicas[1].start()
        reqs = [r.SerializeToString() for r in bs.make_requests(log, fitted, CHECK_CANDIDATES, 32)]
        with rr.Load([f"127.0.0.1:{r.port}" for r in replicas], reqs, concurrency) as load:
            two = _point(CHECK_CANDIDATES, concurrency, *_window(load, [_pid(r) for r in replicas], seconds))
        print(f"two replicas: {two}", file=sys.stderr, flush=True)
    finally:
        for r in replicas:
            if r.proc is not None:
                r.stop()
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(),
            "concurrency": concurrency, "points": [asdict(p) for p in points], "two_replicas": asdict(two)}


def check_two_replicas(measured: dict[str, Any]) -> str:
    """The plan beside the two-replica run: its CPU per request from the one-replica fit, and the
    requests/s that the CPU the two replicas really spent buys at that cost, against what they answered."""
    two = measured.get("two_replicas")
    if not two:
        return ""
    cpu = cpu_ms(measured["points"], two["candidates"])
    busy = two["server_cpu_s"] / two["seconds"]
    predicted = busy * 1000 / cpu
    return (f"Check, two replicas x 1 core behind one round-robin channel at {two['candidates']} candidates, "
            f"{two['callers']} callers: the plan's {cpu:.2f} ms of CPU per request against "
            f"{two['cpu_ms_per_request']:.2f} ms measured; at the {busy:.2f} busy cores they used, the plan "
            f"predicts {predicted:,.0f} req/s, they answered {two['req_s']:,.0f} req/s "
            f"({two['req_s'] / predicted:.0%} of the prediction).")


def fit(points: list[dict[str, Any]]) -> tuple[float, float]:
    """(fixed ms per request, µs per candidate): least squares through the loaded runs' CPU per request."""
    loaded = [p for p in points if p["callers"] > 1 and p["calls"]]
    c = np.array([p["candidates"] for p in loaded], dtype=float)
    y = np.array([p["cpu_ms_per_request"] for p in loaded])
    slope, intercept = np.polyfit(c, y, 1)
    return float(intercept), float(slope * 1000)


def cpu_ms(points: list[dict[str, Any]], candidates: int) -> float:
    fixed, per_cand = fit(points)
    return fixed + per_cand * candidates / 1000


def service_p99(points: list[dict[str, Any]], candidates: int) -> float:
    """A request's own p99 (ms): one caller's p99 at the nearest measured size, scaled by the CPU ratio."""
    alone = [p for p in points if p["callers"] == 1 and p["calls"]]
    near = min(alone, key=lambda p: abs(p["candidates"] - candidates))
    return float(near["p99_ms"]) * max(1.0, cpu_ms(points, candidates) / cpu_ms(points, near["candidates"]))


@dataclass(frozen=True)
class Plan:
    rps: float
    candidates: int
    cpu_ms_per_request: float
    busy_cores: float
    cores: float
    replicas: int
    p99_budget_ms: float
    service_p99_ms: float
    fits_budget: bool


def plan(measured: dict[str, Any], rps: float, candidates: int, p99_ms: float, rho: float = 0.6,
         cores_per_replica: int = 2) -> Plan:
    cpu = cpu_ms(measured["points"], candidates)
    busy = rps * cpu / 1000
    cores = busy / rho
    service = service_p99(measured["points"], candidates)
    return Plan(rps, candidates, cpu, busy, cores, max(2, math.ceil(cores / cores_per_replica)), p99_ms, service,
                service <= p99_ms)


def hours(rows: float, rows_per_s_per_worker: float, workers: int, efficiency: float) -> float:
    return rows / (rows_per_s_per_worker * workers * efficiency) / 3600


def report(measured: dict[str, Any], plans: list[Plan], jobs: list[tuple[str, float, float, int, float]],
           check: str) -> str:
    fixed, per_cand = fit(measured["points"])
    lines = [f"## Capacity plan ({measured['date']}, {measured['cores']} cores, from `benchmarks/capacity.py`)", "",
             "Measured (one `ranker serve --workers 1 --torch-threads 1`, the server process's own CPU):", "",
             "| candidates | callers | calls | req/s | server CPU ms / request | p50 ms | p99 ms |",
             "|---|---|---|---|---|---|---|"]
    for p in measured["points"]:
        lines.append(f"| {p['candidates']} | {p['callers']} | {p['calls']} | {p['req_s']:.0f} | "
                     f"{p['cpu_ms_per_request']:.3f} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} |")
    lines += ["", f"Fit: **{fixed:.3f} ms fixed per request + {per_cand:.2f} µs per candidate** of one core.", "",
              "| load | CPU ms / request | busy cores | cores at 60 % | replicas (2 cores) | p99 budget | "
              "service p99 | fits |", "|---|---|---|---|---|---|---|---|"]
    for pl_ in plans:
        lines.append(f"| {pl_.rps:,.0f} req/s x {pl_.candidates} | {pl_.cpu_ms_per_request:.2f} | "
                     f"{pl_.busy_cores:,.0f} | {pl_.cores:,.0f} | {pl_.replicas:,} | {pl_.p99_budget_ms:.0f} ms | "
                     f"{pl_.service_p99_ms:.1f} ms | {'yes' if pl_.fits_budget else 'no'} |")
    if jobs:
        lines += ["", "| batch job | rows | rows/s per worker | workers | hours (efficiency) |",
                  "|---|---|---|---|---|"]
        for name, rows, rate, workers, eff in jobs:
            lines.append(f"| {name} | {rows:,.0f} | {rate:,.0f} | {workers} | {hours(rows, rate, workers, eff):.2f} "
                         f"({eff:.0%}) |")
    if check:
        lines += ["", check]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measure", action="store_true", help="measure the serving cost here first")
    ap.add_argument("--plan", type=Path, help="a --measure output to plan from")
    ap.add_argument("--seconds", type=float, default=6.0, help="seconds of load per size")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rps", type=float, action="append", help="requests/s to plan for (repeatable)")
    ap.add_argument("--candidates", type=int, action="append", help="candidates per request (with --rps)")
    ap.add_argument("--p99-ms", type=float, default=100.0)
    ap.add_argument("--rho", type=float, default=0.6, help="target CPU utilisation")
    ap.add_argument("--cores-per-replica", type=int, default=2)
    ap.add_argument("--job", action="append", default=[],
                    help="batch job name:rows:rows_per_s_per_worker:workers:efficiency (repeatable)")
    ap.add_argument("--out", type=Path, help="write the measurement (JSON) or the report (Markdown) here")
    args = ap.parse_args()
    if args.measure:
        with tempfile.TemporaryDirectory(prefix="capacity_") as tmp:
            measured = measure(args.seconds, args.concurrency, Path(tmp))
        text = json.dumps(measured, indent=1)
        print(text)
        if args.out:
            args.out.write_text(text)
        return
    if args.plan is None:
        ap.error("give --measure or --plan FILE")
    measured = json.loads(args.plan.read_text())
    loads = list(zip(args.rps or [100_000.0], args.candidates or [500], strict=True))
    plans = [plan(measured, r, c, args.p99_ms, args.rho, args.cores_per_replica) for r, c in loads]
    jobs = []
    for j in args.job:
        name, rows, rate, workers, eff = j.split(":")
        jobs.append((name, float(rows), float(rate), int(workers), float(eff)))
    text = report(measured, plans, jobs, check_two_replicas(measured))
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
