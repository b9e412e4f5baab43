"""Multi-task ranking models: TorchRec embeddings -> shared bottom -> experts + gates -> towers.

``MMoE`` is the default; ``SingleTask``, ``SharedBottom``, ``OMoE`` and ``PLE`` share its front and
output parts (``ranking.models``); ``build_model`` picks one from a config.

Importing ``ranking`` does not import Lightning; training lives in ``ranking.train`` (``fit``), the
inference parts in ``ranking.inference``. Names load on first use, so importing a light module
(``ranking.train.config``, the command line's defaults) costs no torch import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ranking.config import GateConfig, ModelConfig, SparseSlot, TaskHead
    from ranking.mmoe import MMoE
    from ranking.models import PLE, ModelOutput, OMoE, RankingModel, SharedBottom, SingleTask

_WHERE = {
    "GateConfig": "config", "ModelConfig": "config", "SparseSlot": "config", "TaskHead": "config",
    "MMoE": "mmoe",
    "PLE": "models", "ModelOutput": "models", "OMoE": "models", "RankingModel": "models",
    "SharedBottom": "models", "SingleTask": "models",
}

__all__ = [
    "PLE",
    "GateConfig",
    "MMoE",
    "ModelConfig",
    "ModelOutput",
    "OMoE",
    "RankingModel",
    "SharedBottom",
    "SingleTask",
    "SparseSlot",
    "TaskHead",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'ranking' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ranking.{_WHERE[name]}"), name)
    globals()[name] = value  # once: later lookups skip this function
    return value
