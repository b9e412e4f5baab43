"""The model holder: loads an inference artifact (local folder or MLflow URI), warms it up, serves it.

The servicer reads ``holder.current`` once per request and uses that snapshot throughout, so a
reload only has to build a new :class:`LoadedModel` and assign it (one attribute store, atomic):
requests in flight finish on the model they started with.

Sources:
    * a local artifact folder (``artifacts/ranker``): name and version from its ``metadata.json``
      (``model_name`` / ``model_version``), else the folder name;
    * ``models:/<name>@<alias>``: the version the alias points to (MLflow Model Registry);
    * ``models:/<name>/<version>``;
    * ``runs:/<run_id>/<path>`` or any other MLflow artifact URI: name and version from metadata.

Hot reload (:meth:`ModelHolder.poll`, :meth:`ModelHolder.run_polling`) asks what the URI points
to now and loads it when that differs from the version serving:
    * ``models:/<name>@<alias>``: the version the alias points to (one registry call per poll);
    * ``models:/<name>/latest``: the newest registered version;
    * a local folder: ``model_version`` in its ``metadata.json`` (else the folder name, which never
      changes). Rewrite the folder with ``metadata.json`` last (``export_artifact`` does) and bump
      ``model_version``: new weights under the same version are not picked up;
    * ``models:/<name>/<version>``, ``runs:/...`` and other MLflow URIs name fixed content: never
      reloaded.

A version that fails to fetch, load or warm up is logged, counted and *rejected*: the previous
model keeps serving and that version is not tried again until the URI points elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from features.fitted import FittedTransform
from ranking.artifact import download_artifact
from ranking.inference import InferenceModel

log = logging.getLogger("serving")



@dataclass(frozen=True)
class LoadedModel:
    """A warmed-up model and where it came from; immutable, swapped as a whole on reload."""

    model: InferenceModel
    name: str  # registered model name (e.g. "ranker")
    version: str  # registry version, or metadata / folder name for a local artifact
    uri: str  # what was loaded (folder path or MLflow URI)
    loaded_at: float  # time.time() when it became current, seconds since the epoch


@dataclass(frozen=True)
class ReloadEvent:
    """What a listener of :class:`ModelHolder` is told after a load attempt or a lifted rejection.

    Kinds:
        * ``"loaded"``: ``model`` is now current (initial :meth:`ModelHolder.load` or a reload);
        * ``"failed"``: ``version`` did not load; ``error`` says why; the previous model (if any)
          keeps serving;
        * ``"cleared"``: the URI points at the serving ``model`` again (e.g. the alias was moved
          back after a failed version), so the failure no longer stands; nothing was loaded.

    Example:
        >>> event = ReloadEvent("failed", "4", None, "ValueError: weights do not match", 0.2)
        >>> event.ok, event.error
        (False, 'ValueError: weights do not match')
    """

    kind: Literal["loaded", "failed", "cleared"]
    version: str  # the version loaded, rejected, or serving again; the URI when unknown
    model: LoadedModel | None  # current model for "loaded" / "cleared", None for "failed"
    error: str | None  # "<ExceptionType>: <message>" for "failed", else None
    duration_s: float  # time the attempt took (fetch + load + warm-up); 0 for "cleared"

    @property
    def ok(self) -> bool:
        """True unless the event is a failed load."""
        return self.kind != "failed"


Listener = Callable[[ReloadEvent], None]


@dataclass(frozen=True)
class _Target:
    """What ``uri`` points to: where to read the artifact from and, when known before loading, its version."""

    source: str  # local folder, or MLflow artifact URI to download
    local: bool
    registered: tuple[str, str] | None  # (name, version) from the registry for models:/ URIs
    version: str | None  # the version :meth:`ModelHolder.poll` compares with the current one


class ModelHolder:
    """Holds the model that serves requests, and swaps in a new one when its URI moves.

    Args:
        uri: local artifact folder or MLflow URI (``models:/ranker@champion``, ``models:/ranker/3``,
            ``runs:/<run_id>/model``).
        tracking_uri: MLflow tracking (and registry) URI for MLflow URIs; ``None`` uses MLflow's
            default (``MLFLOW_TRACKING_URI``).

    Attributes:
        listeners: called with a :class:`ReloadEvent` after each load attempt (and when a
            rejection is lifted), in the thread that ran it; keep them quick and thread-safe (e.g.
            Prometheus updates). An exception in a listener is logged and ignored.

    Example:
        >>> holder = ModelHolder("models:/ranker@champion", tracking_uri="sqlite:///mlflow.db")  # doctest: +SKIP
        >>> holder.load().version  # doctest: +SKIP
        '3'
        >>> holder.listeners.append(lambda e: print(e.kind, e.version))  # doctest: +SKIP
        >>> holder.poll()  # after the alias moved to 4  # doctest: +SKIP
        loaded 4
    """

    def __init__(self, uri: str, tracking_uri: str | None = None, compile: bool = False, experts_k: int = 0) -> None:
        self.uri = uri
        self.compile = compile  # compile each version ahead of time at load (InferenceModel.compile)
        self.experts_k = experts_k  # experts per row at serving; 0 = each artifact's own (InferenceModel)
        self.tracking_uri = tracking_uri
        self.listeners: list[Listener] = []
        self._current: LoadedModel | None = None
        self._tmpdirs: list[Path] = []
        self._current_tmpdir: Path | None = None  # download folder of the current model, if any
        self._lock = threading.Lock()  # one load / poll at a time
        self._rejected: str | None = None
        self._last_error: str | None = None
        self._loads_ok = 0
        self._loads_failed = 0

    @property
    def current(self) -> LoadedModel | None:
        """The model serving now; ``None`` until :meth:`load` has finished."""
        return self._current

    @property
    def ready(self) -> bool:
        return self._current is not None

    @property
    def last_error(self) -> str | None:
        """Why the newest load or poll failed (``"version 4: ValueError: ..."``); ``None`` once the
        holder serves what the URI points to again."""
        return self._last_error

    @property
    def rejected_version(self) -> str | None:
        """The version that failed to load and is not retried while the URI still points to it."""
        return self._rejected

    @property
    def loads_ok(self) -> int:
        """Successful loads (initial and reloads)."""
        return self._loads_ok

    @property
    def loads_failed(self) -> int:
        """Failed load attempts (a rejected version counts once, not once per poll)."""
        return self._loads_failed

    def load(self) -> LoadedModel:
        """Fetch, load and warm up the model at ``self.uri``, then make it current.

        Blocking (download, disk, a first forward pass); call it from a worker thread in async code.
        Always tries (even a rejected version) and raises on failure; :meth:`poll` is the forgiving one.

        Raises:
            ValueError: the URI does not point at an inference artifact.
        """
        with self._lock:
            return self._load(self._locate())

    def poll(self) -> LoadedModel | None:
        """Load what ``self.uri`` points to now if that is a new version; never raises for a bad one.

        Blocking like :meth:`load`; :meth:`run_polling` calls it in a worker thread. See the module
        docstring for what "points to now" means per kind of URI.

        Returns:
            the new current model, or ``None`` when nothing changed, the URI cannot move, the
            version was rejected before, or loading it failed (then :attr:`last_error`,
            :attr:`rejected_version` and :attr:`loads_failed` say so and the old model keeps serving).
        """
        with self._lock:
            try:
                target = self._watched()
            except Exception as e:  # registry unreachable, alias deleted, folder mid-rewrite
                self._last_error = f"cannot resolve {self.uri!r}: {type(e).__name__}: {e}"
                log.warning("model poll failed uri=%s: %s", self.uri, self._last_error)
                return None
            if target is None or target.version is None:
                return None
            current = self._current
            if current is not None and current.uri == self.uri and target.version == current.version:
                if self._rejected is not None or self._last_error is not None:
                    log.info("model uri=%s points at serving version=%s again", self.uri, current.version)
                    self._rejected = self._last_error = None
                    self._notify(ReloadEvent("cleared", current.version, current, None, 0.0))
                return None
            if target.version == self._rejected:
                return None
            self._rejected = None  # the URI moved: a new candidate gets its chance
            try:
                return self._load(target)
            except Exception:  # logged, counted and announced by _load
                self._rejected = target.version
                return None

    async def run_polling(self, interval_s: float | None, stop: asyncio.Event) -> None:
        """Every ``interval_s`` seconds run :meth:`poll` in a worker thread, until ``stop`` is set.

        The event loop keeps serving while a poll downloads and loads. An exception from a poll is
        logged and polling goes on. ``stop`` is honoured between polls (at once while waiting); a
        poll already running finishes first. Cancelling the task returns at once instead, leaving
        that poll to finish in its thread.

        Args:
            interval_s: seconds between polls; ``0`` or ``None`` turns polling off (returns at once).
            stop: set it to end polling.

        Raises:
            ValueError: ``interval_s`` is negative or not finite.

        Example:
            >>> stop = asyncio.Event()  # doctest: +SKIP
            >>> task = asyncio.create_task(holder.run_polling(30.0, stop))  # doctest: +SKIP
            >>> stop.set(); await task  # doctest: +SKIP
        """
        if not interval_s:
            log.info("model polling off uri=%s", self.uri)
            return
        if not math.isfinite(interval_s) or interval_s < 0:
            raise ValueError(f"interval_s must be a finite number >= 0 (0 or None: off), got {interval_s!r}")
        log.info("model polling every %.3gs uri=%s", interval_s, self.uri)
        while True:
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
                break
            except TimeoutError:
                pass
            try:
                await asyncio.to_thread(self.poll)
            except Exception:
                log.exception("model poll raised uri=%s; polling goes on", self.uri)
        log.info("model polling stopped uri=%s", self.uri)

    def close(self) -> None:
        """Delete downloaded copies; the current model stays usable (it is in memory)."""
        with self._lock:
            for d in self._tmpdirs:
                shutil.rmtree(d, ignore_errors=True)
            self._tmpdirs.clear()
            self._current_tmpdir = None

    # ----------------------------------------------------------------------------- loading
    def _load(self, target: _Target) -> LoadedModel:
        """Fetch, load and warm up ``target``; swap it in, or record the failure and re-raise. Holds the lock."""
        start = time.perf_counter()
        tmpdir: Path | None = None
        try:
            path, tmpdir = self._fetch(target)
            model = InferenceModel(path, compile=self.compile, experts_k=self.experts_k)
            if target.registered is not None:
                name, version = target.registered
            else:
                name = str(model.metadata.get("model_name") or path.name)
                version = str(model.metadata.get("model_version") or path.name)
            warm_up(model)
        except Exception as e:
            if tmpdir is not None:
                self._discard(tmpdir)
            self._loads_failed += 1
            label = target.version or self.uri
            error = f"{type(e).__name__}: {e}"
            self._last_error = f"version {label}: {error}"
            log.error("model load failed uri=%s version=%s: %s", self.uri, label, error, exc_info=True)
            self._notify(ReloadEvent("failed", label, None, error, time.perf_counter() - start))
            raise
        loaded = LoadedModel(model=model, name=name, version=version, uri=self.uri, loaded_at=time.time())
        previous, self._current = self._current, loaded  # the swap: one attribute store
        # the old model is in memory (snapshots in flight keep working): its download can go
        if self._current_tmpdir is not None:
            self._discard(self._current_tmpdir)
        self._current_tmpdir = tmpdir
        self._loads_ok += 1
        self._last_error = None
        took = time.perf_counter() - start
        log.info(
            "model loaded name=%s version=%s uri=%s in %.2fs (was %s)",
            name,
            version,
            self.uri,
            took,
            previous.version if previous is not None else "none",
        )
        self._notify(ReloadEvent("loaded", version, loaded, None, took))
        return loaded

    def _notify(self, event: ReloadEvent) -> None:
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                log.exception("model listener %r failed on %s event", listener, event.kind)

    def _discard(self, tmpdir: Path) -> None:
        shutil.rmtree(tmpdir, ignore_errors=True)
        if tmpdir in self._tmpdirs:
            self._tmpdirs.remove(tmpdir)

    # ----------------------------------------------------------------------------- sources
    def _is_local(self) -> bool:
        return "://" not in self.uri and ":/" not in self.uri

    def _locate(self) -> _Target:
        """What ``self.uri`` points to now (one registry lookup for ``models:/`` URIs)."""
        if self._is_local():
            if not Path(self.uri).is_dir():
                raise ValueError(f"model uri {self.uri!r} is neither an MLflow URI nor an existing folder")
            return _Target(source=self.uri, local=True, registered=None, version=None)
        if self.uri.startswith("models:/"):
            # Resolve the registry reference ourselves, once, with this holder's store: MLflow's own
            # ``models:/`` download consults the process-wide registry URI, which may point elsewhere,
            # and resolving twice could race with an alias move.
            name, version, source = self._resolve_registered()
            return _Target(source=source, local=False, registered=(name, version), version=version)
        return _Target(source=self.uri, local=False, registered=None, version=None)

    def _watched(self) -> _Target | None:
        """:meth:`_locate` with the version to compare, or ``None`` for a URI that names fixed content."""
        if self._is_local():
            target = self._locate()
            meta = json.loads((Path(self.uri) / "metadata.json").read_text())
            version = str(meta.get("model_version") or Path(self.uri).name)
            return _Target(source=target.source, local=True, registered=None, version=version)
        ref = self.uri.removeprefix("models:/").strip("/")
        if self.uri.startswith("models:/") and ("@" in ref or ref.endswith("/latest")):
            return self._locate()
        return None

    def _fetch(self, target: _Target) -> tuple[Path, Path | None]:
        """(local artifact folder, the temporary download folder holding it or ``None`` for a local source)."""
        if target.local:
            return Path(target.source), None
        dst = Path(tempfile.mkdtemp(prefix="ranker-model-"))
        self._tmpdirs.append(dst)
        log.info("downloading model uri=%s (%s) to %s", self.uri, target.source, dst)
        try:
            return download_artifact(target.source, dst, self.tracking_uri, self.uri), dst
        except Exception:
            self._discard(dst)
            raise

    def _resolve_registered(self) -> tuple[str, str, str]:
        """``models:/name@alias``, ``models:/name/<version>`` or ``models:/name/latest`` → (name, version, source)."""
        import mlflow
        from mlflow.exceptions import MlflowException

        store = self.tracking_uri or mlflow.get_tracking_uri()
        client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
        ref = self.uri.removeprefix("models:/").strip("/")
        try:
            if "@" in ref:
                name, alias = ref.split("@", 1)
                version = str(client.get_model_version_by_alias(name, alias).version)
            else:
                name, _, version = ref.partition("/")
                if version == "latest":
                    found = client.search_model_versions(f"name='{name}'")
                    if not found:
                        raise ValueError(f"model uri {self.uri!r}: registered model {name!r} has no versions")
                    version = str(max(int(v.version) for v in found))
                elif not version.isdigit():
                    raise ValueError(
                        f"model uri {self.uri!r} is not models:/<name>@<alias>, models:/<name>/<version> "
                        "or models:/<name>/latest"
                    )
            source = client.get_model_version_download_uri(name, version)
        except MlflowException as e:
            raise ValueError(f"model uri {self.uri!r} does not resolve in {store}: {e.message}") from e
        return name, version, source


def synthetic_request(fitted: FittedTransform, n: int = 2) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A request of ``n`` candidates built from the transform's own vocabularies (for warm-up).

    Sparse features take known vocabulary values (cycling), dense features 0; lists hold one value.
    Returns ``(user, context, candidates)`` as ``InferenceModel.score_request`` takes them.
    """
    spec = fitted.spec
    known: dict[str, list[Any]] = {
        f.raw: fitted.vocabs[f.name].values for f in spec.sparse if f.name in fitted.vocabs and not f.cross
    }

    def values(col: str, count: int) -> list[Any]:
        kind = fitted.raw_types[col]
        pool = known.get(col) or [_EMPTY[kind.removeprefix("list[").removesuffix("]")]]
        picked = [pool[i % len(pool)] for i in range(count)]
        return [[v] for v in picked] if kind.startswith("list") else picked

    user = {c: values(c, 1)[0] for c in spec.features_from("user")}
    context = {c: values(c, 1)[0] for c in spec.features_from("context")}
    candidates = {c: values(c, n) for c in spec.features_from("item")}
    return user, context, candidates


_EMPTY: dict[str, Any] = {"int": 0, "float": 0.0, "str": ""}


def warm_up(model: InferenceModel, n: int = 2) -> None:
    """Score one synthetic request so the first real request does not pay for lazy initialisation.

    Raises:
        ValueError: the artifact cannot score its own vocabularies (a broken artifact).
    """
    user, context, candidates = synthetic_request(model.fitted, n)
    scores = model.score_request(user, context, candidates)
    model.combine(scores)
