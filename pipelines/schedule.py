"""A long-lived scheduler for one pipeline: APScheduler with a cron trigger and a persistent job store.

``ranker pipeline schedule --config FILE --cron "0 3 * * *"`` runs :func:`run_schedule`. What it
guarantees, and which APScheduler setting gives it:

- **No overlap**: ``max_instances=1``: a fire time that comes while a run is still going is skipped
  (logged), never started beside it. ``run_pipeline`` also holds a file lock per pipeline, so a
  second scheduler or a manual ``ranker pipeline run`` cannot run the same pipeline at once either.
- **Missed runs, one catch-up**: the job lives in a SQLAlchemy job store (default
  ``sqlite:///<workdir>/scheduler.db``), so the next fire time survives a restart. Fire times that
  passed while the process was down are coalesced (``coalesce=True``) into one run, made only if
  the newest of them is at most ``misfire_grace_s`` old; an older one is logged as missed.
- **Crontab semantics**: APScheduler 3 numbers weekdays from Monday = 0; :func:`parse_cron` maps
  crontab's numbering (Sunday = 0 or 7) onto day names so ``0 3 * * 0`` runs on Sunday.

Example:
    >>> parse_cron("0 3 * * 1-5", "UTC")
    <CronTrigger (month='*', day='*', day_of_week='mon,tue,wed,thu,fri', hour='3', minute='0', timezone='UTC')>
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    EVENT_SCHEDULER_STARTED,
    JobEvent,
    SchedulerEvent,
)
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.util import astimezone
from sqlalchemy import select

log = logging.getLogger("pipelines.schedule")

_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # crontab numbering: 0 (and 7) = Sunday
_NUMERIC_DOW = re.compile(r"(\*|\d+(?:-\d+)?)(?:/(\d+))?")


@dataclass(frozen=True)
class ScheduleConfig:
    """What ``ranker pipeline schedule`` needs.

    Args:
        config_path: the pipeline YAML; reloaded at every run, so edits apply from the next run on.
        cron: a 5-field crontab expression (minute hour day-of-month month day-of-week).
        jobstore_url: SQLAlchemy URL of the job store; None = ``sqlite:///<pipeline workdir>/scheduler.db``.
        misfire_grace_s: how late (seconds) a missed run may still start; older ones are skipped.
        run_now: also run once right away (then follow the cron schedule).
        timezone: IANA zone the cron expression is read in.
    """

    config_path: Path
    cron: str
    jobstore_url: str | None = None
    misfire_grace_s: int = 6 * 3600
    run_now: bool = False
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        if self.misfire_grace_s < 1:
            raise ValueError(f"--misfire-grace-s must be >= 1 second, got {self.misfire_grace_s}")


def _crontab_day_of_week(field: str) -> str:
    """Rewrite crontab day-of-week numbers (0/7 = Sunday) as day names, which APScheduler reads unambiguously.

    Each comma-separated part that is numeric (``N``, ``N-M``, ``*``, each with an optional ``/step``)
    is expanded to the days it means in crontab; parts already written with names pass through.
    """
    if field == "*":
        return field
    parts = []
    for part in field.split(","):
        m = _NUMERIC_DOW.fullmatch(part)
        if m is None:
            parts.append(part)  # names (mon-fri) mean the same to both; anything else APScheduler judges
            continue
        base, step = m.group(1), int(m.group(2) or 1)
        lo, _, hi = base.partition("-")
        first, last = (0, 6) if base == "*" else (int(lo), int(hi or lo))
        if not 0 <= first <= last <= 7 or step < 1:
            raise ValueError(f"day-of-week {part!r} is outside 0-7 (0 and 7 = Sunday) or has a bad step")
        parts += [_WEEKDAYS[d % 7] for d in range(first, last + 1, step)]
    return ",".join(dict.fromkeys(parts))  # 0 and 7 both name Sunday: keep one


def parse_cron(expr: str, timezone: str) -> CronTrigger:
    """Build the trigger of a 5-field crontab expression, read in ``timezone``, with crontab's meaning.

    Two places where APScheduler 3 differs from crontab are handled: day-of-week numbers are
    translated (crontab 0 = Sunday, APScheduler 0 = Monday), and an expression restricting both
    day-of-month and day-of-week is refused (crontab runs when either matches, APScheduler only
    when both do).

    Raises:
        ValueError: naming ``--cron`` or ``--timezone`` and the offending value.
    """
    try:
        tz = astimezone(timezone)
    except Exception as e:  # ZoneInfoNotFoundError is a KeyError; a bad key may raise ValueError
        raise ValueError(f"--timezone {timezone!r} is not an IANA time zone (e.g. UTC, Europe/Berlin): {e}") from None
    fields = expr.split()
    try:
        if len(fields) != 5:
            raise ValueError(f"got {len(fields)} fields, expected 5 (minute hour day-of-month month day-of-week)")
        minute, hour, day, month, day_of_week = fields
        if not day.startswith("*") and not day_of_week.startswith("*"):
            raise ValueError("restricting both day-of-month and day-of-week is not supported "
                             "(crontab runs when either matches); restrict one of them")
        return CronTrigger(minute=minute, hour=hour, day=day, month=month,
                           day_of_week=_crontab_day_of_week(day_of_week), timezone=tz)
    except ValueError as e:
        raise ValueError(f"--cron {expr!r} is not a 5-field crontab expression: {e}") from None


def job_id(config_path: Path) -> str:
    """The job's stable id in the store (``pipeline:<config file stem>``): a restart finds and replaces it."""
    return f"pipeline:{config_path.stem}"


