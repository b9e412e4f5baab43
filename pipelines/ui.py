"""The MLflow UI over the project's store: the ``mlflow server`` command line and a managed server process.

``make mlflow-ui`` runs ``python -m pipelines.ui``, which replaces itself with ``mlflow server`` on
127.0.0.1:5000 (``MLFLOW_UI_PORT`` changes the port) over the project's store (``MLFLOW_TRACKING_URI``,
else ``.mlflow/mlflow.db``). It first checks that it can serve: a port that is taken or a store that
is not there is one ``error:`` line and exit code 2, never a server that fails (or a new empty store)
after the fact. Tests use :func:`running_mlflow_server` to start the same server on a free port and
talk to its REST API.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
# The server's job runner (a supervisor plus seven huey consumers) serves GenAI features such as LLM
# judges; tracking runs and the registry need none of it, and on a small machine it doubles start time.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def server_env() -> dict[str, str]:
    """This process's environment plus :data:`SERVER_ENV`; a variable the user set wins."""
    return {**SERVER_ENV, **os.environ}


def mlflow_server_command(tracking_uri: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> list[str]:
    """The ``mlflow server`` argv serving the UI and REST API over a local sqlite store.

    New experiments created through the server put their artifacts in the ``artifacts/`` folder beside
    the database, the same place :func:`pipelines.tracking.artifact_location` gives the library; runs
    logged by the library keep their ``file://`` artifact URIs, which the server reads directly.

    Args:
        tracking_uri: ``sqlite:///path/to/mlflow.db``; a remote store already has a server of its own.
        host: interface to bind; the default accepts connections from this machine only.
        port: TCP port; 0 is refused here (see :func:`running_mlflow_server`, which picks a free one).

    Returns:
        The argument vector, starting with the ``mlflow`` executable of this interpreter's environment.

    Example:
        >>> mlflow_server_command("sqlite:////tmp/s/mlflow.db", port=5001)[-6:]
        ['--host', '127.0.0.1', '--port', '5001', '--workers', '1']
    """
    from pipelines.tracking import artifact_location

    _local_store(tracking_uri)
    artifacts = artifact_location(tracking_uri)
    if artifacts is None:  # a local sqlite store always has one; this keeps the type honest
        raise ValueError(f"no artifact folder for the store {tracking_uri!r}")
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    return [
        _mlflow_executable(), "server",
        "--backend-store-uri", tracking_uri,
        "--default-artifact-root", artifacts,
        "--host", host,
        "--port", str(port),
        "--workers", "1",  # one process starts in seconds and is plenty for one person's browser
    ]


def _local_store(tracking_uri: str) -> Path:
    """The database file of a local sqlite store; any other URI is an error (a remote server has its own UI)."""
    db = sqlite_path(tracking_uri)
    if db is None:
        raise ValueError(
            f"mlflow-ui serves a local sqlite store (sqlite:///path/to/mlflow.db), got {tracking_uri!r}; "
            "open a remote tracking server's own URL instead"
        )
    return db


def _mlflow_executable() -> str:
    """``mlflow`` beside this interpreter (the venv's), else whichever is on ``PATH``."""
    beside = Path(sys.executable).parent / "mlflow"
    if beside.is_file():
        return str(beside)
    found = shutil.which("mlflow")
    if found is None:
        raise RuntimeError("the mlflow executable is not installed (pip install mlflow)")
    return found


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port nobody listens on right now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_bindable(host: str, port: int, name: str) -> None:
    """Refuse, before anything starts, a port that this machine cannot bind now (taken, privileged, bad host).

    Binds and closes a socket with ``SO_REUSEADDR``, as servers do, so a port left in TIME_WAIT passes
    and a port another process listens on fails. Port 0 (any free port) always passes.

    Raises:
        ValueError: naming ``name`` (the option or variable that set the port), the address and why.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"{name} must be a port in 0..65535, got {port}")
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ValueError(f"{name}: cannot bind host {host!r}: {e.strerror}") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise ValueError(f"{name} {port}: cannot bind {host}:{port}: {e.strerror or e}") from None


STORE_DIR = ".mlflow"  # pipelines.tracking.DEFAULT_DIR, without importing MLflow (seconds) to read it


def project_store_uri() -> str:
    """The store commands use by default (``MLFLOW_TRACKING_URI``, else ``.mlflow/mlflow.db``), creating nothing."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(STORE_DIR).resolve() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") and uri != "sqlite:///" else None


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@contextmanager
def running_mlflow_server(
    tracking_uri: str, host: str = DEFAULT_HOST, port: int = 0, timeout_s: float = 60
) -> Iterator[str]:
    """Run ``mlflow server`` over ``tracking_uri`` as a child process for the duration of the block.

    Args:
        tracking_uri: ``sqlite:///path/to/mlflow.db``.
        host: interface to bind.
        port: TCP port; 0 picks a free one.
        timeout_s: how long to wait for ``GET /health`` to answer 200 before giving up.

    Yields:
        The server's base URL, e.g. ``http://127.0.0.1:5000``.

    Raises:
        RuntimeError: the server exited or did not become healthy in time (its output is in the message).
    """
    port = port or free_port(host)
    cmd = mlflow_server_command(tracking_uri, host, port)
    url = f"http://{host}:{port}"
    with tempfile.TemporaryFile() as output:
        # Its own process group, so that stopping it stops the uvicorn processes it spawns too.
        proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, env=server_env(),
                                start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while not _healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    output.seek(0)
                    tail = output.read().decode(errors="replace")[-4000:]
                    state = f"exited with {proc.returncode}" if proc.returncode is not None else (
                        f"not healthy after {timeout_s:g}s")
                    raise RuntimeError(f"mlflow server at {url} {state}:\n{tail}")
                time.sleep(0.25)
            yield url
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 10) -> None:
    """SIGTERM the server's process group (the CLI and its uvicorn child), SIGKILL what outlives ``grace_s``."""
    _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, or the group never looks empty
        if not _signal_group(proc.pid, 0):
            break
        time.sleep(0.1)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the process group; False when no process of it is left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def ui_command() -> tuple[list[str], str]:
    """``(mlflow server argv, note)`` for ``make mlflow-ui``, once it is clear that it can serve.

    Raises:
        ValueError: ``MLFLOW_UI_PORT`` is no port or is taken, the store is remote, its folder is missing
            (a typo, or nothing has run yet), or ``mlflow`` is not installed.
    """
    raw = os.environ.get("MLFLOW_UI_PORT", str(DEFAULT_PORT))
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"MLFLOW_UI_PORT must be a port number, got {raw!r}") from None
    if port == 0:
        raise ValueError("MLFLOW_UI_PORT must be a port in 1..65535 (a browser needs to know it), got 0")
    uri = project_store_uri()
    db = _local_store(uri)
    if not db.parent.is_dir():
        raise ValueError(f"MLflow store {uri!r}: no such folder {str(db.parent)!r}; `make demo` or `ranker train` "
                         "creates the project's store (or set MLFLOW_TRACKING_URI to an existing one)")
    check_bindable(DEFAULT_HOST, port, "MLFLOW_UI_PORT")
    try:
        cmd = mlflow_server_command(uri, port=port)
    except RuntimeError as e:  # the mlflow executable is missing
        raise ValueError(str(e)) from None
    empty = " (no runs yet: a new, empty store)" if not db.is_file() else ""
    # MLflow 3's UI opens an experiment in its GenAI layout unless the link asks for model training
    return cmd, (f"MLflow UI: http://{DEFAULT_HOST}:{port}/#/experiments?workflowType=machine_learning  "
                 f"(store {uri}){empty}")


def main() -> None:
    """``make mlflow-ui``: become ``mlflow server`` over the project's store (Ctrl-C stops it).

    A reason it cannot serve is one ``error:`` line on stderr and exit code 2.
    """
    try:
        cmd, note = ui_command()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    print(note, flush=True)
    os.execve(cmd[0], cmd, server_env())


if __name__ == "__main__":
    main()
