"""MLflow wiring: where the store is, which experiment, registering an inference artifact, and what runs record.

Besides params and metrics, a run records its training data as dataset inputs (each split's
Parquet files, described by their footers: rows and schema, never loaded), the machine's
load as system metrics when ``psutil`` is installed, and ends FINISHED or FAILED, never left
RUNNING by an error.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlparse

import polars as pl
from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipelines import quiet

log = logging.getLogger("pipelines.tracking")
DEFAULT_DIR = ".mlflow"
# The experiment tag the MLflow 3 UI reads for an experiment's type ("Machine learning" rather than
# "GenAI apps & agents"); the values are the UI's ExperimentKind enum (server/js, MLflow 3.17).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# MLflow 3.17's UI picks its GenAI or model-training layout from this URL parameter (else from the
# browser's last choice, GenAI at first), whatever the experiment's kind tag says.
WORKFLOW_PARAM = {"workflowType": "machine_learning"}
# A saved runs-list view of an experiment: the tag the UI's "Views" menu lists and
# ``?viewStateShareKey=<key>`` opens.
SAVED_VIEW_TAG = "mlflow.sharedViewState."
RUN_NAME_COLUMN, CREATED_COLUMN = "attributes.`Run Name`", "runDateAndNestInfo"  # the UI's ids of both
ERROR_TAG = "error"
# URI schemes (before any ``+driver``) of the database servers MLflow can keep its store in.
DATABASE_SERVERS = ("postgresql", "mysql")


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a sqlite store in the project-local ``.mlflow/``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = Path(DEFAULT_DIR).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def check_tracking_uri(uri: str) -> str:
    """Refuse the legacy file store (MLflow 3 does too, less clearly) and bare paths; the URI to open.

    That is ``uri`` itself, except that a ``postgresql://`` URI naming no driver gets the installed
    one (:func:`with_postgres_driver`), so that any process it is handed to opens it the same way.

    Raises:
        ValueError: a file store, or a PostgreSQL database with no driver installed, naming the URI.
    """
    scheme = urlparse(uri).scheme
    if scheme in ("", "file"):
        raise ValueError(
            f"tracking URI {uri!r} is a file store; use sqlite:///path/to/mlflow.db, a database "
            "(postgresql://user@host/db) or an http(s) server"
        )
    if scheme == "postgresql":
        return with_postgres_driver(uri)
    return uri


def with_postgres_driver(uri: str) -> str:
    """``postgresql://...`` as ``postgresql+psycopg2://...`` when psycopg2 is installed and psycopg 3 is not.

    SQLAlchemy 2.1 opens a driverless ``postgresql://`` with psycopg 3, while the ``postgres``
    extra (and many MLflow installs) bring psycopg2: MLflow would fail on ``No module named
    'psycopg'``. With psycopg 3 installed, or a driver named in the URI, ``uri`` is returned as is.

    Raises:
        ValueError: neither driver is installed, naming ``uri`` and how to install one.
    """
    if not uri.startswith("postgresql://") or importlib.util.find_spec("psycopg") is not None:
        return uri
    if importlib.util.find_spec("psycopg2") is None:
        raise ValueError(f"tracking store {uri!r}: no PostgreSQL driver is installed "
                         "(pip install -e '.[postgres]', or psycopg[binary])")
    return "postgresql+psycopg2://" + uri.removeprefix("postgresql://")


def artifact_location(uri: str) -> str | None:
    """For a local sqlite store, keep artifacts in an ``artifacts/`` folder beside the database."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.parent / "artifacts").resolve().as_uri()
    return None  # a tracking server decides


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, creating it with the right artifact location when new.

    The experiment is tagged as model training (:data:`EXPERIMENT_KIND_TAG`), also when it exists
    without that tag; a kind someone chose in the UI is left alone.
    """
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return str(exp.experiment_id)
    return str(client.create_experiment(name, artifact_location=artifact_location(uri),
                                        tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING}))


def runs_page(experiment_id: str, view: str | None = None) -> str:
    """The UI route (after the server's base URL) of the experiment's runs list, in the model-training layout.

    Example:
        >>> runs_page("3", view="pipeline-nightly")
        '/#/experiments/3/runs?viewStateShareKey=pipeline-nightly&workflowType=machine_learning'
    """
    query = ({"viewStateShareKey": view} if view else {}) | WORKFLOW_PARAM
    return f"/#/experiments/{experiment_id}/runs?{urlencode(query)}"


def save_runs_view(
    client: MlflowClient, experiment_id: str, key: str, name: str, columns: Sequence[str],
    widths: dict[str, int] | None = None,
) -> None:
    """Save a runs-list view on the experiment: which columns show (``tags.`x```, ``metrics.`y```), in order.

    It appears in the UI's "Views" menu as ``name``, and :func:`runs_page` with ``view=key`` opens it,
    so the runs list shows those columns, after the run name and start time, without anyone picking
    them from hundreds. ``widths`` are in pixels by column id (the UI applies widths only to the
    columns a view orders, so every column is ordered).
    """
    now = int(time.time() * 1000)
    tag = SAVED_VIEW_TAG + key
    old = client.get_experiment(experiment_id).tags.get(tag)
    created = json.loads(old).get("createdAt", now) if old else now
    state = {"selectedColumns": list(columns), "columnOrder": [RUN_NAME_COLUMN, CREATED_COLUMN, *columns],
             "columnWidths": dict(widths or {}), "orderByKey": "attributes.start_time", "orderByAsc": False}
    value = json.dumps({"name": name, "createdAt": created, "updatedAt": now, "state": json.dumps(state)})
    if value != old:
        client.set_experiment_tag(experiment_id, tag, value)


class ParquetSplit(MetaDataset):
    """One split's Parquet files as an MLflow dataset: source path, schema and row count from the footers.

    The data itself is never read (a KuaiRand split is gigabytes); the digest changes when the files do.
    """

    def __init__(self, files: Sequence[Path], name: str, source: str | Path, salt: str = "") -> None:
        if not files:
            raise ValueError(f"dataset {name!r}: no Parquet files")
        from mlflow.data.polars_dataset import infer_schema

        scan = pl.scan_parquet([str(f) for f in files])
        self.rows = int(scan.select(pl.len()).collect().item())
        schema = infer_schema(pl.DataFrame(schema=scan.collect_schema()))
        stamp = [salt, self.rows, *((f.name, f.stat().st_size) for f in files)]
        digest = hashlib.sha256(json.dumps(stamp, default=str).encode()).hexdigest()[:16]
        with warnings.catch_warnings():
            # MLflow registers its local-file source twice (for "" and "file:" URIs), then warns
            # that a path matches both; they are the same kind of source.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple")
            resolved = resolve_dataset_source(str(source))
        super().__init__(resolved, name=name, digest=digest, schema=schema)

    @property
    def profile(self) -> dict[str, int]:
        return {"num_rows": self.rows}

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self.profile)}


def log_datasets(client: MlflowClient, run_id: str, splits: dict[str, ParquetSplit]) -> None:
    """Record ``{context: dataset}`` as the run's dataset inputs (the context says which split)."""
    client.log_inputs(run_id, datasets=[
        DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        for context, ds in splits.items()])


def feature_splits(features: Path, dataset: str, transform_hash: str) -> dict[str, ParquetSplit]:
    """The model-ready splits of a ``ranker features build`` folder: ``{"train": ..., "val": ..., "test": ...}``."""
    out = {}
    for split in ("train", "val", "test"):
        path = Path(features) / f"{split}.parquet"
        if path.is_file():
            out[split] = ParquetSplit([path], f"{dataset}-{split}", path.resolve(), salt=transform_hash)
    return out


def system_metrics(run_id: str, uri: str, resume: bool = False) -> Any | None:
    """Start MLflow's system metrics monitor (CPU, memory, disk, network; GPU with pynvml) on ``run_id``.

    On when ``psutil`` is importable, unless ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` says false;
    None otherwise. The caller calls ``finish()`` before the run ends.
    """
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING as ENABLED

    if importlib.util.find_spec("psutil") is None or (ENABLED.defined and not ENABLED.get()):
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, resume_logging=resume, tracking_uri=uri)
    monitor.start()
    return monitor


