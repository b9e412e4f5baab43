"""Multi-gate Mixture-of-Experts (Ma et al., KDD 2018) as a ranking model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from ranking.blocks import MLP, Expert, Gate, PositionBiasTower, Tower
from ranking.config import ModelConfig


@dataclass
class ModelOutput:
    """Per-task logits (B,) and what auxiliary losses and gate health need."""

    logits: dict[str, torch.Tensor]
    gates: torch.Tensor  # (B, T, E) softmax weights per task


class MMoE(nn.Module):
    """TorchRec embeddings -> shared bottom -> E experts, one gate per task -> one tower per task.

    Args:
        config: the model config (tables, dense inputs, tasks, widths).

    Returns (from ``forward``): :class:`ModelOutput` with logits per task, each (B,), and gate
    weights (B, T, E).

    Example:
        >>> from ranking.config import SparseSlot, TaskHead
        >>> cfg = ModelConfig(sparse=(SparseSlot("user", 10, 4),), dense=("x",),
        ...                   tasks=(TaskHead("click", "binary", "engagement"),), bottom_dims=(8,),
        ...                   expert_dims=(8,), tower_dims=(4,), num_experts=2)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user"], torch.tensor([1, 2]), torch.tensor([1, 1]))
        >>> MMoE(cfg)(kjt, torch.zeros(2, 1)).logits["click"].shape
        torch.Size([2])
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.task_names = [t.name for t in config.tasks]
        self.embeddings = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=f"t_{s.name}",
                    embedding_dim=s.embedding_dim,
                    num_embeddings=s.num_embeddings,
                    feature_names=[s.name],
                    pooling=PoolingType.MEAN if s.pooling == "mean" else PoolingType.SUM,
                )
                for s in config.sparse
            ],
            device=torch.device("cpu"),
        )
        in_dim = sum(s.embedding_dim for s in config.sparse) + len(config.dense)
        self.bottom = MLP(in_dim, config.bottom_dims, config.dropout)
        d = self.bottom.out_dim
        self.experts = nn.ModuleList(
            Expert(d, config.expert_dims, config.dropout) for _ in range(config.num_experts)
        )
        self.gates = nn.ModuleDict({t: Gate(d, config.num_experts) for t in self.task_names})
        self.towers = nn.ModuleDict(
            {t: Tower(config.expert_dims[-1], config.tower_dims, config.dropout) for t in self.task_names}
        )
        self.engagement = [t.name for t in config.tasks if t.group == "engagement"]
        self.position_tower = (
            PositionBiasTower(config.position_buckets, config.position_dropout)
            if config.position_buckets > 0
            else None
        )

    def forward(
        self, sparse: KeyedJaggedTensor, dense: torch.Tensor, position: torch.Tensor | None = None
    ) -> ModelOutput:
        emb = self.embeddings(sparse).values()  # (B, sum of embedding dims)
        shared = self.bottom(torch.cat([emb, dense], dim=1))  # (B, D)
        experts = torch.stack([e(shared) for e in self.experts], dim=1)  # (B, E, De)
        gates = torch.stack([self.gates[t](shared) for t in self.task_names], dim=1)  # (B, T, E)
        mixed = torch.einsum("bte,bed->btd", gates.to(experts.dtype), experts)  # (B, T, De)
        logits = {t: self.towers[t](mixed[:, i]) for i, t in enumerate(self.task_names)}
        # Serving passes no position: the bias tower then drops out of the prediction entirely.
        if position is not None and self.position_tower is not None:
            bias = self.position_tower(position)  # (B,)
            logits = {t: (x + bias if t in self.engagement else x) for t, x in logits.items()}
        return ModelOutput(logits=logits, gates=gates)
