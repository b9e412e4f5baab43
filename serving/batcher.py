"""Dynamic batching across requests: concurrent requests share one forward pass.

Knobs are named after Triton's dynamic batcher: ``max_batch_candidates`` (Triton's
``max_batch_size``, counted in candidates because a request carries many),
``max_queue_delay_us`` (``max_queue_delay_microseconds``) and ``max_queue`` (the queue policy's
``max_queue_size``); ``max_queue_wait_us`` is this batcher's own. Rules:

* a request's candidates are never split across batches; a request larger than
  ``max_batch_candidates`` still runs, alone;
* requests are batched in arrival order (FIFO); a batch is cut when the queued candidates reach
  ``max_batch_candidates``, when the oldest queued request has waited ``max_queue_delay_us``, or
  as soon as no other request is expected to arrive within the delay left (no wait for nothing:
  the batcher keeps an EWMA of the gaps between submits, see :meth:`DynamicBatcher.arrival_gap_s`,
  and of how often a request arrives while another is queued or running,
  :meth:`DynamicBatcher.overlap`: callers that send the next request only once the last is
  answered, such as one client in a closed loop, never overlap, and waiting for them is waiting for
  nothing), or when the wait left is shorter than the event loop's timer resolution (asyncio's
  selector sleeps in whole milliseconds, so a 0.1 ms wait would last over 1 ms);
* a request whose deadline has passed when its batch is cut is dropped before compute
  (:class:`DeadlineExceeded`); a caller that is cancelled while waiting leaves the queue;
* at most ``max_queue`` requests wait; the next :meth:`DynamicBatcher.submit` raises
  :class:`QueueFull` at once (the server maps it to RESOURCE_EXHAUSTED);
* admission by expected wait: the batcher fits what a batch costs (a fixed part plus a part per
  candidate, :class:`CostFit`) and refuses a request at once with :class:`WouldExceedBudget` (a
  :class:`QueueFull`) when the batch now running plus the batches the queue will form up to and
  including this request would take longer than its remaining deadline or ``max_queue_wait_us``.
  A request with nothing ahead of it is always admitted, and so is every request before the first
  batch has been measured;
* batches run one at a time on a dedicated worker thread, so forwards never compete for cores;
  requests arriving meanwhile queue up and form the next batch. A lone request with nothing
  queued behind it and no other expected (arrivals stopped overlapping), whose fitted cost is
  at most ``INLINE_MAX_S`` (2 ms), runs on the event loop's thread instead: then the hop to the
  worker and back costs more than it saves (about 0.35 ms of a 2.3 ms one-candidate round trip
  on the 2-core test box); where requests overlap, batches go to the worker and the loop stays
  free to take in the next batch's requests (and, under load, to refuse).

The batch function is the product's own (decode, score, build responses); the batcher only
decides what runs together. Per-request failures reach only their own caller: the batch function
may put an exception in a request's slot, and when it raises as a whole, its requests are re-run
one by one so that one bad request does not fail the others.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from serving import defaults

log = logging.getLogger("serving")

T = TypeVar("T")  # what a request submits (e.g. the model snapshot and the RankRequest)
R = TypeVar("R")  # what the batch function returns per request (e.g. a RankResponse)
RECENT = 1024  # batches whose sizes BatcherStats keeps
COST_DECAY = 0.95  # weight kept by older batches per new one in the cost fit (~20 batches of memory)
COST_CLIP = 4.0  # a batch counts in the cost fit as at most this many times what the fit expected for it
COST_CLIP_AFTER = 3  # batches measured before that cap applies
GAP_ALPHA = 0.2  # weight of the newest inter-arrival gap in its EWMA
OVERLAP_MIN = 0.5  # wait for others only while at least this share of recent arrivals overlapped
# asyncio's selector rounds a timed wait up to whole milliseconds (epoll_wait takes ms) and the loop
# adds its own clock resolution: a timed wait shorter than this would overshoot, so it is not taken
TIMER_RESOLUTION_S = 1e-3
# a lone request expected to take at most this long runs on the event loop's own thread (no hop)
INLINE_MAX_S = 2e-3


class QueueFull(RuntimeError):
    """``max_queue`` requests are already waiting; retry later (gRPC RESOURCE_EXHAUSTED)."""


class WouldExceedBudget(QueueFull):
    """The request's expected wait exceeds its remaining deadline or ``max_queue_wait_us``.

    Raised at once by :meth:`DynamicBatcher.submit`, before the request is queued; being a
    :class:`QueueFull`, it maps to RESOURCE_EXHAUSTED wherever a full queue does.

    Args:
        estimate_s: the expected wait, in seconds.
        limit_s: the limit it exceeds, in seconds.
        limit: what the limit is, for the message (e.g. ``"the request's remaining deadline"``).
    """

    def __init__(self, estimate_s: float, limit_s: float, limit: str) -> None:
        super().__init__(f"estimated wait {estimate_s * 1e3:.1f} ms exceeds {limit} of {limit_s * 1e3:.1f} ms")
        self.estimate_s = estimate_s
        self.limit_s = limit_s


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed before its batch ran; it was never computed."""


