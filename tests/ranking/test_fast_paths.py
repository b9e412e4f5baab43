"""The forward fast paths equal the general paths they replace: values, gradients and state_dict layout."""

from __future__ import annotations

import pytest
import torch
from torchrec import KeyedJaggedTensor

from ranking.artifact import build_model
from ranking.blocks import MLP, Experts, run_stacked
from ranking.config import GateConfig, ModelConfig, SparseSlot, TaskHead
from ranking.gating import mix_experts, mix_per_task
from ranking.mmoe import MMoE

B = 6
TASKS = (TaskHead("click", "binary", "engagement"), TaskHead("like", "binary", "satisfaction"))


def config(**overrides: object) -> ModelConfig:
    sparse = (SparseSlot("user", 7, 3), SparseSlot("item", 5, 3, pooling="mean"), SparseSlot("city", 4, 3))
    base = {"sparse": sparse, "dense": ("x", "y"), "tasks": TASKS, "bottom_dims": (), "expert_dims": (8, 4),
            "tower_dims": (4,), "num_experts": 3}
    return ModelConfig(**(base | overrides))  # type: ignore[arg-type]


def single_ids(seed: int = 0) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.randint(0, n, (B,), generator=g) for n in (7, 5, 4)])  # (F * B,), key-major
    return KeyedJaggedTensor(keys=["user", "item", "city"], values=values, lengths=torch.ones(3 * B, dtype=torch.int64))


def test_run_stacked_equals_each_mlp_with_gradients() -> None:
    torch.manual_seed(0)
    mlps = [MLP(5, (6, 3)) for _ in range(4)]
    x = torch.randn(B, 5)
    fast = run_stacked(mlps, x)  # (B, N, 3)
    slow = torch.stack([m(x) for m in mlps], dim=1)
    torch.testing.assert_close(fast, slow)
    g_fast = torch.autograd.grad(fast.square().sum(), [p for m in mlps for p in m.parameters()])
    g_slow = torch.autograd.grad(slow.square().sum(), [p for m in mlps for p in m.parameters()])
    for a, b in zip(g_fast, g_slow, strict=True):
        torch.testing.assert_close(a, b)


def test_experts_keep_their_keys_and_dropout_acts_in_training_only() -> None:
    experts = Experts(5, (6, 3), num_experts=2, dropout=0.5)
    assert {"0.0.weight", "0.3.weight", "1.3.bias"} <= set(experts.state_dict())  # Linear, ReLU, Dropout, Linear
    x = torch.randn(64, 5)
    experts.eval()
    torch.testing.assert_close(experts(x), torch.stack([e(x) for e in experts], dim=1))
    experts.train()
    assert not torch.equal(experts(x), experts(x))


def test_single_id_lookup_equals_the_embedding_bag_collection() -> None:
    torch.manual_seed(0)
    model = build_model(config())
    kjt = single_ids()
    fast = model.lookup_single(kjt)
    assert fast is not None
    slow = model.lookup_pooled(kjt)
    torch.testing.assert_close(fast, slow)
    weights = list(model.embeddings.parameters())
    for a, b in zip(torch.autograd.grad(fast.square().sum(), weights),
                    torch.autograd.grad(slow.square().sum(), weights), strict=True):
        torch.testing.assert_close(a, b)


def test_lookup_falls_back_when_a_row_has_not_exactly_one_id() -> None:
    model = build_model(config())
    lengths = torch.ones(3 * B, dtype=torch.int64)
    lengths[0], lengths[1] = 0, 2  # same total, but row 0 has no user and row 1 two
    kjt = KeyedJaggedTensor(keys=["user", "item", "city"], values=single_ids().values(), lengths=lengths)
    assert model.lookup_single(kjt) is None
    out = model(kjt, torch.zeros(B, 2))
    assert out.logits["click"].shape == (B,)


def test_an_id_outside_its_table_is_not_read_from_the_next_one() -> None:
    model = build_model(config())
    values = single_ids().values().clone()
    values[0] = 7  # user table has rows 0..6; row 7 of the stacked tables is item's row 0
    kjt = KeyedJaggedTensor(keys=["user", "item", "city"], values=values, lengths=torch.ones(3 * B, dtype=torch.int64))
    assert model.lookup_single(kjt) is None


def test_no_single_id_path_for_multi_valued_or_mixed_width_tables() -> None:
    multi = config(sparse=(SparseSlot("user", 7, 3), SparseSlot("tags", 5, 3, multi=True, max_len=2)))
    mixed = config(sparse=(SparseSlot("user", 7, 3), SparseSlot("item", 5, 2)))
    assert build_model(multi).single_rows is None and build_model(mixed).single_rows is None
    assert not {"single_rows", "single_sizes"} & set(build_model(config()).state_dict())


@pytest.mark.parametrize("training", [False, True])
def test_mmoe_dense_gates_equal_each_gate(training: bool) -> None:
    torch.manual_seed(0)
    model = MMoE(config()).train(training)
    x = torch.randn(B, model.width)
    assert model.gates.plain
    fast = model.gates(x)  # (B, T, E), one matmul
    slow = torch.stack([g(x) for g in model.gates.values()], dim=1)  # (B, T, E), each gate's own forward
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(model.gates.dense(x), slow)


def test_mmoe_gates_with_noise_top_k_or_training_dropout_take_the_gate_path() -> None:
    noisy = MMoE(config(gate=GateConfig("noisy_topk", top_k=2)))
    dropping = MMoE(config(gate=GateConfig(dropout=0.2)))
    x = torch.randn(B, noisy.width)
    assert not noisy.gates.plain
    assert not dropping.train().gates.plain and dropping.eval().gates.plain
    torch.manual_seed(1)
    got = noisy.train().gates(x)  # the gate path: noise and top-k, k non-zero weights per row
    torch.manual_seed(1)
    want = torch.stack([g(x) for g in noisy.gates.values()], dim=1)
    torch.testing.assert_close(got, want)
    assert (got > 0).sum(-1).eq(2).all()


def test_mix_per_task_equals_mix_experts() -> None:
    w, x = torch.softmax(torch.randn(B, 3, 4), dim=-1), torch.randn(B, 4, 5)
    torch.testing.assert_close(mix_per_task(w, x), mix_experts(w, x))


def test_single_valued_batches_equal_the_per_key_path() -> None:
    """FeatureTable.batch without multi-valued features builds the same KeyedJaggedTensor as the per-key loop."""
    import polars as pl

    from ranking.batch import FeatureTable

    cfg = ModelConfig(sparse=(SparseSlot("u", 9, 2), SparseSlot("i", 9, 2), SparseSlot("c", 9, 2)), dense=(),
                      tasks=(TaskHead("click", "binary", "engagement"),))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 9, (50, 3), generator=g)
    frame = pl.DataFrame({"s_u": ids[:, 0].numpy(), "s_i": ids[:, 1].numpy(), "s_c": ids[:, 2].numpy(),
                          "y_click": torch.rand(50, generator=g).round().numpy()})
    table = FeatureTable(frame, cfg)
    assert not table.multi
    idx = torch.tensor([7, 3, 3, 41, 0])
    fast = table.batch(idx).sparse
    for j, key in enumerate(("u", "i", "c")):
        assert fast[key].values().tolist() == ids[idx, j].tolist()
        assert fast[key].lengths().tolist() == [1] * len(idx)
    assert fast.keys() == ["u", "i", "c"]
