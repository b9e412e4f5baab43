"""The ``ranker`` error boundary: every expected failure ends in one line, ``error: <what was read>: <why>``.

A command marks what it is reading with :func:`reading`; whatever escapes the command is turned into
one line by :func:`explain` (the exception families a user can cause: files, YAML, JSON, feature
spec schemas, Parquet columns, the tracking store and the registry, missing optional drivers,
corrupted artifacts) and an exit code: 2 for bad input, 1 for an unexpected error (its line says
to rerun with ``--debug``), 130 for SIGINT. ``--debug`` or ``RANKER_DEBUG=1`` lets the exception
through with its traceback instead.

Example:
    >>> try:
    ...     with reading("spec file", "s.yaml"):
    ...         json.loads("")
    ... except ValueError as e:
    ...     explain(e)
    ("spec file 's.yaml': not valid JSON: Expecting value: line 1 column 1 (char 0)", 2)
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

DEBUG_ENV = "RANKER_DEBUG"
USER_ERROR, UNEXPECTED, INTERRUPTED = 2, 1, 130
_CONTEXT = "_ranker_reading"  # attribute set on an exception by `reading`: (what, subject)


def debug_enabled() -> bool:
    """``--debug`` was given (it sets ``RANKER_DEBUG=1``, which child processes inherit) or the variable is set."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextmanager
def reading(what: str, subject: object = None) -> Iterator[None]:
    """Name what the block reads in the error line of any exception escaping it (the innermost name wins).

    Args:
        what: a noun phrase, e.g. ``"spec file"``, ``"model"``, ``"tracking store"``.
        subject: the path, URI or value read; shown quoted, and left out of the line when the
            exception's own message already names it.
    """
    try:
        yield
    except Exception as e:
        if not hasattr(e, _CONTEXT):
            setattr(e, _CONTEXT, (what, subject))
            e.add_note(f"(while reading {what}{f' {str(subject)!r}' if subject is not None else ''})")
        raise


def _loaded(module: str, name: str) -> type[BaseException] | None:
    """An exception class of ``module`` if that module is imported (else nothing can have raised it)."""
    mod = sys.modules.get(module)
    got = getattr(mod, name, None) if mod is not None else None
    return got if isinstance(got, type) and issubclass(got, BaseException) else None


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _one_line(text: str) -> str:
    return " ".join(ln.strip() for ln in str(text).splitlines() if ln.strip())


def _yaml_reason(e: BaseException) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or _first_line(str(e))
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"not valid YAML: {where}{problem}"


def _pydantic_reason(e: Any) -> str:
    first = e.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ())) or "value"
    return f"field {loc!r}: {first['msg']} (got {first.get('input')!r})"


def _os_reason(e: OSError) -> str:
    if e.filename is None or e.strerror is None:
        return _one_line(str(e)) or type(e).__name__
    other = f" -> {str(e.filename2)!r}" if e.filename2 is not None else ""
    return f"{e.strerror}: {str(e.filename)!r}{other}"


def _torch_file(e: BaseException) -> bool:
    """What ``torch.load`` raises for a truncated or overwritten file (a checkpoint, ``weights.pt``)."""
    return isinstance(e, pickle.UnpicklingError | EOFError) or (
        isinstance(e, RuntimeError) and str(e).startswith("PytorchStreamReader"))


def _why(e: BaseException) -> tuple[str, int]:
    """The reason (no context) and exit code for one exception."""
    user: list[tuple[type[BaseException] | None, Callable[[Any], str]]] = [
        (_loaded("pipelines.lock", "PipelineBusy"), str),
        (_loaded("yaml", "YAMLError"), _yaml_reason),
        (_loaded("pydantic", "ValidationError"), _pydantic_reason),
        (json.JSONDecodeError, lambda x: f"not valid JSON: {x}"),
        (_loaded("polars.exceptions", "PolarsError"), lambda x: _first_line(str(x))),
        (_loaded("pyarrow.lib", "ArrowException"), lambda x: _first_line(str(x))),
        (_loaded("mlflow.exceptions", "MlflowException"), lambda x: _first_line(getattr(x, "message", str(x)))),
        (_loaded("sqlalchemy.exc", "SQLAlchemyError"), lambda x: _first_line(str(getattr(x, "orig", None) or x))),
        (_loaded("requests", "RequestException"), lambda x: f"{type(x).__name__}: {_first_line(str(x))}"),
        (_loaded("lightning.fabric.utilities.exceptions", "MisconfigurationException"), lambda x: _one_line(str(x))),
        (ImportError, lambda x: f"a package it needs is not installed ({x}); install it into .venv"),
        (OSError, _os_reason),
        (ValueError, lambda x: _one_line(str(x))),
    ]
    for kind, reason in user:
        if kind is not None and isinstance(e, kind):
            return reason(e) or type(e).__name__, USER_ERROR
    if _torch_file(e):
        return f"truncated or corrupt file: {_first_line(str(e)) or type(e).__name__}", USER_ERROR
    rpc = _loaded("grpc", "RpcError")
    if rpc is not None and isinstance(e, rpc) and hasattr(e, "code"):
        call: Any = e  # a grpc.Call: code() and details()
        return f"{call.code().name}: {_first_line(str(call.details()))}", UNEXPECTED
    if isinstance(e, MemoryError):
        return "out of memory", UNEXPECTED
    message = _first_line(str(e))
    return (f"unexpected {type(e).__name__}{f': {message}' if message else ''} "
            f"(rerun with --debug for the traceback)"), UNEXPECTED


