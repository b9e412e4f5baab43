"""One run of a pipeline at a time: an OS file lock, plus a note of who holds it.

The lock is ``flock`` (through ``filelock``), so the kernel releases it when its process dies,
however it dies: a ``kill -9`` can never leave a lock that blocks the next night. The note
beside it (``<lock>.owner``: pid, host, start time) is what the error message shows while the
lock is held, and what tells a later run that the previous holder died without cleaning up.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

log = logging.getLogger("pipelines.lock")


class PipelineBusy(RuntimeError):
    """Another process runs the same pipeline now."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive lock of one pipeline's work folder.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> with RunLock(d / "pipeline.lock") as lock:
        ...     RunLock(d / "pipeline.lock").acquire()
        Traceback (most recent call last):
        ...
        pipelines.lock.PipelineBusy: ...
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.owner_file = self.path.with_suffix(self.path.suffix + ".owner")
        self._lock = FileLock(str(self.path), timeout=0)
        self.stale_owner: dict[str, object] | None = None  # the dead holder found on acquire, if any

    def _owner(self) -> dict[str, object] | None:
        try:
            data = json.loads(self.owner_file.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`PipelineBusy` naming the holder; never waits."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            owner = self._owner() or {}
            raise PipelineBusy(
                f"pipeline lock {str(self.path)!r} is held by pid {owner.get('pid', '?')} on "
                f"{owner.get('host', '?')} since {owner.get('started', '?')}; one run at a time"
            ) from None
        previous = self._owner()
        if previous is not None:
            pid = previous.get("pid")
            same_host = previous.get("host") == socket.gethostname()
            if isinstance(pid, int) and same_host and not _alive(pid):
                self.stale_owner = previous
                log.warning("stale lock of dead pid %s (since %s) cleared", pid, previous.get("started"))
        started = datetime.now(UTC).isoformat(timespec="seconds")
        self.owner_file.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}))
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            self.owner_file.unlink(missing_ok=True)
            self._lock.release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
