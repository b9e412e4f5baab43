"""DynamicBatcher: coalescing, size limits, FIFO, admission, deadlines, cancellation, errors, close.

Async tests run with ``asyncio.run`` inside plain test functions. A batch function that blocks on
a ``threading.Event`` holds the single worker busy so that the queue can be shaped exactly.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Coroutine
from typing import Any

import numpy as np
import polars as pl
import pytest

from ranking.inference import InferenceModel
from serving.batcher import (
    COST_CLIP,
    OVERLAP_MIN,
    ArrivalGap,
    BatcherClosed,
    BatcherConfig,
    BatchObserver,
    CostFit,
    DeadlineExceeded,
    DynamicBatcher,
    QueueFull,
    WouldExceedBudget,
    cut_at,
)

Request = tuple[dict[str, Any], dict[str, Any], dict[str, Any]]  # (user, context, candidates)
WAIT_S = 2.0  # safety timeout for events that should fire at once


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


class Recorder:
    """A batch function that records what it was given: items are (name, n_candidates) pairs."""

    def __init__(self, block: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.started = threading.Event()  # set when a batch begins
        self.release = threading.Event()  # a blocking recorder waits for this before returning
        if not block:
            self.release.set()
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()

    def __call__(self, items: list[tuple[str, int]]) -> list[str]:
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        self.calls.append([name for name, _ in items])
        self.started.set()
        self.release.wait(WAIT_S)
        with self._lock:
            self.active -= 1
        return [f"result:{name}" for name, _ in items]

    @property
    def seen(self) -> list[str]:
        return [name for call in self.calls for name in call]


def submit(batcher: DynamicBatcher[Any, Any], name: str, n: int, deadline: float | None = None) -> asyncio.Task[Any]:
    return asyncio.create_task(batcher.submit((name, n), n_candidates=n, deadline=deadline))


async def outcomes(*aws: Coroutine[Any, Any, Any]) -> list[tuple[str, Any]]:
    """Each coroutine's outcome as ("returned", value) or ("raised", exception), told apart."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    await asyncio.wait(tasks)
    return [("raised", t.exception()) if t.exception() else ("returned", t.result()) for t in tasks]


async def busy(batcher: DynamicBatcher[Any, Any], rec: Recorder) -> asyncio.Task[Any]:
    """Submit one request and return once the (blocking) worker is running it."""
    task = submit(batcher, "busy", 1)
    assert await asyncio.to_thread(rec.started.wait, WAIT_S)
    return task


# ---------------------------------------------------------------------------- coalescing
def test_concurrent_requests_are_coalesced_and_each_gets_its_own_result() -> None:
    rec = Recorder()
    batcher = DynamicBatcher(rec, BatcherConfig(max_batch_candidates=100, max_queue_delay_us=20_000))

    async def main() -> list[str]:
        tasks = []
        for i in range(8):  # arrivals spread over ~14 ms, inside one 20 ms window
            tasks.append(submit(batcher, f"r{i}", 10))
            await asyncio.sleep(0.002)
        results = await asyncio.gather(*tasks)
        await batcher.close()
        return results

    assert run(main()) == [f"result:r{i}" for i in range(8)]
    assert len(rec.calls) < 8
    assert rec.seen == [f"r{i}" for i in range(8)]  # FIFO
    assert batcher.stats.batches == len(rec.calls) and batcher.stats.candidates == 80
    assert rec.most_active == 1  # forwards never overlap


def test_batches_respect_max_candidates_keep_fifo_and_never_split_a_request() -> None:
    rec = Recorder()
    sizes = {"a": 30, "b": 50, "c": 40, "d": 20, "e": 60, "f": 10}
    batcher = DynamicBatcher(rec, BatcherConfig(max_batch_candidates=100, max_queue_delay_us=1000))

    async def main() -> None:
        await asyncio.gather(*(batcher.submit((k, n), n_candidates=n) for k, n in sizes.items()))
        await batcher.close()

    run(main())
    # a+b = 80 and c would make 120; c+d = 60 and e would make 120; e+f = 70
    assert rec.calls == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert list(batcher.stats.batch_candidates) == [80, 60, 70]
    assert list(batcher.stats.batch_requests) == [2, 2, 2]


