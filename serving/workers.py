"""Several server processes on one port: ``ranker serve --workers N``.

One ``grpc.aio`` process runs its event loop and the forward pass under one GIL; N processes use N
cores. The pattern is gRPC's Python multiprocessing example: the supervisor (the parent) reserves
the address with a ``SO_REUSEPORT`` socket (a free port when 0 is asked for), then starts N worker
processes with the ``spawn`` start method (never ``fork`` once grpc is imported), each binding the
same address with the gRPC option ``grpc.so_reuseport=1``; the kernel spreads new connections over
them. A worker is a whole single-process server (:func:`serving.server.serve`): its own model
holder, batcher, health service and hot reload (each polls the model URI itself).

Supervisor lifecycle (logger ``serving``, one line each):
    reserve the port -> ``/metrics`` (when ``metrics_port`` is set) -> start the workers -> every
    worker SERVING -> write ``ready_file`` -> watch: a worker that exits unexpectedly is logged and
    restarted, at most ``max_restarts`` times within ``restart_window_s`` (beyond that the pool
    stops and :class:`WorkerError` is raised) -> on SIGINT/SIGTERM, SIGTERM to every worker (each
    goes NOT_SERVING and lets requests in flight finish within ``grace_s``) -> SIGKILL to any
    still running after ``grace_s + kill_after_s`` -> return.

A worker that fails before it is SERVING (the model is not found, the port is taken) stops the
pool; :class:`WorkerError` carries the worker's error message. Workers run in their own process
group (a terminal's Ctrl-C reaches the supervisor only, which forwards one SIGTERM) and shut down
on their own when the supervisor is gone.

Metrics: with ``metrics_port`` set, ``PROMETHEUS_MULTIPROC_DIR`` points the workers at a fresh
temporary directory, and the supervisor alone serves ``/metrics`` with every worker's series
merged (:class:`serving.observability.WorkerMetrics`); the directory is removed at exit.

Run it from Python (in the main thread: it installs signal handlers)::

    from serving.server import ServerOptions
    from serving.workers import PoolOptions, serve_workers
    serve_workers("models:/ranker@champion", "sqlite:///mlflow.db", options=ServerOptions(port=50051),
                  pool=PoolOptions(workers=4))
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from serving.observability import WorkerMetrics, start_metrics_server
from serving.server import RankingServer, ServerOptions, serve

log = logging.getLogger("serving")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_USER_ERRORS = (ValueError, FileNotFoundError, KeyError)  # what the CLI reports as one line, exit code 2
_TICK_S = 0.1  # how often the supervisor looks at signals between worker events


def default_workers() -> int:
    """One worker per core this process may run on (its CPU affinity, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class PoolOptions:
    """How many workers run, and how the supervisor restarts and stops them.

    Args:
        workers: worker processes (default: one per core, :func:`default_workers`).
        max_restarts: restarts allowed within ``restart_window_s``; one more unexpected exit stops
            the pool with :class:`WorkerError` (a crash loop fails loudly instead of spinning).
        restart_window_s: the window of ``max_restarts``, in seconds.
        kill_after_s: seconds past the grace period before a worker that has not exited is killed.
    """

    workers: int = field(default_factory=default_workers)
    max_restarts: int = 5
    restart_window_s: float = 60.0
    kill_after_s: float = 10.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        for name in ("restart_window_s", "kill_after_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value}")


class WorkerError(RuntimeError):
    """The pool could not start or keep its workers running; the message says which worker and why.

    Attributes:
        user_error: the cause is the user's to fix (a missing model, a bad option, a taken port):
            the CLI prints the message alone and exits with code 2, like the single-process path.
    """

    def __init__(self, message: str, user_error: bool = False) -> None:
        super().__init__(message)
        self.user_error = user_error


@dataclass(frozen=True)
class _Launch:
    """What every worker runs (picklable: it crosses the ``spawn`` boundary)."""

    model_uri: str
    tracking_uri: str | None
    grace_s: float
    options: ServerOptions  # port fixed, reuse_port on, no metrics endpoint of its own
    setup: Callable[[], None] | None  # logging and torch threads, given by the composition root
    parent_pid: int


@dataclass(frozen=True)
class _Ready:
    pid: int
    port: int
    version: str


@dataclass(frozen=True)
class _Failed:
    message: str
    user_error: bool


def _worker_main(index: int, launch: _Launch, conn: Connection) -> None:
    """A worker process: a whole single-process server that tells the supervisor when it is SERVING."""
    os.setpgrp()  # signals from a terminal reach the supervisor only; it forwards exactly one SIGTERM
    if launch.setup is not None:
        launch.setup()
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerTag(index))
    threading.Thread(target=_exit_with_parent, args=(launch.parent_pid,), name="parent-watch", daemon=True).start()

    def on_serving(rs: RankingServer) -> None:
        version = rs.holder.current.version if rs.holder.current is not None else ""
        conn.send(_Ready(os.getpid(), rs.port, version))

    try:
        asyncio.run(serve(launch.model_uri, launch.tracking_uri, launch.grace_s, options=launch.options,
                          on_serving=on_serving))
    except Exception as e:
        user_error = isinstance(e, _USER_ERRORS)
        if not user_error:
            log.exception("worker=%d failed", index)
        conn.send(_Failed(str(e) if user_error else f"{type(e).__name__}: {e}", user_error))
        conn.close()
        sys.exit(1)
    conn.close()