def run_scheduled(config_path: str) -> None:
    """The scheduled job: load the pipeline config, run the pipeline, log the outcome.

    Module-level so that the persistent job store can refer to it by name (``pipelines.schedule:
    run_scheduled``). Every exception is logged and swallowed: one failed night must not stop the
    scheduler, and the next fire time retries with a freshly loaded config.
    """
    started = time.monotonic()
    try:
        from pipelines.config import load_pipeline_config

        pipeline = load_pipeline_config(Path(config_path))
        # Imported after the config loads: a config error is reported without importing the training stack.
        from pipelines.lock import PipelineBusy
        from pipelines.pipeline import run_pipeline

        log.info("scheduled run of pipeline %s (%s) starting", pipeline.name, config_path)
        try:
            result = run_pipeline(pipeline)
        except PipelineBusy as e:  # another process runs it now: expected, not a failure
            log.warning("scheduled run of pipeline %s skipped: %s", pipeline.name, e)
            return
        log.info("scheduled run of pipeline %s: %s in %.0f s: %s", pipeline.name, result.status,
                 time.monotonic() - started, result.message)
    except Exception:
        log.exception("scheduled run of %s failed after %.0f s", config_path, time.monotonic() - started)


def default_jobstore_url(config_path: Path) -> str:
    """``sqlite:///<pipeline workdir>/scheduler.db``: the schedule's state lives beside the pipeline's."""
    from pipelines.config import load_pipeline_config

    workdir = load_pipeline_config(config_path).workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{workdir / 'scheduler.db'}"