def test_oversized_request_runs_alone() -> None:
    rec = Recorder()
    batcher = DynamicBatcher(rec, BatcherConfig(max_batch_candidates=100, max_queue_delay_us=1000))

    async def main() -> list[str]:
        results = await asyncio.gather(
            *(batcher.submit((k, n), n_candidates=n) for k, n in [("a", 10), ("big", 150), ("c", 10)])
        )
        await batcher.close()
        return results

    assert run(main()) == ["result:a", "result:big", "result:c"]
    assert rec.calls == [["a"], ["big"], ["c"]]
    assert list(batcher.stats.batch_candidates) == [10, 150, 10]


def test_full_batch_is_cut_without_waiting_for_the_delay() -> None:
    rec = Recorder()
    batcher = DynamicBatcher(rec, BatcherConfig(max_batch_candidates=20, max_queue_delay_us=5_000_000))

    async def main() -> float:
        start = time.perf_counter()
        await asyncio.gather(submit(batcher, "a", 10), submit(batcher, "b", 10))
        elapsed = time.perf_counter() - start
        await batcher.close()
        return elapsed

    assert run(main()) < 0.5
    assert rec.calls == [["a", "b"]]


def test_lone_request_is_cut_at_once_however_long_the_delay() -> None:
    """No wait for nothing: with nobody else expected, a 200 ms queue delay adds nothing."""
    rec = Recorder()
    batcher = DynamicBatcher(rec, BatcherConfig(max_batch_candidates=100, max_queue_delay_us=200_000))

    async def main() -> list[float]:
        elapsed = []
        for i in range(3):  # the very first request, then two more 0.3 s apart (longer than the delay)
            if i:
                await asyncio.sleep(0.3)
            start = time.perf_counter()
            await submit(batcher, f"r{i}", 10)
            elapsed.append(time.perf_counter() - start)
        await batcher.close()
        return elapsed

    assert all(e < 0.1 for e in run(main()))  # each far under the 200 ms delay
    assert rec.calls == [["r0"], ["r1"], ["r2"]]
    gap = batcher.arrival_gap_s
    assert gap is not None and gap >= 0.25


def test_steady_stream_still_fills_batches_under_a_long_delay() -> None:
    """Requests every ~5 ms and an idle worker: waiting is worth it, so batches fill up to the cap."""
    rec = Recorder()
    batcher = DynamicBatcher(rec, BatcherConfig(max_batch_candidates=100, max_queue_delay_us=200_000))

    async def main() -> list[str]:
        tasks = []
        for i in range(40):  # open loop: 40 arrivals, 10 candidates each
            tasks.append(submit(batcher, f"r{i}", 10))
            await asyncio.sleep(0.005)
        results = await asyncio.gather(*tasks)
        await batcher.close()
        return results

    assert run(main()) == [f"result:r{i}" for i in range(40)]
    assert rec.seen == [f"r{i}" for i in range(40)]
    sizes = list(batcher.stats.batch_requests)
    # without waiting each request would run alone (the worker is idle between arrivals)
    assert len(sizes) <= 10 and sum(sizes) / len(sizes) >= 4, sizes
    assert max(sizes) == 10  # cut when full, not at the delay


def test_a_closed_loop_caller_is_never_kept_waiting() -> None:
    """One caller that sends the next request once the last is answered: nobody else can come.

    Its arrivals are as frequent as its answers, so the gap alone says "wait": about half the
    50 ms delay per request. None of them finds another request in the batcher (``overlap`` falls),
    so after the first few each is cut at once.
    """
    rec = Recorder()
    batcher = DynamicBatcher(rec, BatcherConfig(max_batch_candidates=100, max_queue_delay_us=50_000))

    async def main() -> list[float]:
        elapsed = []
        for i in range(30):
            start = time.perf_counter()
            await submit(batcher, f"r{i}", 10)
            elapsed.append(time.perf_counter() - start)
        await batcher.close()
        return elapsed

    elapsed = run(main())
    assert float(np.median(elapsed[10:])) < 0.005, elapsed  # far under the 25 ms a gap-only rule waits
    assert batcher.overlap < OVERLAP_MIN


