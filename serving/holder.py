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
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from features.fitted import FittedTransform
from ranking.inference import InferenceModel

log = logging.getLogger("serving")

_MARKERS = ("metadata.json", "model_config.json")  # files that identify an artifact folder


@dataclass(frozen=True)
class LoadedModel:
    """A warmed-up model and where it came from; immutable, swapped as a whole on reload."""

    model: InferenceModel
    name: str  # registered model name (e.g. "ranker")
    version: str  # registry version, or metadata / folder name for a local artifact
    uri: str  # what was loaded (folder path or MLflow URI)
    loaded_at: float  # time.time() when it became current, seconds since the epoch


class ModelHolder:
    """Holds the model that serves requests.

    Args:
        uri: local artifact folder or MLflow URI (``models:/ranker@champion``, ``models:/ranker/3``,
            ``runs:/<run_id>/model``).
        tracking_uri: MLflow tracking (and registry) URI for MLflow URIs; ``None`` uses MLflow's
            default (``MLFLOW_TRACKING_URI``).

    Example:
        >>> holder = ModelHolder("models:/ranker@champion", tracking_uri="sqlite:///mlflow.db")  # doctest: +SKIP
        >>> holder.load().version  # doctest: +SKIP
        '3'
    """

    def __init__(self, uri: str, tracking_uri: str | None = None) -> None:
        self.uri = uri
        self.tracking_uri = tracking_uri
        self._current: LoadedModel | None = None
        self._tmpdirs: list[Path] = []

    @property
    def current(self) -> LoadedModel | None:
        """The model serving now; ``None`` until :meth:`load` has finished."""
        return self._current

    @property
    def ready(self) -> bool:
        return self._current is not None

    def load(self) -> LoadedModel:
        """Fetch, load and warm up the model at ``self.uri``, then make it current.

        Blocking (download, disk, a first forward pass); call it from a worker thread in async code.

        Raises:
            ValueError: the URI does not point at an inference artifact.
        """
        start = time.perf_counter()
        path, registered = self._fetch()
        model = InferenceModel(path)
        if registered is not None:
            name, version = registered
        else:
            name = str(model.metadata.get("model_name") or path.name)
            version = str(model.metadata.get("model_version") or path.name)
        warm_up(model)
        loaded = LoadedModel(model=model, name=name, version=version, uri=self.uri, loaded_at=time.time())
        self._current = loaded  # the swap: one attribute store
        log.info(
            "model loaded name=%s version=%s uri=%s in %.2fs",
            name,
            version,
            self.uri,
            time.perf_counter() - start,
        )
        return loaded

    def close(self) -> None:
        """Delete downloaded copies; the current model stays usable (it is in memory)."""
        for d in self._tmpdirs:
            shutil.rmtree(d, ignore_errors=True)
        self._tmpdirs.clear()

    # ----------------------------------------------------------------------------- sources
    def _fetch(self) -> tuple[Path, tuple[str, str] | None]:
        """(local artifact folder, (registered name, version) for ``models:/`` URIs else ``None``)."""
        local = Path(self.uri)
        if "://" not in self.uri and ":/" not in self.uri:
            if not local.is_dir():
                raise ValueError(f"model uri {self.uri!r} is neither an MLflow URI nor an existing folder")
            return local, None
        import mlflow.artifacts  # heavy; only MLflow sources need it

        registered = None
        source = self.uri
        if self.uri.startswith("models:/"):
            # Resolve the registry reference ourselves, once, with this holder's store: MLflow's own
            # ``models:/`` download consults the process-wide registry URI, which may point elsewhere,
            # and resolving twice could race with an alias move.
            name, version, source = self._resolve_registered()
            registered = (name, version)
        dst = Path(tempfile.mkdtemp(prefix="ranker-model-"))
        self._tmpdirs.append(dst)
        log.info("downloading model uri=%s (%s) to %s", self.uri, source, dst)
        got = mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(dst), tracking_uri=self.tracking_uri
        )
        return find_artifact(Path(got), self.uri), registered

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


def find_artifact(root: Path, uri: str) -> Path:
    """The artifact folder at or below ``root`` (a registered model may nest it one level or more).

    Raises:
        ValueError: no folder under ``root`` holds the artifact files.
    """
    if all((root / m).is_file() for m in _MARKERS):
        return root
    hits = sorted(p.parent for p in root.rglob(_MARKERS[1]) if (p.parent / _MARKERS[0]).is_file())
    if not hits:
        raise ValueError(f"no inference artifact (metadata.json + model_config.json) found at {uri!r}")
    return min(hits, key=lambda p: len(p.parts))


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
