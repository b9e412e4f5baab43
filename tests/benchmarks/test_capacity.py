"""The capacity plan's arithmetic (``benchmarks/capacity.py``): a fit through measured CPU per request,
cores and replicas for a load, the p99 check, job hours, and the two-replica check line.

The measurement itself (``--measure``) needs a quiet machine and minutes; its output is in
``benchmarks/results/capacity.json`` and RESULTS.md. Here the plan is fed a measurement whose
answer is known.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

FIXED_MS, PER_CANDIDATE_US = 1.2, 14.0
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "capacity.py"


@pytest.fixture(scope="module")
def capacity(load_benchmark) -> ModuleType:
    return load_benchmark("capacity")


def point(candidates: int, callers: int, p99_ms: float = 5.0) -> dict[str, float]:
    cpu_ms = FIXED_MS + PER_CANDIDATE_US * candidates / 1000
    calls = 1000
    return {"candidates": candidates, "callers": callers, "calls": calls, "seconds": 4.0,
            "server_cpu_s": cpu_ms * calls / 1000, "cpu_ms_per_request": cpu_ms, "req_s": calls / 4.0,
            "p50_ms": p99_ms / 2, "p99_ms": p99_ms}


@pytest.fixture()
def measured() -> dict:
    points = [point(c, n, p99_ms=2.0 + c / 100) for c in (1, 100, 500) for n in (1, 4)]
    points[0]["cpu_ms_per_request"] = 99.0  # a one-caller run's CPU is not in the fit (it idles between calls)
    two = point(100, 4)
    two.update(server_cpu_s=1.6 * 4.0, seconds=4.0, req_s=500.0)  # 1.6 busy cores over the 4 s window
    return {"date": "2026-12-07 00:00", "cores": 2, "concurrency": 4, "points": points, "two_replicas": two}


def test_the_fit_recovers_the_fixed_and_per_candidate_cost(capacity, measured) -> None:
    fixed, per_candidate = capacity.fit(measured["points"])
    assert fixed == pytest.approx(FIXED_MS) and per_candidate == pytest.approx(PER_CANDIDATE_US)


def test_a_plan_is_busy_cores_over_the_target_utilisation(capacity, measured) -> None:
    p = capacity.plan(measured, rps=100_000, candidates=500, p99_ms=100, rho=0.6, cores_per_replica=2)
    cpu = FIXED_MS + PER_CANDIDATE_US * 500 / 1000  # 8.2 ms
    assert p.cpu_ms_per_request == pytest.approx(cpu)
    assert p.busy_cores == pytest.approx(100_000 * cpu / 1000)  # 820
    assert p.cores == pytest.approx(820 / 0.6)
    assert p.replicas == 684  # ceil(1366.7 / 2)
    assert p.service_p99_ms == pytest.approx(7.0) and p.fits_budget
    small = capacity.plan(measured, rps=1, candidates=1, p99_ms=100)
    assert small.replicas == 2  # never fewer than two: a restart or a lost node leaves one serving


def test_a_budget_below_a_requests_own_p99_does_not_fit(capacity, measured) -> None:
    # 1000 candidates: beyond the measured sizes, the nearest p99 (7 ms at 500) grows with the CPU ratio
    p = capacity.plan(measured, rps=10, candidates=1000, p99_ms=10)
    ratio = (FIXED_MS + 14.0) / (FIXED_MS + 7.0)
    assert p.service_p99_ms == pytest.approx(7.0 * ratio) and not p.fits_budget


def test_job_hours_scale_with_workers_and_efficiency(capacity) -> None:
    assert capacity.hours(3.6e9, 1e5, 10, 1.0) == pytest.approx(1.0)
    assert capacity.hours(3.6e9, 1e5, 10, 0.5) == pytest.approx(2.0)


def test_the_two_replica_check_compares_prediction_and_answer(capacity, measured) -> None:
    line = capacity.check_two_replicas(measured)
    predicted = 1.6 * 1000 / (FIXED_MS + PER_CANDIDATE_US * 100 / 1000)  # 615 req/s
    assert f"predicts {predicted:,.0f} req/s, they answered 500 req/s ({500 / predicted:.0%}" in line
    assert capacity.check_two_replicas({**measured, "two_replicas": None}) == ""


def test_the_plan_command_writes_the_report(measured, tmp_path: Path) -> None:
    src = tmp_path / "capacity.json"
    src.write_text(json.dumps(measured))
    out = tmp_path / "plan.md"
    r = subprocess.run([sys.executable, str(SCRIPT), "--plan", str(src), "--rps", "100000", "--candidates", "500",
                        "--job", "features:1e9:600000:16:0.8", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "1.200 ms fixed per request + 14.00 µs per candidate" in text
    assert "| 100,000 req/s x 500 | 8.20 | 820 | 1,367 | 684 | 100 ms | 7.0 ms | yes |" in text
    assert f"| features | 1,000,000,000 | 600,000 | 16 | {1e9 / (600_000 * 16 * 0.8) / 3600:.2f} (80%) |" in text
    assert "Check, two replicas" in text