@pytest.mark.parametrize(("gap", "last", "overlap", "due"), [
    (None, None, 1.0, -math.inf),  # a first request: nobody is known to come
    (0.0005, 10.0, 0.2, -math.inf),  # arrivals stopped overlapping
    (0.0005, 10.0, 1.0, 10.001),  # a busy stream: half the delay, since the latest arrival was just now
    (0.0015, 10.0, 1.0, 10.0005),  # sparser arrivals: wait less
    (0.0005, 9.0, 1.0, 9.501),  # nobody for a long while: the stream stopped, cut at once
])
def test_cut_at_waits_only_for_an_expected_arrival(gap: float | None, last: float | None, overlap: float,
                                                   due: float) -> None:
    got = cut_at(10.0, 0.002, gap, last, overlap)
    assert got == pytest.approx(due) if math.isfinite(due) else got == due


def test_a_lone_cheap_request_runs_on_the_loop_thread_and_a_costly_or_queued_one_on_the_worker() -> None:
    """No thread hop where it costs more than it saves; where requests overlap the loop stays free."""
    threads: list[tuple[str, str]] = []

    def run_batch(items: list[tuple[str, float]]) -> list[str]:
        for name, pause in items:
            threads.append((name, threading.current_thread().name))
            time.sleep(pause)
        return [name for name, _ in items]

    batcher: DynamicBatcher[tuple[str, float], str] = DynamicBatcher(run_batch, BatcherConfig(max_queue_delay_us=0))

    async def main() -> None:
        await batcher.submit(("first", 0.0), 1)  # nothing measured yet: the worker
        for _ in range(5):  # one caller at a time: arrivals stop overlapping; measured cheap: the loop
            await batcher.submit(("cheap", 0.0), 1)
        await asyncio.gather(*(batcher.submit((f"burst{i}", 0.0), 1) for i in range(3)))  # together: the worker
        for _ in range(20):  # slow ones teach the fit that a batch costs ~10 ms (each counts <= COST_CLIP x the fit)
            await batcher.submit(("slow", 0.01), 1)
        await batcher.close()

    run(main())
    loop_thread = threading.current_thread().name  # asyncio.run drives the loop on this thread
    where = dict(threads)  # the last thread each name ran on
    assert where["first"] != loop_thread and where["first"].startswith("batcher")
    assert where["cheap"] == loop_thread
    assert [t for n, t in threads if n == "slow"][-1].startswith("batcher")  # fitted cost over INLINE_MAX_S
    assert all(t.startswith("batcher") for n, t in threads if n.startswith("burst"))


# ----------------------------------------------------------------------------- admission
def test_queue_full_is_rejected_at_once() -> None:
    rec = Recorder(block=True)
    batcher = DynamicBatcher(rec, BatcherConfig(max_queue=2, max_queue_delay_us=0))

    async def main() -> float:
        first = await busy(batcher, rec)
        waiting = [submit(batcher, "b", 1), submit(batcher, "c", 1)]
        await asyncio.sleep(0)  # let them enqueue
        assert batcher.queue_depth == 2 and batcher.queued_candidates == 2
        start = time.perf_counter()
        with pytest.raises(QueueFull, match="max_queue=2"):
            await batcher.submit(("d", 1), n_candidates=1)
        elapsed = time.perf_counter() - start
        rec.release.set()
        assert await asyncio.gather(first, *waiting) == ["result:busy", "result:b", "result:c"]
        await batcher.close()
        return elapsed

    assert run(main()) < 0.005
    assert "d" not in rec.seen and batcher.stats.rejected == 1


def test_expired_requests_are_dropped_before_compute() -> None:
    rec = Recorder(block=True)
    batcher = DynamicBatcher(rec, BatcherConfig(max_queue_delay_us=0))

    async def main() -> None:
        first = await busy(batcher, rec)
        late = submit(batcher, "late", 5, deadline=time.monotonic() + 0.03)
        ok = submit(batcher, "ok", 5, deadline=time.monotonic() + 5.0)
        forever = submit(batcher, "forever", 5)
        await asyncio.sleep(0.06)  # "late" expires while the worker is busy
        rec.release.set()
        assert await asyncio.gather(first, ok, forever) == ["result:busy", "result:ok", "result:forever"]
        with pytest.raises(DeadlineExceeded):
            await late
        with pytest.raises(DeadlineExceeded):  # already past when submitted
            await batcher.submit(("past", 1), n_candidates=1, deadline=time.monotonic() - 0.001)
        await batcher.close()

    run(main())
    assert rec.seen == ["busy", "ok", "forever"]
    assert batcher.stats.expired == 2 and batcher.stats.candidates == 11