class _WorkerTag(logging.Filter):
    """Adds ``worker`` (its index) to every record, a top-level key of JSON logs."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def _exit_with_parent(parent_pid: int) -> None:
    """Shut this worker down gracefully once the supervisor is gone (killed with SIGKILL, say)."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    log.warning("supervisor pid=%d is gone; shutting down", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class _Slot:
    """One worker position; its process is replaced on restart."""

    index: int
    process: BaseProcess
    conn: Connection
    serving: bool = False


def _how(exitcode: int | None) -> str:
    """``exit code 1`` or ``signal SIGKILL`` (multiprocessing reports a signal as a negative code)."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


class _Supervisor:
    """Starts, watches, restarts and stops the worker processes (all from the main thread)."""

    def __init__(self, launch: _Launch, pool: PoolOptions, metrics: WorkerMetrics | None) -> None:
        self.launch = launch
        self.pool = pool
        self.metrics = metrics
        self.signals = 0  # set by the signal handler; read between waits
        self._ctx = multiprocessing.get_context("spawn")
        self._slots: list[_Slot] = []
        self._restarts: deque[float] = deque()

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals > 1:  # a plain int store: safe in a handler, unlike Event.set
            log.warning("signal %s again; workers still running are killed now", signal.Signals(signum).name)

    def start(self) -> bool:
        """Start every worker and wait until all are SERVING; False if a signal came first.

        Raises:
            WorkerError: a worker failed or exited before it was SERVING.
        """
        self._slots = [self._spawn(i) for i in range(self.pool.workers)]
        while not all(s.serving for s in self._slots):
            if self.signals:
                return False
            self._wait()
            for slot in self._slots:
                failure = self._drain(slot)
                if failure is not None:
                    raise WorkerError(failure.message, failure.user_error)
                if not slot.serving and slot.process.exitcode is not None:
                    raise WorkerError(f"worker {slot.index} exited with {_how(slot.process.exitcode)} "
                                      "before it was serving; see its log above")
        self._count_serving()
        return True

    def watch(self) -> None:
        """Restart workers that exit unexpectedly until a signal comes.

        Raises:
            WorkerError: a worker exited once more than ``max_restarts`` allow within the window.
        """
        while not self.signals:
            self._wait()
            for slot in self._slots:
                failure = self._drain(slot)
                if failure is not None:
                    log.error("worker=%d pid=%s failed: %s", slot.index, slot.process.pid, failure.message)
                if slot.process.exitcode is not None and not self.signals:
                    self._restart(slot)

    def stop(self) -> None:
        """SIGTERM to every worker, wait ``drain_s + grace_s + kill_after_s`` (or a second signal), SIGKILL the rest."""
        alive = [s for s in self._slots if s.process.exitcode is None]
        log.info("stopping workers=%d", len(alive))
        for slot in alive:
            slot.process.terminate()  # SIGTERM: NOT_SERVING, requests in flight get grace_s
        deadline = time.monotonic() + self.launch.options.drain_s + self.launch.grace_s + self.pool.kill_after_s
        while any(s.process.exitcode is None for s in alive) and time.monotonic() < deadline and self.signals < 2:
            wait([s.process.sentinel for s in alive if s.process.exitcode is None], timeout=_TICK_S)
        for slot in self._slots:
            if slot.process.exitcode is None:
                log.warning("worker=%d pid=%s did not exit in time; killing it", slot.index, slot.process.pid)
                slot.process.kill()
            slot.process.join()
            slot.conn.close()
            self._forget(slot)
            log.info("worker=%d pid=%s exited with %s", slot.index, slot.process.pid, _how(slot.process.exitcode))
        self._slots = []
        if self.metrics is not None:
            self.metrics.set_serving(0)

    def _spawn(self, index: int) -> _Slot:
        receiver, sender = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(target=_worker_main, args=(index, self.launch, sender),
                                    name=f"ranker-worker-{index}")
        process.start()
        sender.close()  # the worker holds the only writing end: EOF when it exits
        log.info("worker=%d pid=%s starting", index, process.pid)
        return _Slot(index, process, receiver)

    def _wait(self) -> None:
        objects: list[Connection | int] = [s.conn for s in self._slots if not s.conn.closed]
        objects += [s.process.sentinel for s in self._slots if s.process.exitcode is None]
        wait(objects, timeout=_TICK_S)

    def _drain(self, slot: _Slot) -> _Failed | None:
        """Read what the worker said; the failure it reported, if any."""
        failure = None
        while not slot.conn.closed and slot.conn.poll():
            try:
                message = slot.conn.recv()
            except EOFError:  # the worker exited; its sentinel tells how
                slot.conn.close()
                break
            if isinstance(message, _Ready):
                slot.serving = True
                log.info("worker=%d pid=%d serving version=%s port=%d", slot.index, message.pid, message.version,
                         message.port)
                self._count_serving()
            elif isinstance(message, _Failed):
                failure = message
        return failure

    def _restart(self, slot: _Slot) -> None:
        slot.process.join()
        slot.conn.close()
        self._forget(slot)
        cause = _how(slot.process.exitcode)
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > self.pool.restart_window_s:
            self._restarts.popleft()
        if len(self._restarts) >= self.pool.max_restarts:
            raise WorkerError(f"worker {slot.index} exited with {cause}; {len(self._restarts)} restarts within "
                              f"{self.pool.restart_window_s:g}s already, giving up")
        self._restarts.append(now)
        log.warning("worker=%d pid=%s exited unexpectedly with %s; restarting (%d of at most %d per %gs)",
                    slot.index, slot.process.pid, cause, len(self._restarts), self.pool.max_restarts,
                    self.pool.restart_window_s)
        if self.metrics is not None:
            self.metrics.worker_restarted()
        self._slots[self._slots.index(slot)] = self._spawn(slot.index)
        self._count_serving()

    def _forget(self, slot: _Slot) -> None:
        slot.serving = False
        if self.metrics is not None and slot.process.pid is not None:
            self.metrics.worker_exited(slot.process.pid)

    def _count_serving(self) -> None:
        if self.metrics is not None:
            self.metrics.set_serving(sum(s.serving for s in self._slots))


@contextmanager
def _reserved_port(host: str, port: int) -> Iterator[int]:
    """Hold ``host:port`` with a ``SO_REUSEPORT`` socket (bound, not listening) while the workers use it.

    Raises:
        WorkerError: the platform has no ``SO_REUSEPORT``, or the address cannot be bound.
    """
    if not hasattr(socket, "SO_REUSEPORT"):
        raise WorkerError("--workers above 1 needs SO_REUSEPORT, which this platform lacks", user_error=True)
    bind_host = host.strip("[]")  # gRPC writes IPv6 hosts as [::]
    try:
        family = socket.getaddrinfo(bind_host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise WorkerError(f"cannot bind {host}:{port}: {e}", user_error=True) from None
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((bind_host, port))
        except OSError as e:
            raise WorkerError(f"cannot bind {host}:{port}: {e.strerror}", user_error=True) from None
        yield int(sock.getsockname()[1])


@contextmanager
def _merged_metrics(options: ServerOptions) -> Iterator[WorkerMetrics | None]:
    """With ``metrics_port``: a fresh multiprocess directory for the workers and the one ``/metrics`` endpoint."""
    if options.metrics_port is None:
        yield None
        return
    path = tempfile.mkdtemp(prefix="ranker-metrics-")
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = path  # spawned workers inherit it and import prometheus_client after
    try:
        metrics = WorkerMetrics(path)
        try:
            port, stop = start_metrics_server(metrics, options.host, options.metrics_port)
        except OSError as e:
            raise WorkerError(f"metrics_port: cannot bind {options.host}:{options.metrics_port}: {e.strerror}",
                              user_error=True) from None
        try:
            log.info("metrics host=%s metrics_port=%d dir=%s", options.host, port, path)
            yield metrics
        finally:
            stop()
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(path, ignore_errors=True)


def serve_workers(
    model_uri: str,
    tracking_uri: str | None = None,
    grace_s: float | None = None,
    ready_file: str | None = None,
    options: ServerOptions | None = None,
    pool: PoolOptions | None = None,
    setup: Callable[[], None] | None = None,
) -> None:
    """Serve with a pool of worker processes on one port until SIGINT/SIGTERM, then stop them all.

    Call it from the main thread. Returns normally after a signal and a graceful stop.

    Args:
        model_uri: artifact folder or MLflow URI; every worker loads (and hot-reloads) it itself.
        tracking_uri: MLflow tracking/registry URI for MLflow model URIs.
        grace_s: seconds requests in flight get to finish in each worker at shutdown; None =
            ``options.grace_s``.
        ready_file: once every worker is SERVING, the bound port is written here (atomically).
        options: the workers' :class:`~serving.server.ServerOptions`; ``port`` 0 picks one free port
            for all of them; ``metrics_port`` is served by the supervisor, merged over the workers.
        pool: :class:`PoolOptions` (number of workers, restart limits).
        setup: run first in every worker (logging, torch threads); a picklable callable, such as a
            module-level function or a ``functools.partial`` of one.

    Raises:
        WorkerError: a worker failed to start (its message), the address cannot be bound, or
            workers kept dying beyond the restart limit.
    """
    opts = options or ServerOptions()
    pool = pool or PoolOptions()
    with _reserved_port(opts.host, opts.port) as port, _merged_metrics(opts) as metrics:
        worker_opts = dataclasses.replace(opts, port=port, reuse_port=True, metrics_port=None)
        grace = opts.grace_s if grace_s is None else grace_s
        launch = _Launch(model_uri, tracking_uri, grace, worker_opts, setup, os.getpid())
        supervisor = _Supervisor(launch, pool, metrics)
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, supervisor.on_signal) for sig in handled}
        log.info("starting workers=%d host=%s port=%d", pool.workers, opts.host, port)
        try:
            if supervisor.start():
                if ready_file:
                    _write_atomically(Path(ready_file), f"{port}\n")
                log.info("serving workers=%d port=%d", pool.workers, port)
                supervisor.watch()
            log.info("signal received; shutting down")
        finally:
            supervisor.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("stopped workers=%d port=%d", pool.workers, port)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
