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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from features.fitted import FittedTransform
from ranking.config import ModelConfig
from ranking.mmoe import MMoE
from ranking.models import PLE, OMoE, RankingModel, SharedBottom, SingleTask

ARTIFACT_FORMAT = 1
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


def load_artifact(path: str | Path) -> tuple[RankingModel, ModelConfig, FittedTransform, dict[str, Any]]:
    """Rebuild (network in eval mode, config, fitted transform, metadata) from an artifact folder.

    Raises:
        ValueError: a file is missing, the format is unknown or the weights do not match the config.
    """
    path = Path(path)
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise ValueError(f"not an inference artifact: {str(path)!r} lacks {missing}")
    meta = json.loads((path / "metadata.json").read_text())
    if meta.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"unsupported artifact format {meta.get('format')!r} in {str(path)!r}")
    config = ModelConfig.from_dict(json.loads((path / "model_config.json").read_text()))
    fitted = FittedTransform.load(path / "transform.json")
    model = build_model(config)
    state = torch.load(path / "weights.pt", map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"weights in {str(path)!r} do not match model_config.json: {e}") from None
    model.eval()
    return model, config, fitted, meta