def test_cancelled_caller_leaves_the_queue() -> None:
    rec = Recorder(block=True)
    batcher = DynamicBatcher(rec, BatcherConfig(max_queue_delay_us=0))

    async def main() -> None:
        first = await busy(batcher, rec)
        gone, stays = submit(batcher, "gone", 7), submit(batcher, "stays", 3)
        await asyncio.sleep(0)
        assert batcher.queue_depth == 2
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert batcher.queue_depth == 1 and batcher.queued_candidates == 3
        rec.release.set()
        assert await asyncio.gather(first, stays) == ["result:busy", "result:stays"]
        await batcher.close()

    run(main())
    assert rec.seen == ["busy", "stays"]


# --------------------------------------------------------------- admission by expected wait
FIXED_S = 0.02  # Sleeper: seconds every batch costs
PER_CANDIDATE_S = 0.001  # Sleeper: seconds per candidate


class Sleeper:
    """A batch function that costs a known time: ``fixed_s + per_candidate_s * candidates``."""

    def __init__(self, fixed_s: float = FIXED_S, per_candidate_s: float = PER_CANDIDATE_S) -> None:
        self.fixed_s, self.per_candidate_s = fixed_s, per_candidate_s
        self.calls: list[list[str]] = []
        self.started = threading.Event()  # set when a batch begins; the test clears it

    def __call__(self, items: list[tuple[str, int]]) -> list[str]:
        self.calls.append([name for name, _ in items])
        self.started.set()
        time.sleep(self.fixed_s + self.per_candidate_s * sum(n for _, n in items))
        return [f"result:{name}" for name, _ in items]


async def measured(batcher: DynamicBatcher[Any, Any], sizes: list[int]) -> None:
    """Run one request per size, each alone (awaited before the next), so the fit sees known batches."""
    for i, n in enumerate(sizes):
        await batcher.submit((f"warm{i}", n), n_candidates=n)


async def backlog(batcher: DynamicBatcher[Any, Any], sleeper: Sleeper, running: int, queued: int = 0) -> list[Any]:
    """A batch of ``running`` candidates on the worker and, unless 0, one of ``queued`` waiting behind it."""
    sleeper.started.clear()
    tasks = [submit(batcher, "running", running)]
    assert await asyncio.to_thread(sleeper.started.wait, WAIT_S)
    if queued:
        tasks.append(submit(batcher, "queued", queued))
        await asyncio.sleep(0)  # let it enqueue
        assert batcher.queue_depth == 1, tasks[-1]
    return tasks


def test_fitted_cost_converges_to_the_true_cost() -> None:
    sleeper = Sleeper(fixed_s=0.004, per_candidate_s=1e-4)
    batcher = DynamicBatcher(sleeper, BatcherConfig(max_queue_wait_us=0))
    sizes = [10, 200, 50, 300, 100, 20] * 5

    async def main() -> tuple[float | None, float | None]:
        assert batcher.costs is None and batcher.estimated_wait_s(100) is None  # nothing measured yet
        await measured(batcher, sizes)
        idle = batcher.estimated_wait_s(100)
        await batcher.close()
        return idle, batcher.estimated_wait_s(100)

    idle, after = run(main())
    costs = batcher.costs
    assert costs is not None and costs.batches == len(sizes)
    # sleep only overshoots, and mostly by a constant: that lands in the fixed part
    assert 0.8e-4 <= costs.per_candidate_s <= 1.5e-4, costs
    assert 0.002 <= costs.fixed_s <= 0.004 + 0.010, costs
    assert idle == pytest.approx(costs.seconds(1, 100)) and after == idle  # idle: its own batch only


