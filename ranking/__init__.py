"""Multi-task ranking models: TorchRec embeddings -> shared bottom -> experts + gates -> towers.

``MMoE`` is the default; ``SingleTask``, ``SharedBottom``, ``OMoE`` and ``PLE`` share its front and
output parts (``ranking.models``); ``build_model`` picks one from a config.

Importing ``ranking`` does not import Lightning; training lives in ``ranking.train`` (``fit``), the
inference parts in ``ranking.inference``.
"""

from ranking.config import GateConfig, ModelConfig, SparseSlot, TaskHead
from ranking.mmoe import MMoE
from ranking.models import PLE, ModelOutput, OMoE, RankingModel, SharedBottom, SingleTask

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
