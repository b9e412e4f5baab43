"""The Ray session of a build on Ray Data: import, connect or start, settings, errors, stage timings.

Ray is imported inside :func:`import_ray` only, so importing this module (or the engine) costs
nothing without the optional extra (``pip install -e .[ray]``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import polars as pl

if TYPE_CHECKING:
    from types import ModuleType

INSTALL = "pip install -e .[ray]"


def require_ray() -> None:
    """Fail with one line (how to install it) when Ray Data is missing; the CLI asks before any work."""
    import_ray()


def import_ray() -> ModuleType:
    try:
        import ray
        import ray.data  # the extra's part this engine needs
    except ImportError as e:
        raise ValueError(f"--engine ray needs Ray Data, which is not installed ({e}): {INSTALL}") from None
    return ray


@contextlib.contextmanager
def session(ray: ModuleType, address: str | None) -> Iterator[None]:
    """Ray for this build: the session already open, else ``ray.init(address)`` (stopped at the end)."""
    if ray.is_initialized():
        yield
        return
    env = os.environ.get("RAY_ADDRESS")
    local = {"include_dashboard": False} if address is None and not env else {}
    notice = _DropMessages(_RAY_INIT_NOTICES)
    handlers = logging.getLogger("ray").handlers
    for h in handlers:
        h.addFilter(notice)
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, **local)
    except ConnectionError as e:
        raise ValueError(f"Ray cluster {address or env!r}: {first_line(e)}") from None
    finally:
        for h in handlers:
            h.removeFilter(notice)
    try:
        yield
    finally:
        ray.shutdown()


# Ray Data's per-execution INFO lines: which dataset starts, its plan, how long it took. Dropped from
# the terminal during a build because the build's own summary says what ran; Ray keeps them in its
# session logs, and its warnings (spilling, backpressure) still show.
_RAY_DATA_CHATTER = ("Starting execution of Dataset", "Execution plan of Dataset", "✔️  Dataset",
                     "Progress bars disabled", "Estimated parquet encoding ratio",
                     "Estimated parquet reader batch size", "Data sink Parquet finished")


# What a new local Ray says at start: that it turned token authentication on (its default). The
# cluster is this build's own, on this machine, and stops with it; nothing to act on.
_RAY_INIT_NOTICES = ("Token authentication is enabled for this Ray cluster",)


class _DropMessages(logging.Filter):
    """Drop log records whose message starts with one of ``texts``."""

    def __init__(self, texts: tuple[str, ...]) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.texts)


@contextlib.contextmanager
def data_context(ray: ModuleType, whole_files: bool) -> Iterator[None]:
    """The Ray Data settings of a build, restored afterwards: blocks in order, no progress bars, and,
    for specs that find duplicates within a file, one block per file (see the module docstring)."""
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.use_datasource_v2, ctx.target_max_block_size, ctx.execution_options.preserve_order,
             ctx.enable_progress_bars)
    chatter = _DropMessages(_RAY_DATA_CHATTER)
    handlers = logging.getLogger("ray.data").handlers
    for h in handlers:
        h.addFilter(chatter)
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.use_datasource_v2 = False  # V1: one read task per file (override_num_blocks), in file order
    if whole_files:
        ctx.target_max_block_size = None  # a task's rows stay one block
    try:
        yield
    finally:
        (ctx.use_datasource_v2, ctx.target_max_block_size, ctx.execution_options.preserve_order,
         ctx.enable_progress_bars) = saved
        for h in handlers:
            h.removeFilter(chatter)


@contextlib.contextmanager
def user_errors(ray: ModuleType) -> Iterator[None]:
    """A user error raised inside a Ray task (a Polars schema error, a ValueError) surfaces as itself,
    not wrapped in Ray's task error, so the CLI prints its one line."""
    try:
        yield
    except ray.exceptions.RayError as e:
        cause: BaseException | None = e
        while cause is not None and isinstance(cause, ray.exceptions.RayError):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if isinstance(cause, ValueError | pl.exceptions.PolarsError | OSError):
            raise cause from None
        raise


def first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


class Clock:
    """Seconds per stage into ``timings`` (for the benchmark); nothing is measured without it."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings if timings is not None else {}
        self.on = timings is not None
        self.stage = ""

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start, self.stage = time.perf_counter(), stage
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def in_task(self, seconds: float) -> None:
        """Seconds one task of the current stage spent in its block function (``<stage>_task_s``)."""
        key = f"{self.stage}_task_s"
        self.timings[key] = self.timings.get(key, 0.0) + seconds

    def ray_stats(self, rows: Any) -> None:
        """The check pass's in-task seconds from Ray Data's block metadata: the UDF, the output
        block's serialization, the whole task (summed over blocks)."""
        if not self.on:
            return
        udf = ser = task = 0.0
        for bundle in rows.iter_internal_ref_bundles():
            for entry in bundle.blocks:
                stats = entry.metadata.exec_stats
                if stats is not None:
                    udf += stats.function_body_time_s or 0.0
                    ser += stats.block_ser_time_s or 0.0
                    task += stats.wall_time_s or 0.0
        self.timings.update(check_udf_s=udf, check_serialize_s=ser, check_task_s=task)