def test_request_with_a_deadline_shorter_than_the_expected_wait_is_refused_at_once() -> None:
    sleeper = Sleeper()
    batcher = DynamicBatcher(sleeper, BatcherConfig(max_queue_wait_us=0))  # deadlines only

    async def main() -> tuple[float, float, WouldExceedBudget]:
        await measured(batcher, [10, 100, 50])
        ahead = await backlog(batcher, sleeper, running=100, queued=300)  # ~0.12 s running, 0.32 s queued
        estimate = batcher.estimated_wait_s(100)
        start = time.perf_counter()
        with pytest.raises(WouldExceedBudget, match=r"remaining deadline of \d+\.\d ms") as refused:
            await batcher.submit(("short", 100), n_candidates=100, deadline=time.monotonic() + 0.05)
        refused_after = time.perf_counter() - start
        patient = submit(batcher, "patient", 100, deadline=time.monotonic() + 5.0)
        assert await asyncio.gather(*ahead, patient) == ["result:running", "result:queued", "result:patient"]
        assert estimate is not None
        return estimate, refused_after, refused.value

    estimate, refused_after, err = run(main())
    assert estimate > 0.4  # the rest of 0.12 s running, then 0.02 + 0.4 s for the next batch
    assert refused_after < 0.01  # no await before refusing; a batch here takes >= 0.03 s
    assert issubclass(WouldExceedBudget, QueueFull)  # the server answers RESOURCE_EXHAUSTED for both
    assert err.estimate_s > err.limit_s and 0.04 < err.limit_s <= 0.05
    assert str(err).startswith(f"estimated wait {err.estimate_s * 1e3:.1f} ms exceeds")
    assert "short" not in {n for c in sleeper.calls for n in c} and ["queued", "patient"] in sleeper.calls
    assert batcher.stats.rejected == batcher.stats.over_budget == 1


def test_server_budget_refuses_a_request_without_deadline_and_admits_a_short_wait() -> None:
    sleeper = Sleeper()
    batcher = DynamicBatcher(sleeper, BatcherConfig(max_queue_wait_us=200_000))

    async def main() -> None:
        await measured(batcher, [10, 100, 50])
        ahead = await backlog(batcher, sleeper, running=300)  # ~0.32 s on the worker
        with pytest.raises(WouldExceedBudget, match=r"exceeds max_queue_wait_us of 200\.0 ms"):
            await batcher.submit(("no deadline", 10), n_candidates=10)
        with pytest.raises(WouldExceedBudget, match="max_queue_wait_us"):  # the budget is the tighter limit
            await batcher.submit(("long deadline", 10), n_candidates=10, deadline=time.monotonic() + 60)
        assert await asyncio.gather(*ahead) == ["result:running"]
        # a small batch running: ~0.03 s left plus ~0.03 s of its own, well inside 0.2 s
        small = await backlog(batcher, sleeper, running=10, queued=10)
        estimate = batcher.estimated_wait_s(10)
        assert estimate is not None and estimate < 0.15
        assert await asyncio.gather(*small, submit(batcher, "fits", 10)) == [
            "result:running", "result:queued", "result:fits",
        ]
        await batcher.close()

    run(main())
    assert batcher.stats.rejected == batcher.stats.over_budget == 2


def test_nothing_ahead_or_nothing_measured_is_always_admitted() -> None:
    sleeper = Sleeper()
    batcher = DynamicBatcher(sleeper, BatcherConfig(max_queue_wait_us=1))  # a 1 µs budget

    async def main() -> list[str]:
        first = await batcher.submit(("first", 10), n_candidates=10)  # nothing measured yet
        idle = await batcher.submit(("idle", 10), n_candidates=10)  # measured, but nothing ahead
        ahead = submit(batcher, "ahead", 10)
        await asyncio.sleep(0)  # queued: now something is ahead
        with pytest.raises(WouldExceedBudget):
            await batcher.submit(("behind", 10), n_candidates=10)
        results = [first, idle, await ahead]
        await batcher.close()
        return results

    assert run(main()) == ["result:first", "result:idle", "result:ahead"]
    assert batcher.stats.over_budget == 1


