"""Dynamic batching across requests: concurrent requests share one forward pass.

Knobs are named after Triton's dynamic batcher: ``max_batch_candidates`` (Triton's
``max_batch_size``, counted in candidates because a request carries many),
``max_queue_delay_us`` (``max_queue_delay_microseconds``) and ``max_queue`` (the queue policy's
``max_queue_size``). Rules:

* a request's candidates are never split across batches; a request larger than
  ``max_batch_candidates`` still runs, alone;
* requests are batched in arrival order (FIFO); a batch is cut when the queued candidates reach
  ``max_batch_candidates`` or the oldest queued request has waited ``max_queue_delay_us``;
* a request whose deadline has passed when its batch is cut is dropped before compute
  (:class:`DeadlineExceeded`); a caller that is cancelled while waiting leaves the queue;
* at most ``max_queue`` requests wait; the next :meth:`DynamicBatcher.submit` raises
  :class:`QueueFull` at once (the server maps it to RESOURCE_EXHAUSTED);
* batches run one at a time on a dedicated worker thread, so forwards never compete for cores;
  requests arriving meanwhile queue up and form the next batch.

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
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger("serving")

T = TypeVar("T")  # what a request submits (e.g. the model snapshot and the RankRequest)
R = TypeVar("R")  # what the batch function returns per request (e.g. a RankResponse)
RECENT = 1024  # batches whose sizes BatcherStats keeps


class QueueFull(RuntimeError):
    """``max_queue`` requests are already waiting; retry later (gRPC RESOURCE_EXHAUSTED)."""


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed before its batch ran; it was never computed."""


class BatcherClosed(RuntimeError):
    """:meth:`DynamicBatcher.close` was called; no new requests are accepted."""


@dataclass(frozen=True)
class BatcherConfig:
    """Dynamic batching knobs (Triton names).

    Args:
        max_batch_candidates: most candidates in one forward pass; a single request with more still
            runs, alone.
        max_queue_delay_us: how long the oldest queued request may wait for others before its
            batch is cut, in microseconds (0: cut at once with whatever is queued).
        max_queue: most requests waiting; beyond it :meth:`DynamicBatcher.submit` raises
            :class:`QueueFull`. With batching disabled, the most requests in flight.
        enabled: ``False`` runs each request alone as it arrives, concurrently on the default
            thread pool (the server's behaviour without a batcher), for comparison.
    """

    max_batch_candidates: int = 1000
    max_queue_delay_us: int = 2000
    max_queue: int = 256
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.max_batch_candidates < 1:
            raise ValueError(f"max_batch_candidates must be >= 1, got {self.max_batch_candidates}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")


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
        """A request refused because the queue was full."""


@dataclass
class BatcherStats(BatchObserver):
    """Running totals, always kept; read them for tests and logs."""

    batches: int = 0
    requests: int = 0  # requests that reached compute
    candidates: int = 0  # candidates that reached compute
    expired: int = 0  # dropped before compute, deadline passed
    rejected: int = 0  # refused at submit, queue full
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
            items one by one. Runs on a dedicated worker thread, one batch at a time.
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

    async def submit(self, item: T, n_candidates: int, deadline: float | None = None) -> R:
        """Queue one request and wait for its result.

        Args:
            item: what ``run_batch`` gets for this request.
            n_candidates: its candidates (batch size is counted in these).
            deadline: ``time.monotonic()`` seconds after which the result is useless, or ``None``.

        Returns:
            this item's result from ``run_batch``.

        Raises:
            QueueFull: ``max_queue`` requests are already waiting (raised at once).
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
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        pending = _Pending(item, n_candidates, deadline, now, future)
        self._queue.append(pending)
        self._queued_candidates += n_candidates
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

    async def _wait_for_batch(self) -> bool:
        """Until a batch is due (full, or the oldest request has waited long enough); False: closed and drained."""
        delay_s = self.config.max_queue_delay_us / 1e6
        while True:
            self._wakeup.clear()
            if not self._queue:
                if self._closing:
                    return False
                await self._wakeup.wait()
                continue
            if self._closing or self._queued_candidates >= self.config.max_batch_candidates:
                return True
            remaining = self._queue[0].enqueued + delay_s - time.monotonic()
            if remaining <= 0:
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

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
        if expired:
            self._notify("on_expired", expired)
        return batch

    async def _execute(self, batch: list[_Pending[T, R]]) -> None:
        self._notify("on_batch", len(batch), sum(p.n for p in batch), len(self._queue))
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batcher")
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._run_isolated, [p.item for p in batch])
        except asyncio.CancelledError:
            self._fail(batch, BatcherClosed("the batcher stopped while this request ran"))
            raise
        except Exception as e:  # the worker itself failed (not run_batch: that is caught there)
            log.exception("batch of %d could not run", len(batch))
            self._fail(batch, e)
            return
        for p, r in zip(batch, results, strict=True):
            if p.future.done():  # cancelled while computing: the result is dropped
                continue
            if isinstance(r, BaseException):
                p.future.set_exception(r)
            else:
                p.future.set_result(r)

    # --------------------------------------------------------------------- worker side
    def _run_isolated(self, items: list[T]) -> list[R | BaseException]:
        """``run_batch`` on the worker thread; if it raises, each item again alone."""
        try:
            return self._checked(items)
        except Exception as e:
            if len(items) == 1:
                return [e]
            log.warning("batch of %d failed (%r); re-running its requests one by one", len(items), e)
        out: list[R | BaseException] = []
        for item in items:
            try:
                out.extend(self._checked([item]))
            except Exception as e:
                out.append(e)
        return out

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
            (result,) = await asyncio.to_thread(self._run_isolated, [item])
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

    def _notify(self, hook: str, *args: int) -> None:
        for obs in self._observers:
            try:
                getattr(obs, hook)(*args)
            except Exception:  # metrics must never break serving
                log.exception("batcher observer %r failed in %s", obs, hook)
