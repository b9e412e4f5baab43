"""Embedding tables sharded across processes: TorchRec's DistributedModelParallel as a Lightning strategy.

``TorchRecStrategy`` is Lightning's DDP strategy with one change: instead of wrapping the module in
``DistributedDataParallel`` it wraps it in TorchRec's ``DistributedModelParallel`` (DMP). DMP asks a
planner where each ``EmbeddingBagCollection`` table goes (table-wise, row-wise, column-wise or
data-parallel; all ranks agree on the plan), replaces the collection by its sharded version with
fused embedding kernels, and wraps the remaining dense layers in DDP itself. The embedding rows are
updated by a fused optimizer inside the backward pass (``embedding_optimizer``); the dense layers by
the module's own optimizer.

What the strategy adds around DMP so the rest of the training code needs no changes:

* the weights the module had before sharding (its seeded initialisation, or a restored checkpoint)
  are copied into the shards (DMP would initialise the tables afresh);
* checkpoints hold full, unsharded tensors (gathered to rank 0), so a checkpoint or an exported
  artifact from a sharded run loads anywhere, sharded or not, and resumes under any world size;
* the module's optimizer never sees the embedding tables (they have their fused optimizer).

It runs on GPUs (NCCL) and on CPU processes (gloo; fused CPU kernels support the SGD and Adagrad
families only, so ``adam`` needs CUDA). Known limit: the fused optimizer's state (e.g. row-wise
Adagrad's accumulators) is not checkpointed; a resumed run restarts it from zero.

Example (not run here: it needs several processes):
    >>> trainer = L.Trainer(strategy=TorchRecStrategy(sharding_type="table_wise"), devices=2)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.distributed._shard.sharded_tensor.api import ShardedTensor  # its package re-exports it implicitly
from torchrec import EmbeddingBagCollection
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

log = logging.getLogger("ranking.train.sharding")

EMBEDDING_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "rowwise_adagrad": RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,  # CUDA only (fbgemm's CPU kernels lack it)
}
SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise", "data_parallel")


class TorchRecStrategy(DDPStrategy):
    """Lightning DDP for the dense layers, TorchRec DMP sharding for the embedding tables.

    Args:
        sharding_type: force one sharding type for every table (one of ``SHARDING_TYPES``); ``None``
            lets TorchRec's planner choose per table from its cost model.
        embedding_optimizer: the fused optimizer of the tables, a key of ``EMBEDDING_OPTIMIZERS``.
        embedding_lr: its learning rate.
        **kwargs: passed to :class:`lightning.pytorch.strategies.DDPStrategy` (e.g.
            ``process_group_backend``).

    Raises:
        ValueError: an unknown sharding type or optimizer; ``adam`` on CPU.
    """

    strategy_name = "torchrec"

    def __init__(
        self,
        sharding_type: str | None = None,
        embedding_optimizer: str = "rowwise_adagrad",
        embedding_lr: float = 0.05,
        **kwargs: Any,
    ) -> None:
        if sharding_type is not None and sharding_type not in SHARDING_TYPES:
            raise ValueError(f"sharding_type must be one of {list(SHARDING_TYPES)} or None, got {sharding_type!r}")
        if embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            raise ValueError(
                f"embedding_optimizer must be one of {list(EMBEDDING_OPTIMIZERS)}, got {embedding_optimizer!r}"
            )
        if embedding_lr <= 0:
            raise ValueError(f"embedding_lr must be > 0, got {embedding_lr}")
        super().__init__(**kwargs)
        self.sharding_type = sharding_type
        self.embedding_optimizer = embedding_optimizer
        self.embedding_lr = embedding_lr
        self.plan_text = ""  # the sharding plan, readable; set once the model is sharded

    # ---------------------------------------------------------------------------------- wrapping
    def _setup_model(self, model: nn.Module) -> DistributedModelParallel:
        if self.embedding_optimizer == "adam" and self.root_device.type != "cuda":
            raise ValueError("embedding_optimizer 'adam' needs CUDA; on CPU use rowwise_adagrad, adagrad or sgd")
        collections = [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]
        if not collections:
            raise ValueError("TorchRecStrategy found no EmbeddingBagCollection to shard in the model")
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for ebc in collections:
            apply_optimizer_in_backward(
                EMBEDDING_OPTIMIZERS[self.embedding_optimizer], ebc.parameters(), {"lr": self.embedding_lr}
            )
        sharders = [EmbeddingBagCollectionSharder()]
        constraints = None
        if self.sharding_type is not None:
            kernel = "dense" if self.sharding_type == "data_parallel" else "fused"
            constraints = {
                table.name: ParameterConstraints(sharding_types=[self.sharding_type], compute_kernels=[kernel])
                for ebc in collections
                for table in ebc.embedding_bag_configs()
            }
        topology = Topology(world_size=self.world_size, compute_device=self.root_device.type)
        planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
        plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
        self.plan_text = str(plan)
        if self.global_rank == 0:
            log.info("embedding sharding plan:\n%s", self.plan_text)
        dmp = DistributedModelParallel(model, device=self.root_device, plan=plan, sharders=sharders)
        copy_into_shards(model, before)
        return dmp

    def _register_ddp_hooks(self) -> None:
        """DMP wraps its own DDP; Lightning's communication hooks do not apply."""

    def setup_optimizers(self, trainer: Any) -> None:
        """The module's optimizers, without the embedding tables (their fused optimizer updates them)."""
        super().setup_optimizers(trainer)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if not hasattr(p, "_in_backward_optimizers")]

    def teardown(self) -> None:
        if isinstance(self.model, DistributedModelParallel):
            self.model = self.lightning_module  # unwrap; the tables stay sharded inside it
        super().teardown()

    # ------------------------------------------------------------------------------- checkpoints
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Full tensors on rank 0 (a collective: every rank must call it, as Lightning does)."""
        module = self.lightning_module
        assert module is not None  # as Lightning's own Strategy.lightning_module_state_dict
        return full_state_dict(module, self.root_device)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Load full tensors, into the shards when the module is already sharded."""
        module = self.lightning_module
        assert module is not None
        state = checkpoint["state_dict"]
        if any(isinstance(v, ShardedTensor) for v in module.state_dict().values()):
            copy_into_shards(module, state)
        else:
            module.load_state_dict(state, strict=strict)


@torch.no_grad()
def copy_into_shards(module: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy full (unsharded) tensors into ``module``'s state: each rank fills its own shards.

    Raises:
        KeyError: ``full`` lacks an entry of the module's state.
        TypeError: a state entry is neither a tensor nor a ShardedTensor.
    """
    for key, current in module.state_dict().items():
        if key not in full:
            raise KeyError(f"full state lacks {key!r}")
        source = full[key]
        if isinstance(current, ShardedTensor):
            for shard in current.local_shards():
                (r, c), (h, w) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(source[r : r + h, c : c + w])
        elif isinstance(current, torch.Tensor):
            current.copy_(source)
        else:
            raise TypeError(f"state entry {key!r} is a {type(current).__name__}; expected a tensor or ShardedTensor")


@torch.no_grad()
def full_state_dict(module: nn.Module, device: torch.device) -> dict[str, Any]:
    """``module.state_dict()`` with every ShardedTensor gathered to a full CPU tensor on rank 0.

    A collective: all ranks call it in the same order. Ranks other than 0 get the sharded entries
    left out (they do not save checkpoints).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    out: dict[str, Any] = {}
    for key, value in module.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype, device=device) if rank == 0 else None
            value.gather(dst=0, out=full)
            if full is not None:
                out[key] = full.cpu()
        else:
            out[key] = value
    return out