def test_queued_batches_follow_the_cut_rule_through_cancellation_and_expiry() -> None:
    rec = Recorder(block=True)
    batcher = DynamicBatcher(rec, BatcherConfig(max_batch_candidates=100, max_queue_delay_us=0))

    async def main() -> None:
        first = await busy(batcher, rec)
        assert batcher.estimated_wait_s() is None  # the running batch is not measured yet: admit all
        sizes = {"a": 60, "b": 30, "c": 20, "d": 90, "e": 10}
        tasks = {k: submit(batcher, k, n, deadline=time.monotonic() + (0.03 if k == "c" else 5.0))
                 for k, n in sizes.items()}
        await asyncio.sleep(0)
        assert batcher.queued_batches == 3  # [a b] [c] [d e]
        tasks["b"].cancel()
        with pytest.raises(asyncio.CancelledError):
            await tasks["b"]
        assert batcher.queued_batches == 2  # [a c] [d e]
        await asyncio.sleep(0.06)  # c expires while the worker is busy
        rec.release.set()
        assert await asyncio.gather(first, tasks["a"], tasks["d"], tasks["e"]) == [
            "result:busy", "result:a", "result:d", "result:e",
        ]
        with pytest.raises(DeadlineExceeded):
            await tasks["c"]
        assert batcher.queued_batches == 0 and batcher.queued_candidates == 0
        await batcher.close()

    run(main())
    assert rec.calls == [["busy"], ["a"], ["d", "e"]]


def test_cost_fit_recovers_exact_costs_and_stays_non_negative() -> None:
    exact = CostFit()
    for n in [5, 500, 50, 1000, 200]:
        exact.add(n, 0.003 + 2e-5 * n)
    assert exact.costs is not None
    assert exact.costs.fixed_s == pytest.approx(0.003) and exact.costs.per_candidate_s == pytest.approx(2e-5)

    one_size = CostFit()  # every batch full: fixed and per-candidate cannot be told apart
    for _ in range(5):
        one_size.add(1000, 0.05)
    assert one_size.costs is not None and one_size.costs.fixed_s == 0.0 and one_size.costs.batches == 5
    assert one_size.costs.per_candidate_s == pytest.approx(5e-5)

    falling = CostFit()  # larger batches cheaper: no negative per-candidate cost
    for n, s in [(10, 0.05), (100, 0.04), (1000, 0.03)]:
        falling.add(n, s)
    assert falling.costs is not None and falling.costs.per_candidate_s == 0.0 and falling.costs.fixed_s > 0

    drift = CostFit(decay=0.8)  # the model got twice as slow: the fit follows within tens of batches
    for i in range(60):
        n = [10, 300][i % 2]
        drift.add(n, (1 if i < 30 else 2) * 1e-4 * n)
    assert drift.costs is not None and drift.costs.per_candidate_s == pytest.approx(2e-4, rel=0.01)


def test_one_stalled_batch_moves_the_cost_fit_by_a_bounded_factor_and_a_real_slowdown_is_followed() -> None:
    fit = CostFit()
    for n in [10, 100, 50, 200, 20, 100]:
        fit.add(n, 0.002 + 1e-5 * n)
    assert fit.costs is not None
    before = fit.costs.seconds(1, 100)  # 3 ms
    fit.add(100, 1.5)  # the host paused the process: 1.5 s for a 3 ms batch
    after = fit.costs.seconds(1, 100)
    assert after < COST_CLIP * before  # unclipped, this one batch would put it above 0.2 s
    slow = CostFit()
    for _ in range(3):
        slow.add(100, 0.003)
    for _ in range(40):  # every batch now 30x slower (a heavier model, a loaded machine): followed
        slow.add(100, 0.09)
    assert slow.costs is not None and slow.costs.seconds(1, 100) == pytest.approx(0.09, rel=0.05)


def test_arrival_gap_caps_long_idle_spells() -> None:
    gap = ArrivalGap(cap_s=0.004, alpha=0.5)
    gap.add(0.0)
    assert gap.mean_s is None
    gap.add(10.0)  # ten seconds idle counts as the cap
    assert gap.mean_s == pytest.approx(0.004)
    for t in (10.001, 10.002, 10.003):
        gap.add(t)
    assert gap.mean_s == pytest.approx(0.001375)  # halfway to 1 ms each time: 4 -> 2.5 -> 1.75 -> 1.375 ms
    assert gap.last == 10.003