class BatcherClosed(RuntimeError):
    """:meth:`DynamicBatcher.close` was called; no new requests are accepted."""


@dataclass(frozen=True)
class BatcherConfig:
    """Dynamic batching knobs (Triton names, plus ``max_queue_wait_us``).

    Args:
        max_batch_candidates: most candidates in one forward pass; a single request with more still
            runs, alone.
        max_queue_delay_us: the longest the oldest queued request may wait for others before its
            batch is cut, in microseconds (0: cut at once with whatever is queued). It is a cap,
            not a fixed wait: the batch is cut as soon as the measured arrival rate says no other
            request will come within the delay left, so a lone request at low load waits nothing.
            That is why the default stays at 2 ms although Triton's is 0: the delay is spent only
            while requests arrive more often than every 2 ms, and then it fills batches.
        max_queue: most requests waiting; beyond it :meth:`DynamicBatcher.submit` raises
            :class:`QueueFull`. With batching disabled, the most requests in flight. A hard cap,
            checked before the expected wait.
        max_queue_wait_us: the server's budget for a request's expected wait (the batch running,
            the batches ahead and its own), in microseconds; beyond it
            :meth:`DynamicBatcher.submit` raises :class:`WouldExceedBudget`. 0 (the default): no
            budget, only the request's own deadline applies, as with Triton's queue policy, whose
            ``default_timeout_microseconds`` is 0 too. A budget is a latency target the server cannot
            guess: on the 2-core test box 32 concurrent small requests already queue for about
            165 ms, and 100 ms refused part of such a burst. Set it (e.g. 50_000) where admitted
            requests must keep their latency under overload.
        enabled: ``False`` runs each request alone as it arrives, concurrently on the default
            thread pool (the server's behaviour without a batcher), for comparison.

    Raises:
        ValueError: a knob out of range (named, with its value).

    Example:
        >>> BatcherConfig(max_queue_wait_us=20_000).max_queue_wait_us
        20000
    """

    max_batch_candidates: int = defaults.MAX_BATCH_CANDIDATES
    max_queue_delay_us: int = defaults.MAX_QUEUE_DELAY_US
    max_queue: int = defaults.MAX_QUEUE
    max_queue_wait_us: int = round(defaults.MAX_QUEUE_WAIT_MS * 1000)
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.max_batch_candidates < 1:
            raise ValueError(f"max_batch_candidates must be >= 1, got {self.max_batch_candidates}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.max_queue_wait_us < 0:
            raise ValueError(f"max_queue_wait_us must be >= 0 (0: no budget), got {self.max_queue_wait_us}")


@dataclass(frozen=True)
class BatchCosts:
    """What a batch costs: ``seconds = fixed_s + per_candidate_s * candidates``.

    Args:
        fixed_s: seconds every batch pays whatever its size.
        per_candidate_s: seconds per candidate in the batch.
        batches: how many batches the fit has seen.

    Example:
        >>> costs = BatchCosts(fixed_s=0.002, per_candidate_s=1e-5, batches=10)
        >>> round(costs.seconds(n_batches=2, n_candidates=300), 6)  # 2 x 2 ms + 300 x 10 µs
        0.007
    """

    fixed_s: float
    per_candidate_s: float
    batches: int

    def seconds(self, n_batches: int, n_candidates: int) -> float:
        """Time to compute ``n_candidates`` candidates in ``n_batches`` batches, in seconds."""
        return n_batches * self.fixed_s + n_candidates * self.per_candidate_s


class CostFit:
    """Exponentially weighted least squares of a batch's seconds on its candidates.

    Every batch's weight shrinks by ``decay`` per newer batch, so the fit follows a model reload or
    a change of machine load within some tens of batches. Both costs are kept >= 0: a negative
    intercept refits through the origin, a negative slope leaves a fixed cost only. When the
    batches seen are nearly all the same size (candidates spread under 10% of their mean, as
    under overload, where every batch is full), the two costs cannot be told apart and the cost is
    taken as proportional to the candidates (``fixed_s`` 0). Once ``COST_CLIP_AFTER`` batches are
    measured, a batch counts as at most ``COST_CLIP`` times what the fit expected of it: one stalled
    batch (the host paused the process for a second) would otherwise multiply every estimate and
    refuse requests that had plenty of time, while a real slowdown is still followed, within tens of
    batches (the fit errs low meanwhile, which admits more, never refuses wrongly).

    Args:
        decay: weight kept by the older batches per new one, in (0, 1].

    Raises:
        ValueError: ``decay`` out of range.

    Example:
        >>> fit = CostFit()
        >>> for n in (10, 100, 50, 200):
        ...     fit.add(n, 0.005 + 1e-4 * n)
        >>> costs = fit.costs
        >>> round(costs.fixed_s, 6), round(costs.per_candidate_s, 8), costs.batches
        (0.005, 0.0001, 4)
    """

    def __init__(self, decay: float = COST_DECAY) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self._decay = decay
        self._w = self._x = self._y = self._xx = self._xy = 0.0  # weighted sums: 1, x, y, x², xy
        self._batches = 0
        self._costs: BatchCosts | None = None

    @property
    def costs(self) -> BatchCosts | None:
        """The current fit; ``None`` before the first batch."""
        return self._costs

    def add(self, n_candidates: int, seconds: float) -> None:
        """Add one measured batch: ``n_candidates`` candidates took ``seconds``."""
        d, x, y = self._decay, float(n_candidates), float(seconds)
        if self._costs is not None and self._batches >= COST_CLIP_AFTER:
            expected = self._costs.seconds(1, n_candidates)
            if expected > 0.0:
                y = min(y, COST_CLIP * expected)
        self._w = d * self._w + 1.0
        self._x = d * self._x + x
        self._y = d * self._y + y
        self._xx = d * self._xx + x * x
        self._xy = d * self._xy + x * y
        self._batches += 1
        self._costs = BatchCosts(*self._solve(), batches=self._batches)

    def _solve(self) -> tuple[float, float]:
        mean_x, mean_y = self._x / self._w, self._y / self._w
        var_x = max(self._xx / self._w - mean_x * mean_x, 0.0)
        if var_x >= max(1.0, (0.1 * mean_x) ** 2):
            slope = (self._xy / self._w - mean_x * mean_y) / var_x
            fixed = mean_y - slope * mean_x
            if fixed < 0.0:
                return 0.0, max(self._xy / self._xx, 0.0)
            if slope < 0.0:
                return max(mean_y, 0.0), 0.0
            return fixed, slope
        if self._x > 0.0:  # one size only: proportional
            return 0.0, max(self._y / self._x, 0.0)
        return max(mean_y, 0.0), 0.0  # only empty batches: all of it is fixed


class ArrivalGap:
    """EWMA of the gaps between arrivals, each gap capped at ``cap_s``.

    The cap keeps one long idle spell from hiding a burst that follows it for many arrivals: every
    gap longer than the cap means "nobody comes within the queue delay" just as well.

    Args:
        cap_s: the longest gap counted, in seconds (twice the queue delay in the batcher).
        alpha: weight of the newest gap, in (0, 1].

    Raises:
        ValueError: ``cap_s`` or ``alpha`` out of range.

    Example:
        >>> gap = ArrivalGap(cap_s=1.0, alpha=0.5)
        >>> for t in (0.0, 0.010, 0.020, 0.040):
        ...     gap.add(t)
        >>> round(gap.mean_s, 6), gap.last
        (0.015, 0.04)
    """

    def __init__(self, cap_s: float, alpha: float = GAP_ALPHA) -> None:
        if cap_s < 0.0:
            raise ValueError(f"cap_s must be >= 0, got {cap_s}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self._cap_s = cap_s
        self._alpha = alpha
        self.mean_s: float | None = None  # None until two arrivals were seen
        self.last: float | None = None  # the latest arrival, time.monotonic() seconds

    def add(self, now: float) -> None:
        """One arrival at ``now`` (``time.monotonic()`` seconds)."""
        if self.last is not None:
            gap = min(max(now - self.last, 0.0), self._cap_s)
            self.mean_s = gap if self.mean_s is None else self.mean_s + self._alpha * (gap - self.mean_s)
        self.last = now


def cut_at(oldest: float, delay_s: float, gap_s: float | None, last: float | None, overlap: float) -> float:
    """When a batch whose oldest request arrived at ``oldest`` is due (``time.monotonic()`` seconds).

    Waiting is worth it only while the next arrival is expected before the oldest request's
    delay runs out. Nobody is expected when nothing is known yet (``gap_s`` None: a first request)
    or when arrivals stopped overlapping (``overlap`` under :data:`OVERLAP_MIN`: each caller waits
    for its answer before it sends again). Otherwise the expected time to the next arrival is the
    mean gap, or the time since the latest arrival once that is longer (the stream has slowed, or
    stopped); so the batch is due at the first moment ``max(gap, now - last) >= latest - now``, and
    never after ``latest = oldest + delay_s``. The caller cuts at once when less than
    :data:`TIMER_RESOLUTION_S` is left.

    Example:
        >>> round(cut_at(10.0, 0.002, gap_s=0.0005, last=10.0, overlap=1.0), 6)  # a busy stream: wait
        10.001
        >>> cut_at(10.0, 0.002, gap_s=0.0005, last=10.0, overlap=0.0)  # a closed loop: now
        -inf
    """
    if gap_s is None or last is None or overlap < OVERLAP_MIN:
        return -math.inf
    latest = oldest + delay_s
    return min(latest - gap_s, (latest + last) / 2, latest)


class BatchObserver:
    """Hooks for metrics (e.g. Prometheus histograms and counters), called on the event loop.

    Subclass and override the hooks you need; the others do nothing. Must be quick and must not
    raise (an exception is logged and ignored).
    """

    def on_batch(self, n_requests: int, n_candidates: int, queue_depth: int) -> None:
        """A batch is about to run; ``queue_depth``: requests still waiting after it was cut."""

    def on_expired(self, n_requests: int) -> None:
        """Requests dropped because their deadline passed before compute."""

    def on_rejected(self) -> None:
        """A request refused at submit: the queue was full or its expected wait too long."""

    def on_over_budget(self) -> None:
        """Of the refusals, one for an expected wait too long (after :meth:`on_rejected`)."""


@dataclass
class BatcherStats(BatchObserver):
    """Running totals, always kept; read them for tests and logs."""

    batches: int = 0
    requests: int = 0  # requests that reached compute
    candidates: int = 0  # candidates that reached compute
    expired: int = 0  # dropped before compute, deadline passed
    rejected: int = 0  # refused at submit: queue full or expected wait too long
    over_budget: int = 0  # of those, refused for the expected wait
    # the most recent batches (bounded, so a long-running server does not grow), oldest first
    batch_requests: collections.deque[int] = field(default_factory=lambda: collections.deque(maxlen=RECENT))
    batch_candidates: collections.deque[int] = field(default_factory=lambda: collections.deque(maxlen=RECENT))

    def on_batch(self, n_requests: int, n_candidates: int, queue_depth: int) -> None:
        self.batches += 1
        self.requests += n_requests
        self.candidates += n_candidates
        self.batch_requests.append(n_requests)
        self.batch_candidates.append(n_candidates)

    def on_expired(self, n_requests: int) -> None:
        self.expired += n_requests

    def on_rejected(self) -> None:
        self.rejected += 1

    def on_over_budget(self) -> None:
        self.over_budget += 1


@dataclass(eq=False)
class _Pending(Generic[T, R]):
    item: T
    n: int  # candidates
    deadline: float | None  # time.monotonic() seconds
    enqueued: float  # time.monotonic() seconds
    future: asyncio.Future[R]


class DynamicBatcher(Generic[T, R]):
    """Coalesces concurrent requests into batches for one batch function.

    Args:
        run_batch: blocking; items in, one result per item out, in order. An exception instance
            in a slot fails only that item's caller; an exception raised by the call re-runs its
            items one by one. Runs on a dedicated worker thread, one batch at a time; each batch
            that does not raise is timed there and fitted (:attr:`costs`).
        config: the batching knobs.
        observer: optional metrics hooks, called on the event loop (besides :attr:`stats`).

    Example:
        >>> async def main() -> tuple[list[int], list[int]]:
        ...     batcher = DynamicBatcher(lambda xs: [2 * x for x in xs], BatcherConfig(max_queue_delay_us=1000))
        ...     results = await asyncio.gather(*(batcher.submit(x, n_candidates=10) for x in range(3)))
        ...     await batcher.close()
        ...     return results, list(batcher.stats.batch_candidates)
        >>> asyncio.run(main())
        ([0, 2, 4], [30])
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R | BaseException]],
        config: BatcherConfig | None = None,
        observer: BatchObserver | None = None,
    ) -> None:
        self.config = config or BatcherConfig()
        self.stats = BatcherStats()
        self._run_batch = run_batch
        self._observers: list[BatchObserver] = [self.stats] + ([observer] if observer is not None else [])
        self._queue: collections.deque[_Pending[T, R]] = collections.deque()
        self._queued_candidates = 0
        # how the queue splits into batches when cut greedily from the head (kept in O(1) per submit)
        self._queued_batches = 0
        self._tail_candidates = 0  # candidates in the last of those batches
        self._running: tuple[float, int] | None = None  # (start, candidates) of the batch on the worker
        self._fit = CostFit()
        self._arrivals = ArrivalGap(cap_s=2 * self.config.max_queue_delay_us / 1e6)
        self._overlap = 1.0  # EWMA of "arrived while another request was queued or running"; optimistic
        self._in_flight = 0  # disabled mode only: requests running on the default pool
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch (not those running); always 0 with batching disabled."""
        return len(self._queue)

    @property
    def queued_candidates(self) -> int:
        """Candidates of the requests waiting for a batch."""
        return self._queued_candidates

    @property
    def queued_batches(self) -> int:
        """Batches the waiting requests will form (cut in order, never split, none joining)."""
        return self._queued_batches

    @property
    def costs(self) -> BatchCosts | None:
        """The fitted cost of a batch (fixed and per candidate); ``None`` before one was measured."""
        return self._fit.costs

    @property
    def arrival_gap_s(self) -> float | None:
        """EWMA of the gaps between admitted submits, in seconds; ``None`` before the second one."""
        return self._arrivals.mean_s

    @property
    def overlap(self) -> float:
        """EWMA of the share of submits that found another request queued or running (1.0 at first).

        Below :data:`OVERLAP_MIN` the batcher cuts at once: its callers wait for their answers
        before they send again, so nobody arrives while a batch waits.
        """
        return self._overlap

    def estimated_wait_s(self, n_candidates: int = 0) -> float | None:
        """Expected seconds until a request of ``n_candidates`` submitted now has its result.

        The rest of the batch now running (its fitted cost less the time it has run, at least 0),
        plus the batches the queue will form up to and including this request, each costing the
        fixed part, plus every candidate of those at the per-candidate cost. The queue delay is
        not counted (it applies only while the worker is idle and requests keep coming).

        Args:
            n_candidates: the request's candidates.

        Returns:
            the estimate, or ``None`` before any batch was measured (and with batching disabled).

        Example:
            >>> async def main() -> tuple[float | None, bool]:
            ...     batcher = DynamicBatcher(lambda xs: list(xs), BatcherConfig())
            ...     before = batcher.estimated_wait_s(10)
            ...     await batcher.submit("x", n_candidates=10)  # one batch measured
            ...     after = batcher.estimated_wait_s(10)
            ...     await batcher.close()
            ...     return before, after is not None and after >= 0.0
            >>> asyncio.run(main())
            (None, True)
        """
        costs = self._fit.costs
        if costs is None:
            return None
        ahead = 0.0
        if self._running is not None:
            start, running_n = self._running
            ahead = max(costs.seconds(1, running_n) - (time.monotonic() - start), 0.0)
        n_batches = self._queued_batches + (0 if self._fits_tail(n_candidates) else 1)
        return ahead + costs.seconds(n_batches, self._queued_candidates + n_candidates)

    async def submit(self, item: T, n_candidates: int, deadline: float | None = None) -> R:
        """Queue one request and wait for its result.

        Args:
            item: what ``run_batch`` gets for this request.
            n_candidates: its candidates (batch size is counted in these).
            deadline: ``time.monotonic()`` seconds after which the result is useless, or ``None``.

        Returns:
            this item's result from ``run_batch``.

        Raises:
            ValueError: ``n_candidates`` is negative.
            QueueFull: ``max_queue`` requests are already waiting (raised at once).
            WouldExceedBudget: the expected wait exceeds the remaining deadline or
                ``max_queue_wait_us`` (raised at once; never while nothing is ahead of it).
            DeadlineExceeded: the deadline passed before the request was computed.
            BatcherClosed: :meth:`close` has been called.
            Exception: whatever ``run_batch`` put in (or raised for) this item.
        """
        if n_candidates < 0:
            raise ValueError(f"n_candidates must be >= 0, got {n_candidates}")
        if self._closing:
            raise BatcherClosed("the batcher is closed; no new requests are accepted")
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            self._notify("on_expired", 1)
            raise DeadlineExceeded(f"deadline passed {now - deadline:.6f}s before the request was queued")
        if not self.config.enabled:
            return await self._run_alone(item, n_candidates)
        if len(self._queue) >= self.config.max_queue:
            self._notify("on_rejected")
            raise QueueFull(f"{len(self._queue)} requests waiting (max_queue={self.config.max_queue})")
        self._admit(n_candidates, None if deadline is None else deadline - now)
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        pending = _Pending(item, n_candidates, deadline, now, future)
        self._arrivals.add(now)
        busy = 1.0 if self._queue or self._running is not None else 0.0
        self._overlap += GAP_ALPHA * (busy - self._overlap)
        self._queue.append(pending)
        self._queued_candidates += n_candidates
        self._pack(n_candidates)
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="DynamicBatcher")
        self._wakeup.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            self._forget(pending)  # the caller went away: free its place, never compute it
            raise

    async def close(self) -> None:
        """Stop accepting requests, finish every queued one, then stop the loop and the worker."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # -------------------------------------------------------------------------- admission
    def _admit(self, n_candidates: int, deadline_left_s: float | None) -> None:
        """Raise :class:`WouldExceedBudget` if the expected wait is over a limit; O(1), no await."""
        if self._running is None and not self._queue:
            return  # nothing ahead: refusing cannot shorten its wait, and keeps the fit measuring
        estimate = self.estimated_wait_s(n_candidates)
        if estimate is None:
            return
        limits = []
        if deadline_left_s is not None:
            limits.append((deadline_left_s, "the request's remaining deadline"))
        if self.config.max_queue_wait_us > 0:
            limits.append((self.config.max_queue_wait_us / 1e6, "max_queue_wait_us"))
        if not limits:
            return
        limit_s, what = min(limits)
        if estimate > limit_s:
            self._notify("on_rejected")
            self._notify("on_over_budget")
            raise WouldExceedBudget(estimate, limit_s, what)

    def _fits_tail(self, n: int) -> bool:
        """Would a request of ``n`` candidates join the queue's last batch rather than start one?"""
        return self._queued_batches > 0 and self._tail_candidates + n <= self.config.max_batch_candidates

    def _pack(self, n: int) -> None:
        """Account one request appended to the queue in its batches (the rule :meth:`_cut` uses)."""
        if self._fits_tail(n):
            self._tail_candidates += n
        else:
            self._queued_batches += 1
            self._tail_candidates = n

    def _repack(self) -> None:
        """Recount the queue's batches from scratch (after a request left from inside it)."""
        self._queued_batches = self._tail_candidates = 0
        for p in self._queue:
            self._pack(p.n)

    # ------------------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        try:
            while await self._wait_for_batch():
                batch = self._cut()
                if batch:
                    await self._execute(batch)
        finally:  # only on a bug or an outside cancellation: nobody may wait forever
            self._fail(list(self._queue), BatcherClosed("the batcher stopped before this request ran"))
            self._queue.clear()
            self._queued_candidates = 0
            self._repack()

    async def _wait_for_batch(self) -> bool:
        """Until a batch is due (full, delay spent, or nobody expected); False: closed and drained."""
        while True:
            self._wakeup.clear()
            if not self._queue:
                if self._closing:
                    return False
                await self._wakeup.wait()
                continue
            if self._closing or self._queued_candidates >= self.config.max_batch_candidates:
                return True
            now = time.monotonic()
            remaining = self._cut_at() - now
            if remaining < TIMER_RESOLUTION_S:
                return True
            with contextlib.suppress(TimeoutError):  # a new arrival wakes it at once
                await asyncio.wait_for(self._wakeup.wait(), remaining - TIMER_RESOLUTION_S)

    def _cut_at(self) -> float:
        """When the batch at the head is due, in ``time.monotonic()`` seconds (a new arrival re-asks).

        See :func:`cut_at`; the inputs are the oldest queued request's arrival and this batcher's
        arrival statistics.
        """
        return cut_at(self._queue[0].enqueued, self.config.max_queue_delay_us / 1e6, self._arrivals.mean_s,
                      self._arrivals.last, self._overlap)

    def _cut(self) -> list[_Pending[T, R]]:
        """Take requests from the head while they fit; drop those already past their deadline."""
        now = time.monotonic()
        batch: list[_Pending[T, R]] = []
        total = expired = 0
        while self._queue:
            p = self._queue[0]
            if p.deadline is not None and p.deadline <= now:
                self._pop()
                expired += 1
                if not p.future.done():
                    late = now - p.deadline
                    p.future.set_exception(DeadlineExceeded(f"deadline passed {late:.6f}s before the batch ran"))
                continue
            if batch and total + p.n > self.config.max_batch_candidates:
                break  # never split a request, never let a later one jump the queue
            self._pop()
            batch.append(p)
            total += p.n
        if expired or not self._queue:
            self._repack()  # the packing shifted (or is now empty)
        elif batch:
            self._queued_batches -= 1  # the batch cut is exactly the first one packed
        if expired:
            self._notify("on_expired", expired)
        return batch

    async def _execute(self, batch: list[_Pending[T, R]]) -> None:
        n_candidates = sum(p.n for p in batch)
        self._notify("on_batch", len(batch), n_candidates, len(self._queue))
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batcher")
        loop = asyncio.get_running_loop()
        self._running = (time.monotonic(), n_candidates)
        try:
            if self._inline(batch, n_candidates):
                results, seconds = self._run_isolated([p.item for p in batch])
            else:
                results, seconds = await loop.run_in_executor(self._executor, self._run_isolated,
                                                              [p.item for p in batch])
        except asyncio.CancelledError:
            self._fail(batch, BatcherClosed("the batcher stopped while this request ran"))
            raise
        except Exception as e:  # the worker itself failed (not run_batch: that is caught there)
            log.exception("batch of %d could not run", len(batch))
            self._fail(batch, e)
            return
        finally:
            self._running = None
        if seconds is not None:
            self._fit.add(n_candidates, seconds)
        for p, r in zip(batch, results, strict=True):
            if p.future.done():  # cancelled while computing: the result is dropped
                continue
            if isinstance(r, BaseException):
                p.future.set_exception(r)
            else:
                p.future.set_result(r)

    def _inline(self, batch: list[_Pending[T, R]], n_candidates: int) -> bool:
        """Run this batch on the event loop's thread? Only a lone request, with nothing queued behind
        it and no other expected (arrivals do not overlap), whose fitted cost is at most
        :data:`INLINE_MAX_S`: then the hop to the worker thread and back (two wake-ups, on a cold
        core) costs more than the loop could do meanwhile. Where requests overlap, the loop must
        stay free to take them in while the worker computes, or nothing would ever batch."""
        if len(batch) != 1 or self._queue or self._overlap >= OVERLAP_MIN:
            return False
        costs = self._fit.costs
        return costs is not None and costs.seconds(1, n_candidates) <= INLINE_MAX_S

    # --------------------------------------------------------------------- worker side
    def _run_isolated(self, items: list[T]) -> tuple[list[R | BaseException], float | None]:
        """``run_batch`` on the worker thread, timed; if it raises, each item again alone (untimed)."""
        start = time.perf_counter()
        try:
            results = self._checked(items)
            return results, time.perf_counter() - start
        except Exception as e:
            if len(items) == 1:
                return [e], None
            # %.300r: the error may quote names and values sent by a caller; a log line stays bounded
            log.warning("batch of %d failed (%.300r); re-running its requests one by one", len(items), e)
        out: list[R | BaseException] = []
        for item in items:
            try:
                out.extend(self._checked([item]))
            except Exception as e:
                out.append(e)
        return out, None

    def _checked(self, items: list[T]) -> list[R | BaseException]:
        results = list(self._run_batch(items))
        if len(results) != len(items):
            raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} items")
        return results

    # ------------------------------------------------------------------------- helpers
    async def _run_alone(self, item: T, n_candidates: int) -> R:
        """Batching disabled: run now on the default pool, concurrently with other requests."""
        if self._in_flight >= self.config.max_queue:
            self._notify("on_rejected")
            raise QueueFull(f"{self._in_flight} requests in flight (max_queue={self.config.max_queue})")
        self._in_flight += 1
        try:
            self._notify("on_batch", 1, n_candidates, 0)
            (result,), _ = await asyncio.to_thread(self._run_isolated, [item])
        finally:
            self._in_flight -= 1
        if isinstance(result, BaseException):
            raise result
        return result

    @staticmethod
    def _fail(batch: list[_Pending[T, R]], error: BaseException) -> None:
        for p in batch:
            if not p.future.done():
                p.future.set_exception(error)

    def _pop(self) -> None:
        p = self._queue.popleft()
        self._queued_candidates -= p.n

    def _forget(self, pending: _Pending[T, R]) -> None:
        with contextlib.suppress(ValueError):  # already taken into a batch
            self._queue.remove(pending)
            self._queued_candidates -= pending.n
            self._repack()

    def _notify(self, hook: str, *args: int) -> None:
        for obs in self._observers:
            try:
                getattr(obs, hook)(*args)
            except Exception:  # metrics must never break serving
                log.exception("batcher observer %r failed in %s", obs, hook)
