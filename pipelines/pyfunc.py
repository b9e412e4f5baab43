"""The registered model is also an MLflow pyfunc model: MLflow's own serving and Spark UDFs work with it.

``ranker train`` logs the run's model folder as an MLflow Model (an ``MLmodel`` file of the
``python_function`` flavor, with a signature and an input example) that holds the inference
artifact in ``data/artifact/``. Our server and the pipeline find the artifact inside it as before; any
MLflow client can also load it without our server::

    import mlflow
    model = mlflow.pyfunc.load_model("models:/ranker@champion")
    scores = model.predict(raw_rows)  # pandas or Polars rows, in the log's raw columns

    mlflow models serve -m models:/ranker@champion --env-manager local -p 5001
    mlflow.pyfunc.spark_udf(spark, "models:/ranker@champion", env_manager="local")

``predict`` takes raw impression rows (the columns the model's feature spec reads: user, context
and item features; a request key, when given, groups the rows of a request for expert-choice
routing) and returns one row per input row, in order: ``score_<task>`` per objective, ``score``
(the combined score, with the serving weights unless ``params`` give ``weight_<task>``) and
``quarantine_reason``, null for a scored row, else the rule of the spec the row breaks (its scores
are then NaN). The scores are :class:`pipelines.score.BatchScorer`'s, the ones ``ranker score`` and
``ranker serve`` give for the same rows.

The loader (this module) must be importable where the model is loaded: the project installed
(``pip install`` of this repository, whose pinned stack the ``requirements.txt`` beside ``MLmodel``
lists), and ``--env-manager local`` / ``env_manager="local"`` for MLflow's serving and UDFs.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl

from features.fitted import FittedTransform
from features.validate import REASON
from pipelines.score import BatchScorer, score_columns
from ranking.inference import InferenceModel

LOADER = "pipelines.pyfunc"
WEIGHT_PARAM = "weight_"  # weight_<task>: that objective's weight in the combined score
# What a fresh environment installs for the model (MLflow writes these into requirements.txt); the
# pinned CPU stack of `make setup` / deploy/Dockerfile, then this project itself.
RUNTIME = ("torch", "torchrec", "fbgemm-gpu-cpu", "polars", "pyarrow", "numpy", "pandas", "mlflow", "pydantic",
           "pyyaml", "mmoe-ranker")


def _kind_to_mlflow(kind: str) -> Any:
    from mlflow.types.schema import Array

    base = {"int": "long", "float": "double", "str": "string"}
    if kind.startswith("list["):
        return Array(base[kind.removeprefix("list[").removesuffix("]")])
    return base[kind]


def signature(fitted: FittedTransform, tasks: list[str], weights: dict[str, float],
              request_kind: str | None = None) -> Any:
    """The model's signature: the raw columns its spec reads in, the score columns out, weights as params.

    ``request_kind`` (``int``, ``str``): the type of the spec's request key, an optional input (the
    rows of a request are routed together by expert choice); None leaves it out (MLflow then drops it).
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    spec = fitted.spec
    inputs: list[ColSpec | TensorSpec] = [ColSpec(_kind_to_mlflow(kind), name)
                                          for name, kind in fitted.raw_types.items()]
    request = spec.keys.request
    if request is not None and request not in fitted.raw_types and request_kind in ("int", "str"):
        inputs.append(ColSpec(_kind_to_mlflow(request_kind), request, required=False))
    outputs: list[ColSpec | TensorSpec] = [ColSpec("float", c) for c in score_columns(tasks)]
    outputs.append(ColSpec("string", REASON, required=False))
    params = [ParamSpec(f"{WEIGHT_PARAM}{t}", "double", float(weights[t])) for t in tasks]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs), params=ParamSchema(params))


def example_rows(fitted: FittedTransform, n: int = 3, request_kind: str | None = None) -> pd.DataFrame:
    """``n`` raw candidate rows of one request made from the transform's own vocabularies (the input example)."""
    from serving.holder import synthetic_request

    user, context, candidates = synthetic_request(fitted, n)
    rows: dict[str, Any] = {**{c: [v] * n for c, v in {**user, **context}.items()}, **candidates}
    request = fitted.spec.keys.request
    if request is not None and request not in rows and request_kind in ("int", "str"):
        rows[request] = [1 if request_kind == "int" else "1"] * n
    return pd.DataFrame(rows)


def key_kind(features: str | Path | None, column: str | None) -> str | None:
    """``int`` or ``str``: the type of ``column`` in a features folder's training rows (None if unknown)."""
    if features is None or column is None or not (Path(features) / "train.parquet").is_file():
        return None
    dtype = pl.read_parquet_schema(Path(features) / "train.parquet").get(column)
    if dtype is None:
        return None
    return "int" if dtype.is_integer() else "str" if dtype == pl.String else None


def requirements() -> list[str]:
    """``package==version`` of the runtime stack as installed here (the project itself: its version)."""
    out = []
    for name in RUNTIME:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def save_pyfunc(artifact: str | Path, dst: str | Path, features: str | Path | None = None) -> Path:
    """Write an MLflow Model at ``dst`` (a new folder) that holds ``artifact`` and loads with this module.

    ``features``: the features folder the model was trained on, where the request key's type is read.

    Raises:
        ValueError: ``artifact`` is not an inference artifact.
    """
    import mlflow.pyfunc

    artifact = Path(artifact)
    model = InferenceModel(artifact)
    kind = key_kind(features, model.fitted.spec.keys.request)
    sig = signature(model.fitted, model.tasks, model.default_weights, kind)
    mlflow.pyfunc.save_model(path=str(dst), loader_module=LOADER, data_path=str(artifact), signature=sig,
                             input_example=example_rows(model.fitted, request_kind=kind),
                             pip_requirements=requirements(),
                             metadata={"inference_artifact": artifact.name})
    return Path(dst)


class RankerModel:
    """What ``mlflow.pyfunc.load_model`` wraps: raw rows in, scores out (see the module docstring)."""

    def __init__(self, artifact: str | Path) -> None:
        self.model = InferenceModel(artifact)
        self.scorer = BatchScorer(self.model)

    def get_raw_model(self) -> RankerModel:
        """Itself: ``mlflow.pyfunc.load_model(uri).get_raw_model().predict(polars_frame)`` skips MLflow's
        pandas-only input checks (ours apply)."""
        return self

    def predict(self, model_input: pd.DataFrame | pl.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One row of scores per input row; ``params`` may hold ``weight_<task>`` (the combined score's weights).

        Raises:
            ValueError: a column the model reads is missing, or a weight is bad (named).
        """
        frame = model_input if isinstance(model_input, pl.DataFrame) else pl.from_pandas(model_input)
        weights = {k.removeprefix(WEIGHT_PARAM): float(v) for k, v in (params or {}).items()
                   if k.startswith(WEIGHT_PARAM)}
        scorer = self.scorer if not weights else BatchScorer(self.model, {**self.model.default_weights, **weights})
        scored = scorer.score_all(frame)
        out = scored.select([*scorer.columns, REASON]).to_pandas()
        out[scorer.columns] = out[scorer.columns].astype(np.float32)  # null (rejected rows) -> NaN
        return out


def _load_pyfunc(data_path: str) -> RankerModel:
    """MLflow's entry point for the ``loader_module`` flavor: ``data_path`` is the artifact folder."""
    return RankerModel(data_path)