# -------------------------------------------------------------------------------- errors
def test_error_in_a_slot_reaches_only_its_caller() -> None:
    def run_batch(items: list[str]) -> list[str | BaseException]:
        return [ValueError(f"bad item {x}") if x == "bad" else x.upper() for x in items]

    batcher = DynamicBatcher(run_batch, BatcherConfig(max_queue_delay_us=5000))

    async def main() -> list[tuple[str, Any]]:
        results = await outcomes(*(batcher.submit(x, n_candidates=1) for x in ["a", "bad", "c"]))
        await batcher.close()
        return results

    a, (how, bad), c = run(main())
    assert (a, c) == (("returned", "A"), ("returned", "C"))
    assert how == "raised" and isinstance(bad, ValueError) and "bad item bad" in str(bad)
    assert list(batcher.stats.batch_requests) == [3]


def test_raising_batch_is_rerun_one_by_one() -> None:
    calls: list[list[str]] = []

    def run_batch(items: list[str]) -> list[str]:
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("feature 'device' expects str values, got 3")
        return [x.upper() for x in items]

    batcher = DynamicBatcher(run_batch, BatcherConfig(max_queue_delay_us=5000))

    async def main() -> list[tuple[str, Any]]:
        results = await outcomes(*(batcher.submit(x, n_candidates=1) for x in ["a", "bad", "c"]))
        await batcher.close()
        return results

    a, (how, bad), c = run(main())
    assert (a, c) == (("returned", "A"), ("returned", "C"))
    assert how == "raised" and isinstance(bad, ValueError) and "device" in str(bad)
    assert calls == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]


def test_wrong_number_of_results_fails_each_caller() -> None:
    batcher: DynamicBatcher[str, str] = DynamicBatcher(lambda items: ["x"] * 3, BatcherConfig(max_queue_delay_us=5000))

    async def main() -> list[tuple[str, Any]]:
        out = await outcomes(batcher.submit("a", 1), batcher.submit("b", 1))
        await batcher.close()
        return out

    # the batch of two fails the length check, then each item alone does too
    results = run(main())
    assert len(results) == 2
    assert all(how == "raised" and "3 results for 1 items" in str(e) for how, e in results)


# ------------------------------------------------------------------ modes, hooks, close
def test_disabled_runs_each_request_alone() -> None:
    rec = Recorder()
    batcher = DynamicBatcher(rec, BatcherConfig(enabled=False, max_queue_delay_us=20_000))

    async def main() -> list[str]:
        results = await asyncio.gather(*(batcher.submit((f"r{i}", 10), n_candidates=10) for i in range(8)))
        await batcher.close()
        return results

    assert run(main()) == [f"result:r{i}" for i in range(8)]
    assert sorted(rec.calls) == [[f"r{i}"] for i in range(8)]
    assert list(batcher.stats.batch_requests) == [1] * 8 and batcher.queue_depth == 0


def test_disabled_keeps_errors_per_caller_and_limits_requests_in_flight() -> None:
    def run_batch(items: list[str]) -> list[str | BaseException]:
        return [ValueError("bad") if x == "bad" else x.upper() for x in items]

    rec = Recorder(block=True)
    flaky = DynamicBatcher(run_batch, BatcherConfig(enabled=False))
    blocked = DynamicBatcher(rec, BatcherConfig(enabled=False, max_queue=1))

    async def main() -> list[tuple[str, Any]]:
        results = await outcomes(flaky.submit("a", 1), flaky.submit("bad", 1))
        first = await busy(blocked, rec)
        with pytest.raises(QueueFull, match="in flight"):
            await blocked.submit(("second", 1), n_candidates=1)
        rec.release.set()
        assert await first == "result:busy"
        await flaky.close()
        await blocked.close()
        return results

    (a, (how, bad)) = run(main())
    assert a == ("returned", "A") and how == "raised" and isinstance(bad, ValueError)
    assert rec.seen == ["busy"] and blocked.stats.rejected == 1