def close_failed(
    client: MlflowClient, run_id: str, error: BaseException, tag: str = ERROR_TAG, tags: dict[str, str] | None = None
) -> None:
    """End ``run_id`` as FAILED with ``error`` in ``tag`` (and ``tags``); a store that fails now too is logged.

    The caller re-raises the original error, which this never hides.
    """
    try:
        for key, value in {**(tags or {}), tag: f"{type(error).__name__}: {error}"[:5000]}.items():
            client.set_tag(run_id, key, value)
        client.set_terminated(run_id, "FAILED")
    except Exception as e:  # the store may be why the run failed
        log.warning("could not mark MLflow run %s as failed: %s: %s", run_id, type(e).__name__, e)


def reopen(client: MlflowClient, run_id: str, tag: str = ERROR_TAG) -> None:
    """A run continued after a failure: RUNNING again, without the earlier attempt's error tag."""
    client.update_run(run_id, status="RUNNING")
    if tag in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, tag)


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


def check_reachable(uri: str, timeout_s: float = 5.0) -> str:
    """Fail fast, before any work, when the tracking store cannot be used.

    An ``http(s)`` server must answer ``GET /health``; a sqlite store's folder is created if
    missing and the store is opened once. A database server (``postgresql://``, ``mysql://``) is
    first connected to once within ``timeout_s`` (MLflow itself retries a refused connection ten
    times, for over a minute and a half), then opened like sqlite: MLflow creates or migrates its
    tables there on first use.

    Raises:
        ValueError: a file store, an unreachable server or an unusable database, naming the URI.
    """
    import requests

    given, uri = uri, check_tracking_uri(uri)  # messages name the URI as given
    quiet.quiet_store()  # opening a new sqlite store otherwise announces its tables in two INFO lines
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            r = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
        except requests.RequestException as e:
            raise ValueError(f"MLflow tracking server {given!r} is unreachable: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise ValueError(f"MLflow tracking server {given!r} answered /health with HTTP {r.status_code}")
        return uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if scheme.split("+", 1)[0] in DATABASE_SERVERS and (why := _connect_error(uri, timeout_s)):
        raise ValueError(f"MLflow tracking store {given!r} cannot be opened: {why}")
    try:
        MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments(max_results=1)
    except Exception as e:  # any failure here means the store is unusable
        raise ValueError(f"MLflow tracking store {given!r} cannot be opened: {type(e).__name__}: {e}") from None
    return uri


def _connect_error(uri: str, timeout_s: float) -> str | None:
    """Why one connection to the database server of ``uri`` fails within ``timeout_s``; None when it opens.

    The reason is the driver's own first line, after its type (``psycopg2.OperationalError: ...``):
    a missing driver, a server that refuses or does not answer, a wrong login or database.
    """
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    try:
        engine = sqlalchemy.create_engine(uri, poolclass=NullPool,
                                          connect_args={"connect_timeout": max(1, math.ceil(timeout_s))})
        with engine.connect():
            pass
        engine.dispose()
    except Exception as e:  # ImportError (no driver), the driver's OperationalError, a malformed URI
        cause = getattr(e, "orig", None) or e  # the driver's error, without SQLAlchemy's "Background on" line
        kind = type(cause).__name__ if type(cause).__module__ == "builtins" else (
            f"{type(cause).__module__}.{type(cause).__name__}")  # which driver said it
        return f"{kind}: {(str(cause).strip().splitlines() or [''])[0]}"
    return None
