"""The pipeline scheduler: crontab parsing, one catch-up run after downtime, no overlapping runs, clean stop.

Real APScheduler throughout (BackgroundScheduler in-process, the blocking one in a subprocess);
the pipeline itself is replaced by small module-level job functions, which the SQLite job store
can refer to by name.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

import pytest
from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobEvent
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from pipelines.schedule import ScheduleConfig, build_scheduler, job_id, parse_cron, run_scheduled

REPO = Path(__file__).resolve().parents[2]


class Record:
    """What the test jobs saw: calls (config paths), and the most that ran at once."""

    lock: ClassVar[threading.Lock] = threading.Lock()
    calls: ClassVar[list[str]] = []
    running: ClassVar[int] = 0
    max_running: ClassVar[int] = 0


@pytest.fixture(autouse=True)
def fresh_record() -> Iterator[None]:
    Record.calls, Record.running, Record.max_running = [], 0, 0
    yield


def record(config_path: str) -> None:
    with Record.lock:
        Record.calls.append(config_path)


def slow_record(config_path: str) -> None:
    """Takes longer than the test trigger's interval, counting how many run at the same time."""
    with Record.lock:
        Record.calls.append(config_path)
        Record.running += 1
        Record.max_running = max(Record.max_running, Record.running)
    time.sleep(0.5)
    with Record.lock:
        Record.running -= 1


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def schedule(tmp_path: Path, cron: str = "0 3 * * *", **kw: object) -> ScheduleConfig:
    return ScheduleConfig(config_path=tmp_path / "nightly.yaml", cron=cron,
                          jobstore_url=f"sqlite:///{tmp_path / 'scheduler.db'}", **kw)  # type: ignore[arg-type]


def miss_runs(cfg: ScheduleConfig, due: datetime, trigger: IntervalTrigger | None = None) -> None:
    """Leave the store as a scheduler process that died before ``due`` would have left it."""
    first = build_scheduler(cfg, job=record, scheduler_cls=BackgroundScheduler, trigger=trigger)
    first.start(paused=True)
    first.modify_job(job_id(cfg.config_path), next_run_time=due)
    # Detach the store before stopping: a scheduler that stops processes due jobs once more, a dead one does not.
    first.remove_jobstore("default")
    first.shutdown()


@pytest.mark.parametrize("expr", ["61 * * * *", "0 3 * *", "every night", "0 3 * * 8", "0 3 1 * 1"])
def test_bad_cron_names_the_flag_and_value(expr: str) -> None:
    with pytest.raises(ValueError, match=r"--cron") as e:
        parse_cron(expr, "UTC")
    assert repr(expr) in str(e.value)


def test_bad_timezone_names_the_flag_and_value() -> None:
    with pytest.raises(ValueError, match=r"--timezone 'Mars/Olympus'"):
        parse_cron("0 3 * * *", "Mars/Olympus")


@pytest.mark.parametrize(
    ("expr", "weekdays"),
    [("0 3 * * 0", {"Sun"}), ("0 3 * * 7", {"Sun"}), ("0 3 * * 1-5", {"Mon", "Tue", "Wed", "Thu", "Fri"}),
     ("0 3 * * */3", {"Sun", "Wed", "Sat"}), ("0 3 * * sat,sun", {"Sat", "Sun"})],
)
def test_weekday_numbers_mean_what_crontab_means(expr: str, weekdays: set[str]) -> None:
    trigger = parse_cron(expr, "Europe/Berlin")
    t, seen = datetime(2026, 1, 7, tzinfo=UTC), set()  # a Wednesday
    for _ in range(7):  # seven fire times, all before the switch to summer time
        t = trigger.get_next_fire_time(None, t + timedelta(seconds=1))
        assert (t.hour, t.minute, t.utcoffset()) == (3, 0, timedelta(hours=1))  # 03:00 Berlin (CET)
        seen.add(t.strftime("%a"))
    assert seen == weekdays