def test_observer_sees_each_batch() -> None:
    seen: list[tuple[int, int, int]] = []

    class OnlyBatches(BatchObserver):  # overrides only the hook it needs
        def on_batch(self, n_requests: int, n_candidates: int, queue_depth: int) -> None:
            seen.append((n_requests, n_candidates, queue_depth))

    rec = Recorder()
    batcher = DynamicBatcher(rec, BatcherConfig(max_batch_candidates=25, max_queue_delay_us=1000), OnlyBatches())

    async def main() -> None:
        await asyncio.gather(*(batcher.submit((f"r{i}", 10), n_candidates=10) for i in range(5)))
        await batcher.close()

    run(main())
    assert seen == [(2, 20, 3), (2, 20, 1), (1, 10, 0)]


def test_close_drains_the_queue_and_then_refuses() -> None:
    rec = Recorder()
    batcher = DynamicBatcher(rec, BatcherConfig(max_batch_candidates=1000, max_queue_delay_us=5_000_000))

    async def main() -> tuple[list[str], float]:
        tasks = [submit(batcher, f"r{i}", 10) for i in range(4)]
        await asyncio.sleep(0)
        assert batcher.queue_depth == 4
        start = time.perf_counter()
        await batcher.close()  # does not wait out the 5 s delay
        elapsed = time.perf_counter() - start
        assert all(t.done() for t in tasks)
        with pytest.raises(BatcherClosed):
            await batcher.submit(("late", 1), n_candidates=1)
        return [t.result() for t in tasks], elapsed

    results, elapsed = run(main())
    assert results == [f"result:r{i}" for i in range(4)] and elapsed < 0.5
    assert rec.calls == [["r0", "r1", "r2", "r3"]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_candidates": 0}, "max_batch_candidates"),
        ({"max_queue_delay_us": -1}, "max_queue_delay_us"),
        ({"max_queue": 0}, "max_queue"),
        ({"max_queue_wait_us": -1}, "max_queue_wait_us"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatcherConfig(**kwargs)


# ---------------------------------------------------------------------- the real model
def logged_requests(workspace: Any, spec: Any, sizes: list[int]) -> list[Request]:
    """Distinct logged slates as (user, context, candidates), the i-th cut to ``sizes[i]`` candidates."""
    log = pl.read_parquet(sorted(workspace.log.rglob("*.parquet"))[0])
    rid = spec.keys.request
    out: list[Request] = []
    for req_id, n in zip(log[rid].unique(maintain_order=True).to_list(), sizes, strict=False):
        slate = log.filter(pl.col(rid) == req_id).head(n)
        first = slate.row(0, named=True)
        out.append(
            (
                {c: first[c] for c in spec.features_from("user")},
                {c: first[c] for c in spec.features_from("context")},
                {c: slate[c].to_list() for c in spec.features_from("item")},
            )
        )
    assert [len(next(iter(cands.values()))) for _, _, cands in out] == sizes
    return out


def test_score_requests_equals_scoring_each_request(workspace: Any, model: InferenceModel) -> None:
    requests = logged_requests(workspace, model.spec, [10, 3, 7, 1, 10])
    batched = model.score_requests(requests)
    assert len(batched) == len(requests)
    for (user, context, cands), got in zip(requests, batched, strict=True):
        want = model.score_request(user, context, cands)
        assert set(got) == set(want) == set(model.tasks)
        for t in model.tasks:
            assert got[t].shape == want[t].shape == (len(cands[model.spec.keys.item]),)  # (C,)
            np.testing.assert_allclose(got[t], want[t], rtol=1e-6, atol=1e-6)
    assert model.score_requests([]) == []


def test_batcher_over_the_real_model_routes_scores(workspace: Any, model: InferenceModel) -> None:
    requests = logged_requests(workspace, model.spec, [10, 4, 10, 6])
    batcher = DynamicBatcher(model.score_requests, BatcherConfig(max_batch_candidates=20, max_queue_delay_us=20_000))

    async def main() -> list[dict[str, np.ndarray]]:
        n = [len(c[model.spec.keys.item]) for _, _, c in requests]
        results = await asyncio.gather(*(batcher.submit(r, k) for r, k in zip(requests, n, strict=True)))
        await batcher.close()
        return results

    results = run(main())
    assert list(batcher.stats.batch_candidates) == [14, 16]
    for r, got in zip(requests, results, strict=True):
        want = model.score_request(*r)
        for t in model.tasks:
            np.testing.assert_allclose(got[t], want[t], rtol=1e-6, atol=1e-6)