def _stored_next_run(store: SQLAlchemyJobStore, jid: str) -> datetime | None:
    """The next fire time the store holds for ``jid`` (None: no such job, or paused).

    Read from the table's own column, without unpickling the job, so a job written by an older
    version of the code still yields its time.
    """
    store.jobs_t.create(store.engine, checkfirst=True)
    with store.engine.begin() as conn:
        ts = conn.execute(select(store.jobs_t.c.next_run_time).where(store.jobs_t.c.id == jid)).scalar()
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def build_scheduler(
    cfg: ScheduleConfig,
    job: Callable[[str], None] = run_scheduled,
    scheduler_cls: type[BaseScheduler] = BlockingScheduler,
    trigger: BaseTrigger | None = None,
) -> BaseScheduler:
    """A scheduler (not started) holding the pipeline's job, with its store, trigger and no-overlap rules.

    Args:
        cfg: the schedule.
        job: called with the config path (as str) at each fire time; must be importable by name
            (a module-level function) because the store persists it by reference.
        scheduler_cls: ``BlockingScheduler`` for the command; ``BackgroundScheduler`` in tests.
        trigger: replaces ``parse_cron(cfg.cron)`` (tests use a seconds-resolution trigger).

    Returns:
        The scheduler; ``job_id(cfg.config_path)`` names its one job.

    A restart replaces the stored job (the cron or the code may have changed) but keeps its stored
    next fire time when that time has passed: those are the runs missed while the process was
    down, which the scheduler then coalesces into one run (within ``misfire_grace_s``). Replacing
    it with a fresh next fire time, as a plain ``replace_existing=True`` would, forgets them.
    """
    trigger = trigger or parse_cron(cfg.cron, cfg.timezone)
    store = SQLAlchemyJobStore(url=cfg.jobstore_url or default_jobstore_url(cfg.config_path))
    jid = job_id(cfg.config_path)
    tz = astimezone(cfg.timezone)
    now = datetime.now(tz)
    stored = _stored_next_run(store, jid)
    if cfg.run_now:
        next_run = now
    elif stored is not None and stored <= now:
        next_run = stored.astimezone(tz)
        log.info("job %s missed its run at %s while the scheduler was down; catching up once "
                 "(if within the %d s misfire grace)", jid, next_run.isoformat(), cfg.misfire_grace_s)
    else:
        next_run = trigger.get_next_fire_time(None, now)
    scheduler = scheduler_cls(jobstores={"default": store}, timezone=tz)
    scheduler.add_job(
        job, trigger, args=[str(cfg.config_path.resolve())], id=jid, name=jid, replace_existing=True,
        next_run_time=next_run, max_instances=1, coalesce=True, misfire_grace_time=cfg.misfire_grace_s,
    )

    def log_next_run(event: SchedulerEvent) -> None:
        if isinstance(event, JobEvent) and event.job_id != jid:
            return
        if event.code == EVENT_JOB_MISSED:
            log.warning("job %s: run due at %s was more than %d s late; skipped", jid,
                        event.scheduled_run_time, cfg.misfire_grace_s)
        elif event.code == EVENT_JOB_MAX_INSTANCES:
            log.warning("job %s: previous run still going; this fire time is skipped", jid)
        # Read the store, not scheduler.get_job(): this runs on the job's thread, and a shutdown
        # holds the scheduler's job-store lock while it waits for that thread (a deadlock).
        when = _stored_next_run(store, jid)
        log.info("job %s: next run at %s", jid, when.astimezone(tz).isoformat() if when else "never")

    scheduler.add_listener(log_next_run, EVENT_SCHEDULER_STARTED | EVENT_JOB_EXECUTED | EVENT_JOB_ERROR
                           | EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
    return scheduler


def run_schedule(
    cfg: ScheduleConfig,
    job: Callable[[str], None] = run_scheduled,
    trigger: BaseTrigger | None = None,
) -> None:
    """Run the pipeline on its schedule in the foreground until SIGTERM or SIGINT.

    The first signal stops scheduling new runs and waits for a running one to finish (a process
    manager's kill timeout should allow for a whole run); the scheduler's state stays in its store.
    The real job's config is loaded once up front so a wrong path or field fails now, not at the
    first fire time. ``job`` and ``trigger`` are as in :func:`build_scheduler`.
    """
    name = cfg.config_path.stem
    if job is run_scheduled:
        from pipelines.config import load_pipeline_config

        name = load_pipeline_config(cfg.config_path).name
    scheduler = build_scheduler(cfg, job=job, scheduler_cls=BlockingScheduler, trigger=trigger)
    log.info("scheduling pipeline %s (%s) with cron %r in %s; missed runs caught up within %d s",
             name, cfg.config_path, cfg.cron, cfg.timezone, cfg.misfire_grace_s)
    stopper: list[threading.Thread] = []
    previous: dict[int, Any] = {}
    stopping = threading.Lock()  # taken once: a second signal (even one that interrupts this handler) only logs

    def stop(signum: int, frame: FrameType | None) -> None:
        if not stopping.acquire(blocking=False):
            log.info("already stopping; waiting for the running job to finish")
            return
        # Shut down on another thread: the handler interrupts the main thread wherever it is, possibly
        # inside the scheduler's loop holding its (re-entrant) job-store lock, which shutdown() takes.
        thread = threading.Thread(target=scheduler.shutdown, kwargs={"wait": True}, name="scheduler-shutdown")
        stopper.append(thread)
        log.info("%s: no new runs; waiting for a running job, if any, to finish", signal.Signals(signum).name)
        thread.start()

    def install_handlers(event: SchedulerEvent) -> None:
        # Called on the main thread by start(), once the scheduler runs (so shutdown() is valid)
        # and before its loop submits the first job.
        previous.update({s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)})

    scheduler.add_listener(install_handlers, EVENT_SCHEDULER_STARTED)
    try:
        scheduler.start()  # returns when the loop sees the stopped state, maybe before shutdown() is done
        for thread in stopper:
            thread.join()  # shutdown() returns when the running job has finished
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    log.info("scheduler stopped")