def test_missed_runs_while_down_coalesce_into_one_run(tmp_path: Path) -> None:
    cfg = schedule(tmp_path, cron="* * * * *")  # every minute
    miss_runs(cfg, datetime.now(UTC) - timedelta(minutes=10, seconds=30))  # down for 10+ fire times
    scheduler = build_scheduler(cfg, job=record, scheduler_cls=BackgroundScheduler)
    scheduler.start()
    try:
        assert wait_for(lambda: len(Record.calls) >= 1), "the missed runs were not caught up"
        time.sleep(0.5)  # one run per missed minute would have happened by now
        next_run = scheduler.get_job(job_id(cfg.config_path)).next_run_time
    finally:
        scheduler.shutdown()
    assert Record.calls == [str(cfg.config_path.resolve())]
    assert datetime.now(UTC) < next_run <= datetime.now(UTC) + timedelta(minutes=1)


def test_missed_run_older_than_the_grace_time_is_skipped(tmp_path: Path) -> None:
    cfg = schedule(tmp_path, misfire_grace_s=60)
    daily = IntervalTrigger(days=1)
    miss_runs(cfg, datetime.now(UTC) - timedelta(hours=2), trigger=daily)
    missed = threading.Event()
    scheduler = build_scheduler(cfg, job=record, scheduler_cls=BackgroundScheduler, trigger=daily)
    scheduler.add_listener(lambda e: missed.set(), EVENT_JOB_MISSED)
    scheduler.start()
    try:
        assert missed.wait(5), "a run 2 h late with a 60 s grace time was not reported missed"
    finally:
        scheduler.shutdown()
    assert Record.calls == []


def test_restart_with_nothing_missed_waits_for_the_next_fire_time(tmp_path: Path) -> None:
    cfg = schedule(tmp_path)
    for _ in range(2):  # the second build replaces the stored job under the same id
        scheduler = build_scheduler(cfg, job=record, scheduler_cls=BackgroundScheduler)
        scheduler.start()
        jobs = scheduler.get_jobs()
        scheduler.shutdown()
        assert [j.id for j in jobs] == ["pipeline:nightly"]
        assert (jobs[0].next_run_time.hour, jobs[0].next_run_time.minute) == (3, 0)
        assert jobs[0].next_run_time > datetime.now(UTC)
    assert Record.calls == []


def test_run_now_runs_once_then_follows_the_schedule(tmp_path: Path) -> None:
    cfg = schedule(tmp_path, run_now=True)
    scheduler = build_scheduler(cfg, job=record, scheduler_cls=BackgroundScheduler)
    scheduler.start()
    try:
        assert wait_for(lambda: len(Record.calls) == 1), "run_now did not run"
        assert wait_for(lambda: scheduler.get_job("pipeline:nightly").next_run_time.hour == 3)
    finally:
        scheduler.shutdown()
    assert len(Record.calls) == 1


def test_runs_never_overlap(tmp_path: Path) -> None:
    cfg = schedule(tmp_path, run_now=True)
    skipped: list[JobEvent] = []
    scheduler = build_scheduler(cfg, job=slow_record, scheduler_cls=BackgroundScheduler,
                                trigger=IntervalTrigger(seconds=0.2))  # fires faster than a run (0.5 s)
    scheduler.add_listener(skipped.append, EVENT_JOB_MAX_INSTANCES)
    scheduler.start()
    try:
        assert wait_for(lambda: len(Record.calls) >= 3, timeout_s=10)
    finally:
        scheduler.shutdown(wait=True)
    assert Record.max_running == 1
    assert skipped, "fire times during a run should be skipped, not queued"


def test_failed_run_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "no-such-pipeline.yaml"
    with caplog.at_level(logging.INFO, logger="pipelines.schedule"):
        run_scheduled(str(missing))  # must not raise: the scheduler keeps going
    [failure] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert failure.name == "pipelines.schedule" and str(missing) in failure.getMessage()
    assert failure.exc_info is not None and isinstance(failure.exc_info[1], ValueError)
    assert "not found" in str(failure.exc_info[1])


