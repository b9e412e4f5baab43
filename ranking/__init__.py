"""MMoE ranking model: TorchRec embeddings -> shared bottom -> experts + per-task gates -> towers.

Importing ``ranking`` does not import Lightning; the training parts live in ``ranking.module`` and
``ranking.data``, the inference parts in ``ranking.inference``.
"""

from ranking.config import ModelConfig, SparseSlot, TaskHead
from ranking.mmoe import MMoE, ModelOutput

__all__ = ["MMoE", "ModelConfig", "ModelOutput", "SparseSlot", "TaskHead"]
