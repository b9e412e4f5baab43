"""A throwaway PostgreSQL cluster and an MLflow tracking server on it, for tests.

:func:`postgres_cluster` runs ``initdb`` (trust authentication, TCP on 127.0.0.1 only) in a temp
folder, starts it with ``pg_ctl start -w`` on a free port, creates a database and yields a
:class:`PostgresCluster`; afterwards it stops the cluster and removes the folder. PostgreSQL refuses
to run as root, so under root its commands run as the ``postgres`` system user, who owns the folder.
When PostgreSQL is missing or cannot start it raises :class:`PostgresUnavailable`, whose message
says why and how to get it; a test turns that into a skip.

:func:`mlflow_server` starts ``mlflow server`` over such a database, serving artifacts itself
(``mlflow-artifacts:/``, stored in a local folder), and yields its URL once ``/health`` answers.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from pipelines.tracking import with_postgres_driver
from pipelines.ui import free_port, server_env

HOST = "127.0.0.1"
INSTALL_HINT = "apt-get install postgresql (Debian/Ubuntu), or put initdb and pg_ctl on PATH"
SYSTEM_USER = "postgres"  # Debian's package makes it; PostgreSQL will not run as root
# A test cluster keeps nothing: without durability (and initdb --no-sync) every commit is much faster.
FAST = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL is not installed here, or a cluster could not be made or started (the message says which)."""


@dataclass(frozen=True)
class PostgresCluster:
    """A running throwaway cluster: a superuser ``user`` that needs no password on ``host:port``."""

    host: str
    port: int
    user: str
    database: str  # the database made at start

    def uri(self, database: str | None = None) -> str:
        """The SQLAlchemy URI of ``database`` (default: the one made at start).

        Example: ``postgresql://mlflow@127.0.0.1:5433/mlflow``.
        """
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database or self.database}"

    def connect(self, database: str | None = None) -> Any:
        """A psycopg2 connection to ``database``, in autocommit mode (a read sees what the server committed)."""
        import psycopg2

        conn = psycopg2.connect(host=self.host, port=self.port, user=self.user, dbname=database or self.database)
        conn.autocommit = True
        return conn

    def create_database(self, name: str) -> str:
        """Create database ``name`` (letters, digits, underscores); its URI."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"database name must be lower-case letters, digits and '_', got {name!r}")
        conn = self.connect("postgres")
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE {name}")
        finally:
            conn.close()
        return self.uri(name)


def find_binaries() -> tuple[Path, Path] | None:
    """``(initdb, pg_ctl)`` from ``PATH``, else from the newest ``/usr/lib/postgresql/<major>/bin`` (Debian's place)."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(initdb), Path(pg_ctl)
    found = [d for d in Path("/usr/lib/postgresql").glob("*/bin")
             if (d / "initdb").is_file() and (d / "pg_ctl").is_file()]
    if not found:
        return None
    newest = max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else -1)
    return newest / "initdb", newest / "pg_ctl"


def _as_owner() -> dict[str, Any]:
    """``subprocess`` arguments that run a command as the ``postgres`` user when we are root; else none."""
    if os.geteuid() != 0:
        return {}
    try:
        owner = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root and there is no {SYSTEM_USER!r} user to run PostgreSQL as (it refuses root); "
            "Debian's package makes one (apt-get install postgresql)") from None
    return {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}


def _run(cmd: list[str], what: str, cwd: Path, timeout_s: float = 120) -> None:
    """Run one PostgreSQL command as the cluster's owner; a failure is :class:`PostgresUnavailable` with its output."""
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False,
                           env={**os.environ, "LC_ALL": "C"}, **_as_owner())
    except (OSError, subprocess.SubprocessError) as e:
        raise PostgresUnavailable(f"PostgreSQL {what} could not run: {type(e).__name__}: {e}") from None
    if r.returncode != 0:
        output = (r.stdout + r.stderr).strip()[-2000:]
        raise PostgresUnavailable(f"PostgreSQL {what} failed (exit {r.returncode}): {output}")