def explain(e: BaseException) -> tuple[str, int]:
    """``(line without 'error: ', exit code)`` for an exception that ended a command."""
    why, code = _why(e)
    what, subject = getattr(e, _CONTEXT, (None, None))
    if what is None:
        return why, code
    if subject is None:
        return f"{what}: {why}", code
    shown = str(subject)
    if isinstance(e, OSError) and e.strerror and e.filename is not None and str(e.filename) == shown:
        return f"{what} {shown!r}: {e.strerror}", code
    if shown in why:  # the message names it already: "spec file not found: 's.yaml'"
        return why, code
    return f"{what} {shown!r}: {why}", code


# ---- SIGINT ---------------------------------------------------------------------------------
_interrupted = threading.Event()  # SIGINT arrived while a command ran
_settled = threading.Event()  # the boundary has reported it (or the command ended)
_hint: Callable[[], str | None] | None = None


def on_interrupt(hint: Callable[[], str | None]) -> None:
    """Say how to continue after Ctrl-C: ``hint()`` is asked at interrupt time (None: nothing to resume)."""
    global _hint
    _hint = hint


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    """Raise ``KeyboardInterrupt``, and keep raising it until it reaches the boundary.

    Native code that polls for signals may drop the ``KeyboardInterrupt`` it gets (Polars' engine
    does when the query finishes at the same moment), which would leave the command running; so the
    first SIGINT starts a thread that sends SIGINT again every second until the boundary has it. A
    repeat that finds the interrupt already being handled (cleanup in an ``except`` or ``finally``
    block, e.g. a run being marked FAILED) returns and lets that cleanup finish.
    """
    if not _interrupted.is_set():
        _interrupted.set()
        threading.Thread(target=_redeliver, name="ranker-sigint", daemon=True).start()
    elif isinstance(sys.exc_info()[1], KeyboardInterrupt | SystemExit):
        return
    raise KeyboardInterrupt


def _redeliver() -> None:
    while not _settled.wait(1.0):
        os.kill(os.getpid(), signal.SIGINT)


def interrupt_line() -> str:
    """``interrupted`` plus the command's resume hint, if it has one now."""
    try:
        hint = _hint() if _hint is not None else None
    except Exception:  # a hint must never hide the interruption
        hint = None
    return f"interrupted; {hint}" if hint else "interrupted"


@contextmanager
def boundary(echo: Callable[[str], None], exit_with: Callable[[int], BaseException],
             passthrough: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Run a command: what escapes it becomes one ``error:`` line (``echo``) and ``raise exit_with(code)``.

    SIGINT is a ``KeyboardInterrupt`` as usual, but remembered (and re-sent until it gets here, see
    :func:`_on_sigint`): a library that turns it into ``sys.exit(1)`` (Lightning's trainer does)
    still ends in exit code 130 and the interrupt line. Other ``SystemExit``s and the exceptions of
    ``passthrough`` (the CLI framework's own exits) go through.
    """
    global _hint
    _hint = None
    _interrupted.clear()
    _settled.clear()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _on_sigint) if main else None
    try:
        yield
    except passthrough:
        raise
    except KeyboardInterrupt:
        _settle()
        echo(f"error: {interrupt_line()}")
        raise exit_with(INTERRUPTED) from None
    except SystemExit:
        if not _interrupted.is_set():
            raise
        _settle()
        echo(f"error: {interrupt_line()}")
        raise exit_with(INTERRUPTED) from None
    except Exception as e:
        if debug_enabled():
            raise
        line, code = explain(e)
        echo(f"error: {line}")
        raise exit_with(code) from None
    finally:
        _settle()
        if main and previous is not None:
            signal.signal(signal.SIGINT, previous)


def _settle() -> None:
    """Stop re-sending SIGINT; a signal already on its way is handled here, by :func:`_on_sigint`."""
    _settled.set()
    for thread in threading.enumerate():
        if thread.name == "ranker-sigint":
            thread.join()