def test_run_outcome_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "nightly.yaml"
    path.write_text(f"name: nightly\nsource: {{path: {tmp_path / 'landing'}}}\nworkdir: {tmp_path / 'work'}\n")
    seen = []

    def fake_run_pipeline(config: object, as_of: object = None, force: bool = False) -> object:
        seen.append(config)
        return types.SimpleNamespace(status="noop", message="no new partition since 2026-01-07")

    monkeypatch.setitem(sys.modules, "pipelines.pipeline", types.SimpleNamespace(run_pipeline=fake_run_pipeline))
    with caplog.at_level(logging.INFO, logger="pipelines.schedule"):
        run_scheduled(str(path))
    assert [getattr(c, "name", None) for c in seen] == ["nightly"]
    assert any("noop" in r.getMessage() and "no new partition since 2026-01-07" in r.getMessage()
               for r in caplog.records if r.levelno == logging.INFO)


def test_a_run_already_going_elsewhere_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.lock import PipelineBusy

    path = tmp_path / "nightly.yaml"
    path.write_text(f"name: nightly\nsource: {{path: {tmp_path / 'landing'}}}\nworkdir: {tmp_path / 'work'}\n")

    def busy(config: object, as_of: object = None, force: bool = False) -> object:
        raise PipelineBusy("pipeline nightly is running in pid 4242")

    monkeypatch.setitem(sys.modules, "pipelines.pipeline", types.SimpleNamespace(run_pipeline=busy))
    with caplog.at_level(logging.INFO, logger="pipelines.schedule"):
        run_scheduled(str(path))
    assert [r.levelno for r in caplog.records if "pid 4242" in r.getMessage()] == [logging.WARNING]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_default_job_store_lives_in_the_pipeline_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nightly.yaml").write_text("name: nightly\nsource: {path: landing}\nworkdir: state/nightly\n")
    cfg = ScheduleConfig(config_path=Path("nightly.yaml"), cron="0 3 * * *")
    scheduler = build_scheduler(cfg, job=record, scheduler_cls=BackgroundScheduler)
    scheduler.start(paused=True)
    scheduler.shutdown()
    assert (tmp_path / "state" / "nightly" / "scheduler.db").is_file()


SIGTERM_SCRIPT = """
import logging, sys, time
from pathlib import Path
from apscheduler.triggers.interval import IntervalTrigger
from pipelines.schedule import ScheduleConfig, run_schedule

OUT = Path(sys.argv[1])

def slow(config_path: str) -> None:
    (OUT / "started").touch()
    time.sleep(1.5)
    (OUT / "finished").touch()

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    cfg = ScheduleConfig(config_path=OUT / "nightly.yaml", cron="0 3 * * *",
                         jobstore_url=f"sqlite:///{OUT / 'scheduler.db'}", run_now=True)
    run_schedule(cfg, job=slow, trigger=IntervalTrigger(hours=1))
"""


@pytest.mark.parametrize("signals", [1, 3], ids=["one-sigterm", "three-sigterms-at-once"])
def test_sigterm_waits_for_the_running_job_then_exits_cleanly(tmp_path: Path, signals: int) -> None:
    script = tmp_path / "scheduler_main.py"
    script.write_text(textwrap.dedent(SIGTERM_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: (tmp_path / "started").exists() or proc.poll() is not None, timeout_s=20)
        assert proc.poll() is None, proc.communicate()
        for i in range(signals):  # e.g. `timeout` and a process manager both forwarding the signal
            if i:
                time.sleep(0.05)  # signals of one kind sent together merge into one
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert (tmp_path / "finished").exists(), "the running job was cut short"
    assert "SIGTERM: no new runs; waiting for a running job, if any, to finish" in err
    assert ("already stopping" in err) == (signals > 1) and "Traceback" not in err
    assert err.rstrip().endswith("scheduler stopped")