def _log_tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace").strip()[-2000:]
    except OSError:
        return ""


@contextlib.contextmanager
def postgres_cluster(database: str = "mlflow", user: str = "mlflow", tries: int = 3) -> Iterator[PostgresCluster]:
    """A fresh PostgreSQL cluster on a free port of 127.0.0.1 with ``database`` made, for the block; removed after.

    Args:
        database: the database to create once it runs.
        user: the superuser's name (trust authentication: no password).
        tries: ports to try (another process may take the free port before PostgreSQL binds it).

    Raises:
        PostgresUnavailable: no PostgreSQL binaries, no ``postgres`` user under root, or initdb / start failed.
    """
    binaries = find_binaries()
    if binaries is None:
        raise PostgresUnavailable(
            "PostgreSQL is not installed (no initdb/pg_ctl on PATH or under /usr/lib/postgresql/*/bin); "
            + INSTALL_HINT)
    initdb, pg_ctl = binaries
    owner = _as_owner()
    root = Path(tempfile.mkdtemp(prefix="ranker-pg-"))
    data, log = root / "data", root / "postgres.log"
    started = False
    try:
        if owner:
            os.chown(root, owner["user"], owner["group"])
        _run([str(initdb), "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"],
             "initdb", root)
        port, error = 0, ""
        for _ in range(tries):
            port = free_port(HOST)
            options = f"-c listen_addresses={HOST} -p {port} -k {root} {FAST}"
            try:
                _run([str(pg_ctl), "start", "-w", "-t", "60", "-D", str(data), "-l", str(log), "-o", options],
                     "start", root)
                started = True
                break
            except PostgresUnavailable as e:
                error = f"{e}; log: {_log_tail(log)}"
        if not started:
            raise PostgresUnavailable(f"{error} ({INSTALL_HINT})")
        cluster = PostgresCluster(HOST, port, user, database)
        try:
            cluster.create_database(database)
        except ImportError:
            raise PostgresUnavailable("psycopg2 is not installed (pip install -e '.[postgres]')") from None
        yield cluster
    finally:
        if started:
            with contextlib.suppress(PostgresUnavailable):
                _run([str(pg_ctl), "stop", "-w", "-m", "immediate", "-D", str(data)], "stop", root)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, timeout_s: float = 120) -> Iterator[str]:
    """``mlflow server`` over ``backend_uri`` on a free port, serving artifacts from ``artifacts``; yields its URL.

    New experiments get ``mlflow-artifacts:/`` locations, so clients upload and download through the
    server and never see the folder. A ``postgresql://`` URI is handed over with the installed driver
    named (:func:`pipelines.tracking.with_postgres_driver`), as a team's server would be configured.
    Stopped (its whole process group) when the block ends.

    Raises:
        RuntimeError: the server exited or did not answer ``GET /health`` within ``timeout_s`` (its output
            is in the message).
    """
    port = free_port(HOST)
    url = f"http://{HOST}:{port}"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server",
           "--backend-store-uri", with_postgres_driver(backend_uri),
           "--serve-artifacts", "--artifacts-destination", str(artifacts),
           "--host", HOST, "--port", str(port), "--workers", "1"]
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, env=server_env(),
                                start_new_session=True)  # its own group: stopping it stops its uvicorn worker
        try:
            deadline = time.monotonic() + timeout_s
            while not _healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    output.seek(0)
                    state = f"exited with {proc.returncode}" if proc.returncode is not None else (
                        f"not healthy after {timeout_s:g} s")
                    raise RuntimeError(f"mlflow server at {url} {state}:\n"
                                       f"{output.read().decode(errors='replace')[-4000:]}")
                time.sleep(0.25)
            yield url
        finally:
            _stop_group(proc)


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _stop_group(proc: subprocess.Popen[bytes], grace_s: float = 10) -> None:
    """SIGTERM the process group, SIGKILL whatever outlives ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
