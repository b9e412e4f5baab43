"""MLflow wiring: where the store is, which experiment, and registering an inference artifact."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

DEFAULT_DIR = ".mlflow"


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a sqlite store in the project-local ``.mlflow/``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = Path(DEFAULT_DIR).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def check_tracking_uri(uri: str) -> str:
    """Refuse the legacy file store (MLflow 3 does too, less clearly) and bare paths."""
    scheme = urlparse(uri).scheme
    if scheme in ("", "file"):
        raise ValueError(
            f"tracking URI {uri!r} is a file store; use sqlite:///path/to/mlflow.db or an http(s) server"
        )
    return uri


def artifact_location(uri: str) -> str | None:
    """For a local sqlite store, keep artifacts in an ``artifacts/`` folder beside the database."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.parent / "artifacts").resolve().as_uri()
    return None  # a tracking server decides


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, creating it with the right artifact location when new."""
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    # The kind tag makes the MLflow UI open the experiment on its runs table (MLflow 3 otherwise
    # opens a GenAI overview for experiments without it).
    return str(client.create_experiment(name, artifact_location=artifact_location(uri),
                                        tags={"mlflow.experimentKind": "custom_model_development"}))


def register_artifact(
    uri: str, run_id: str, artifact_path: str, name: str, alias: str | None, description: str = "",
    tags: dict[str, str] | None = None,
) -> ModelVersion:
    """Register ``runs:/<run_id>/<artifact_path>`` as a new version of ``name`` with ``tags``; point ``alias`` at it.

    The alias moves last, after the version and its tags exist (a reader of the alias sees them).
    """
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.create_registered_model(name, description="MMoE multi-task ranker (inference artifact)")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = client.create_model_version(name, source=source, run_id=run_id, description=description,
                                          tags=tags)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return version


def set_tracking(uri: str) -> None:
    mlflow.set_tracking_uri(check_tracking_uri(uri))


def check_reachable(uri: str, timeout_s: float = 5.0) -> str:
    """Fail fast, before any work, when the tracking store cannot be used.

    An ``http(s)`` server must answer ``GET /health``; a sqlite store's folder is created if
    missing and the store is opened once.

    Raises:
        ValueError: a file store, an unreachable server or an unusable database, naming the URI.
    """
    import requests

    uri = check_tracking_uri(uri)
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            r = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
        except requests.RequestException as e:
            raise ValueError(f"MLflow tracking server {uri!r} is unreachable: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise ValueError(f"MLflow tracking server {uri!r} answered /health with HTTP {r.status_code}")
        return uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments(max_results=1)
    except Exception as e:  # any failure here means the store is unusable
        raise ValueError(f"MLflow tracking store {uri!r} cannot be opened: {type(e).__name__}: {e}") from None
    return uri
