"""Run by tests/ranking/test_sharding.py in its own process: two gloo ranks shard a ranking model.

Each rank builds the same seeded model, shards its embedding tables with TorchRec's
DistributedModelParallel the way ``TorchRecStrategy`` does, and checks against the unsharded
copy: same forward output (weights were copied into the shards), full state gathered back equal,
and after one training step the gathered tables moved. Writes one JSON file per rank
(``rank<N>.json`` in the folder given) so the reports never interleave.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, port: int, sharding_type: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torchrec import KeyedJaggedTensor
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from ranking.artifact import build_model
    from ranking.config import ModelConfig, SparseSlot, TaskHead
    from ranking.train.sharding import copy_into_shards, full_state_dict

    cfg = ModelConfig(
        sparse=(SparseSlot("user", 50, 4), SparseSlot("item", 80, 4), SparseSlot("tags", 30, 4, "mean", True, 3)),
        dense=("x",),
        tasks=(TaskHead("click", "binary", "engagement"), TaskHead("like", "binary", "satisfaction")),
        bottom_dims=(8,),
        expert_dims=(8,),
        tower_dims=(4,),
        num_experts=2,
    )
    torch.manual_seed(0)
    plain = build_model(cfg).eval()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    apply_optimizer_in_backward(RowWiseAdagrad, model.embeddings.parameters(), {"lr": 0.5})
    sharders = [EmbeddingBagCollectionSharder()]
    constraints = {
        t.name: ParameterConstraints(sharding_types=[sharding_type], compute_kernels=["fused"])
        for t in model.embeddings.embedding_bag_configs()
    }
    planner = EmbeddingShardingPlanner(Topology(world_size=world, compute_device="cpu"), constraints=constraints)
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    copy_into_shards(model, before)

    g = torch.Generator().manual_seed(1)
    b = 6
    lengths = torch.cat([torch.ones(2 * b, dtype=torch.long), torch.randint(0, 4, (b,), generator=g)])
    values = torch.cat([torch.randint(0, 50, (b,), generator=g), torch.randint(0, 80, (b,), generator=g),
                        torch.randint(0, 30, (int(lengths[2 * b :].sum()),), generator=g)])
    kjt = KeyedJaggedTensor.from_lengths_sync(["user", "item", "tags"], values, lengths)
    dense = torch.randn(b, 1, generator=g)
    with torch.no_grad():
        same = torch.allclose(dmp(kjt, dense).logits["click"], plain(kjt, dense).logits["click"], atol=1e-6)
    gathered = full_state_dict(model, torch.device("cpu"))
    sharded = [k for k, v in model.state_dict().items() if type(v).__name__ == "ShardedTensor"]
    equal_back = rank != 0 or all(torch.equal(gathered[k], before[k]) for k in before)

    dmp.train()
    dmp(kjt, dense).logits["click"].sum().backward()  # the fused optimizer updates the tables here
    after = full_state_dict(model, torch.device("cpu"))
    moved = rank != 0 or not torch.equal(after["embeddings.embedding_bags.t_user.weight"],
                                         before["embeddings.embedding_bags.t_user.weight"])
    local = sum(len(model.state_dict()[k].local_shards()) for k in sharded)
    report = {"rank": rank, "same_forward": same, "sharded": sorted(sharded), "local_shards": local,
              "gathered_equal": equal_back, "tables_moved": moved}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(_worker, args=(2, int(sys.argv[1]), sys.argv[2], sys.argv[3]), nprocs=2)
