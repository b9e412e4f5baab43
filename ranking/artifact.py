"""The inference artifact: a folder that rebuilds the scorer without Lightning and without pickle.

Layout::

    model_config.json   ModelConfig.to_dict()
    weights.pt          state_dict of the network (tensors only; loaded with weights_only=True)
    transform.json      the fitted transform (with the feature spec inside)
    metadata.json       name, tasks, default objective weights, data window, metrics, hashes
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from features.fitted import FittedTransform
from ranking.config import ModelConfig
from ranking.mmoe import MMoE
from ranking.models import PLE, OMoE, RankingModel, SharedBottom, SingleTask

ARTIFACT_FORMAT = 2  # 2 (2026-12-07): the gate's settings nested under model_config.json's "gate"
READABLE_FORMATS = (1, 2)  # format 1's flat gate fields are migrated by ModelConfig.from_dict
FILES = ("model_config.json", "weights.pt", "transform.json", "metadata.json")


def build_model(config: ModelConfig) -> RankingModel:
    """The network a config describes, chosen by ``config.model``.

    Raises:
        ValueError: ``config.model`` names no known model.

    Example:
        >>> from ranking.config import TaskHead
        >>> cfg = ModelConfig(sparse=(), dense=("x",), tasks=(TaskHead("click", "binary", "engagement"),),
        ...                   model="ple", ple_levels=1)
        >>> type(build_model(cfg)).__name__
        'PLE'
    """
    kinds: dict[str, type[RankingModel]] = {
        "single_task": SingleTask, "shared_bottom": SharedBottom, "omoe": OMoE, "mmoe": MMoE, "ple": PLE,
    }
    if config.model not in kinds:
        raise ValueError(f"unknown model {config.model!r}; known: {list(kinds)}")
    return kinds[config.model](config)


def export_artifact(
    model: torch.nn.Module,
    config: ModelConfig,
    fitted: FittedTransform,
    out: str | Path,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write the four artifact files to ``out`` and return the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, out / "weights.pt")
    (out / "model_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    fitted.save(out / "transform.json")
    meta = {
        "format": ARTIFACT_FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "tasks": [
            {"name": t.name, "type": t.type, "group": t.group, "higher_is_better": t.higher_is_better}
            for t in config.tasks
        ],
        "default_weights": {t.name: t.serving_weight for t in config.tasks},
        "transform_hash": fitted.content_hash,
        "train_window": fitted.window,
        "weights_sha256": hashlib.sha256((out / "weights.pt").read_bytes()).hexdigest(),
        **(metadata or {}),
    }
    (out / "metadata.json").write_text(json.dumps(meta, indent=2, default=str))
    return out


def resolve_artifact(path: str | Path) -> Path:
    """The artifact folder ``path`` names: itself, or the artifact inside an MLflow Model folder (an
    ``MLmodel`` file beside it: what a registered version downloads as, see ``pipelines.pyfunc``)."""
    path = Path(path)
    if (path / "MLmodel").is_file() and not all((path / m).is_file() for m in ARTIFACT_MARKERS):
        return find_artifact(path, str(path))
    return path


def load_artifact(path: str | Path) -> tuple[RankingModel, ModelConfig, FittedTransform, dict[str, Any]]:
    """Rebuild (network in eval mode, config, fitted transform, metadata) from an artifact folder
    (or an MLflow Model folder holding one: :func:`resolve_artifact`).

    Raises:
        ValueError: a file is missing, the format is unknown or the weights do not match the config.
    """
    path = resolve_artifact(path)
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise ValueError(f"not an inference artifact: {str(path)!r} lacks {missing}")
    meta = _read_json(path / "metadata.json")
    if meta.get("format") not in READABLE_FORMATS:
        raise ValueError(f"unsupported artifact format {meta.get('format')!r} in {str(path)!r}; "
                         f"this version reads {list(READABLE_FORMATS)}")
    config = ModelConfig.from_dict(_read_json(path / "model_config.json"))
    fitted = FittedTransform.load(path / "transform.json")
    model = build_model(config)
    try:
        state = torch.load(path / "weights.pt", map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # a truncated or overwritten file
        raise ValueError(f"weights file {str(path / 'weights.pt')!r} is truncated or corrupt: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"weights in {str(path)!r} do not match model_config.json: {e}") from None
    model.eval()
    return model, config, fitted, meta


ARTIFACT_MARKERS = ("metadata.json", "model_config.json")  # files that identify an artifact folder


def find_artifact(root: Path, uri: str) -> Path:
    """The artifact folder at or below ``root`` (a registered model may nest it one level or more).

    Args:
        root: a folder, e.g. where a registered model's files were downloaded.
        uri: what ``root`` was fetched from, for the error message.

    Raises:
        ValueError: no folder under ``root`` holds the artifact files.
    """
    if all((root / m).is_file() for m in ARTIFACT_MARKERS):
        return root
    hits = sorted(p.parent for p in root.rglob(ARTIFACT_MARKERS[1]) if (p.parent / ARTIFACT_MARKERS[0]).is_file())
    if not hits:
        raise ValueError(f"no inference artifact (metadata.json + model_config.json) found at {uri!r}")
    return min(hits, key=lambda p: len(p.parts))


def download_artifact(source: str, dst: Path, tracking_uri: str | None, uri: str) -> Path:
    """Download a registered model's files from MLflow into ``dst`` and return the artifact folder in them.

    The one download of a model version: the pipeline's champion and the serving holder both use it.

    Args:
        source: the version's download URI (``MlflowClient.get_model_version_download_uri``).
        dst: an empty local folder.
        tracking_uri: the MLflow store the source belongs to (None: MLflow's current one).
        uri: what the caller asked for (``models:/ranker@champion``), for error messages.

    Raises:
        ValueError: the download holds no artifact.
    """
    import mlflow.artifacts  # heavy; only MLflow sources need it

    got = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=tracking_uri)
    return find_artifact(Path(got), uri)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


_TABLE = re.compile(r"(?:^|\.)t_(?P<feature>[A-Za-z0-9_]+)\.weight$")


@torch.no_grad()
def warm_start(model: torch.nn.Module, fitted: FittedTransform, artifact: str | Path) -> dict[str, int]:
    """Initialise ``model`` (built for ``fitted``) from an earlier artifact's weights, in place.

    A new training window refits the vocabularies, so the same raw id can sit in a different
    embedding row. Embedding rows are therefore matched by raw value: row ``i`` of the new table
    of a vocabulary feature takes the old row of the same value (the out-of-vocabulary row 0 takes
    the old row 0); values the old window never saw keep their fresh initialisation. Every other
    tensor (hashed or bucketed tables, dense layers) is copied when its shape is unchanged.

    Args:
        model: the freshly built network for ``fitted``.
        fitted: the new window's fitted transform.
        artifact: folder of the earlier inference artifact (e.g. the champion's).

    Returns:
        counts: ``tensors`` copied whole, ``tables`` remapped, ``rows`` matched by value,
        ``skipped`` tensors whose shapes differ.
    """
    old_model, _, old_fitted, _ = load_artifact(artifact)
    old = old_model.state_dict()
    new = model.state_dict()
    counts = {"tensors": 0, "tables": 0, "rows": 0, "skipped": 0}
    for key, value in new.items():
        if key not in old:
            counts["skipped"] += 1
            continue
        source = old[key]
        match = _TABLE.search(key)
        feature = match.group("feature") if match else None
        if (
            feature is not None
            and feature in fitted.vocabs
            and feature in old_fitted.vocabs
            and value.dim() == 2
            and source.dim() == 2
            and source.shape[1] == value.shape[1]
        ):
            index = {v: i + 1 for i, v in enumerate(old_fitted.vocabs[feature].values)}
            rows = torch.tensor([index.get(v, -1) for v in fitted.vocabs[feature].values], dtype=torch.long)
            hit = (rows >= 0).nonzero().squeeze(1)  # (H,) new rows - 1 whose value the old table has
            value[0] = source[0]
            value[hit + 1] = source[rows[hit]].to(value.dtype)
            counts["tables"] += 1
            counts["rows"] += int(hit.numel())
        elif source.shape == value.shape:
            value.copy_(source)
            counts["tensors"] += 1
        else:
            counts["skipped"] += 1
    model.load_state_dict(new)
    return counts
