"""Routing strategies (GateConfig.kind): each checked against a plain re-implementation, plus the
properties a user relies on (capacity, shared selection, batch invariance, z-loss, lowering k)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from ranking.artifact import build_model
from ranking.config import GATE_KINDS, GateConfig, ModelConfig, SparseSlot, TaskHead
from ranking.gating import (
    TaskGates,
    expert_choice_weights,
    hash_experts,
    hash_weights,
    router_z_loss,
    shared_topk_weights,
    top_p_weights,
)
from ranking.mmoe import MMoE
from ranking.train import FitConfig, MultiTaskLoss, fit, load_features

TASKS = (TaskHead("click", "binary", "engagement"), TaskHead("like", "binary", "satisfaction"))


def cfg(gate: GateConfig, **kw: object) -> ModelConfig:
    base = ModelConfig(sparse=(SparseSlot("user", 50, 4), SparseSlot("tags", 9, 3, pooling="mean", multi=True,
                                                                      max_len=2)),
                       dense=("x",), tasks=TASKS, bottom_dims=(8,), expert_dims=(6,), tower_dims=(4,),
                       num_experts=4, gate=gate)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the pure functions, by hand
def test_top_p_keeps_the_fewest_experts_reaching_p() -> None:
    torch.manual_seed(0)
    w = torch.softmax(torch.randn(200, 6) * 2, dim=-1)
    for p, lo, hi in [(0.5, 1, 6), (0.9, 2, 6), (0.99, 1, 3), (1.0, 1, 6)]:
        got = top_p_weights(w, p, lo, hi)
        for row, out in zip(w.tolist(), got.tolist(), strict=True):
            order = sorted(range(6), key=lambda e: -row[e])
            n, mass = 0, 0.0
            while n < 6 and (mass < p or n < lo):  # by hand: add the largest until p is reached
                mass += row[order[n]]
                n += 1
            n = min(n, hi)
            keep = set(order[:n])
            total = sum(row[e] for e in keep)
            want = [row[e] / total if e in keep else 0.0 for e in range(6)]
            assert out == pytest.approx(want, abs=1e-6)


def test_hash_routing_is_fixed_balanced_and_the_same_for_every_task() -> None:
    ids = torch.arange(20_000)
    experts = hash_experts(ids, 8)
    assert torch.equal(experts, hash_experts(ids.clone(), 8))  # no state, no randomness
    counts = torch.bincount(experts, minlength=8).float()
    assert counts.std() / counts.mean() < 0.05  # consecutive ids spread evenly
    assert hash_experts(torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]), 4).tolist() == [1, 0, 3, 0, 3, 2, 0, 2]
    w = hash_weights(torch.tensor([3, 3, 10]), 4, num_tasks=2)
    assert w.shape == (3, 2, 4) and torch.equal(w[:, 0], w[:, 1]) and torch.equal(w.sum(-1), torch.ones(3, 2))
    assert torch.equal(w[0], w[1])  # same id, same expert
    assert len(list(TaskGates(["a", "b"], 8, 4, GateConfig("hash")).parameters())) == 0  # no learned router


def _expert_choice_by_hand(probs: torch.Tensor, k: int, cf: float, sizes: list[int]) -> torch.Tensor:
    out = torch.zeros_like(probs)
    start = 0
    for n in sizes:
        cap = max(1, min(n, math.ceil(cf * n * k / probs.shape[-1])))
        for t in range(probs.shape[1]):
            for e in range(probs.shape[2]):
                col = probs[start:start + n, t, e].tolist()
                best = sorted(range(n), key=lambda r: (-round(col[r] * 65536), r))[:cap]
                for r in best:
                    out[start + r, t, e] = probs[start + r, t, e]
        start += n
    return out


@pytest.mark.parametrize(("k", "cf"), [(1, 1.0), (2, 1.0), (1, 0.5), (2, 2.0)])
def test_expert_choice_each_expert_takes_its_best_rows_per_group(k: int, cf: float) -> None:
    torch.manual_seed(k)
    sizes = [1, 7, 3, 12]
    probs = torch.softmax(torch.randn(sum(sizes), 2, 4), dim=-1)
    groups = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    got = expert_choice_weights(probs, k, cf, groups)
    assert torch.equal(got, _expert_choice_by_hand(probs, k, cf, sizes))
    assert torch.equal(expert_choice_weights(probs, k, cf, groups, num_groups=len(sizes)), got)
    assert torch.equal(got[0], probs[0])  # a group of one row: every expert takes it
    # one group at a time gives the same rows: a row's weights depend on its own group only
    alone = torch.cat([expert_choice_weights(probs[groups == g], k, cf) for g in range(len(sizes))])
    assert torch.equal(alone, got)


def test_expert_choice_can_leave_a_row_to_no_expert_and_passes_gradients() -> None:
    probs = torch.softmax(torch.randn(4, 1, 2), dim=-1)
    got = expert_choice_weights(probs, top_k=1, capacity_factor=1.0)  # C = 2 rows per expert
    assert ((got > 0).sum(0) == 2).all()  # each (task, expert) column keeps exactly C rows
    raw = torch.randn(10, 2, 4, requires_grad=True)
    w = expert_choice_weights(torch.softmax(raw, -1), top_k=1, capacity_factor=0.5)  # C = 2 of 10 rows
    assert (w.sum(-1) == 0).any()  # some rows were taken by no expert: their mixture is zero
    (w * torch.randn_like(w)).sum().backward()
    assert raw.grad is not None and raw.grad.abs().sum() > 0


def test_shared_topk_picks_one_subset_for_every_task_plus_their_private_experts() -> None:
    torch.manual_seed(3)
    b, t, s, p, k = 6, 3, 5, 2, 2
    task_logits, router = torch.randn(b, t, s + p, requires_grad=True), torch.randn(b, s, requires_grad=True)
    w = shared_topk_weights(task_logits, router, k, p)
    assert w.shape == (b, t, s + t * p)
    chosen = set()
    for row in range(b):
        top = set(router[row].topk(k).indices.tolist())
        for task in range(t):
            nz = set((w[row, task] > 0).nonzero().flatten().tolist())
            own = set(range(s + task * p, s + (task + 1) * p))
            assert nz == top | own  # the router's k shared experts, the same for every task, and its own
            # by hand: softmax over (task logit + router logit) of the chosen, and the task's own logits
            logits = [task_logits[row, task, e].item() + router[row, e].item() for e in sorted(top)]
            logits += [task_logits[row, task, s + j].item() for j in range(p)]
            z = sum(math.exp(x) for x in logits)
            want = [math.exp(x) / z for x in logits]
            cols = sorted(top) + sorted(own)
            assert w[row, task, cols].tolist() == pytest.approx(want, abs=1e-6)
        chosen |= top
    assert len(chosen) > k  # different rows choose different experts
    (w * torch.randn_like(w)).sum().backward()
    assert router.grad is not None and router.grad.abs().sum() > 0  # the router learns through what it chose


def test_router_z_loss_is_the_mean_squared_logsumexp() -> None:
    logits = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    want = (math.log(2) ** 2 + math.log(math.e + math.e**3) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(want, rel=1e-6)


# ------------------------------------------------------------------------------- in the model
def _batch(seed: int = 0, b: int = 32):  # type: ignore[no-untyped-def]
    from torchrec import KeyedJaggedTensor

    g = torch.Generator().manual_seed(seed)
    user = torch.randint(0, 50, (b,), generator=g)
    tag_len = torch.randint(0, 3, (b,), generator=g)
    tags = torch.randint(0, 9, (int(tag_len.sum()),), generator=g)
    kjt = KeyedJaggedTensor.from_lengths_sync(["user", "tags"], torch.cat([user, tags]),
                                              torch.cat([torch.ones(b, dtype=torch.long), tag_len]))
    return kjt, torch.randn(b, 1, generator=g), user


KINDS = [GateConfig(), GateConfig("noisy_topk", top_k=2), GateConfig("top_p", top_p=0.7), GateConfig("hash"),
         GateConfig("expert_choice", top_k=1), GateConfig("shared_topk", top_k=2, private_experts=1)]


def test_every_kind_is_covered() -> None:
    assert sorted(g.kind for g in KINDS) == sorted(GATE_KINDS)


@pytest.mark.parametrize("gate", KINDS, ids=lambda g: g.kind)
def test_each_kind_trains_and_routes_as_it_says(gate: GateConfig) -> None:
    torch.manual_seed(0)
    config = cfg(gate)
    model = build_model(config)
    assert isinstance(model, MMoE)
    sparse, dense, user = _batch()
    out = model(sparse, dense)
    e = config.total_experts
    assert out.gates is not None and out.gates.shape == (32, 2, e)
    active = (out.gates > 0).sum(-1)  # (B, T)
    if gate.kind == "hash":
        assert (active == 1).all() and torch.equal(out.gates.argmax(-1)[:, 0], hash_experts(user, 4))
    elif gate.kind == "noisy_topk":
        assert (active == 2).all()
    elif gate.kind == "shared_topk":
        assert (active == 3).all() and e == 4 + 2  # 2 shared of 4 + 1 private; 4 shared + 1 private per task
    elif gate.kind == "expert_choice":
        assert ((out.gates > 0).sum(0) == 8).all()  # C = ceil(32 * 1 / 4) rows per (task, expert)
    if gate.kind != "expert_choice":
        torch.testing.assert_close(out.gates.sum(-1), torch.ones(32, 2))
    loss_fn = MultiTaskLoss.for_model(config)
    labels = {t.name: (torch.rand(32) < 0.5).float() for t in TASKS}
    masks = {t.name: torch.ones(32, dtype=torch.bool) for t in TASKS}
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    first = loss_fn(model(sparse, dense), labels, masks).total.item()
    for _ in range(40):
        opt.zero_grad()
        loss_fn(model(sparse, dense), labels, masks).total.backward()
        opt.step()
    assert loss_fn(model(sparse, dense), labels, masks).total.item() < 0.9 * first


def test_z_loss_reaches_the_training_loss_only_when_weighted() -> None:
    sparse, dense, _ = _batch()
    labels = {t.name: torch.zeros(32) for t in TASKS}
    masks = {t.name: torch.ones(32, dtype=torch.bool) for t in TASKS}
    for kind in ("softmax", "expert_choice", "shared_topk"):
        torch.manual_seed(0)
        plain = build_model(cfg(GateConfig(kind)))  # type: ignore[arg-type]
        assert "router_z" not in plain(sparse, dense).aux
        torch.manual_seed(0)
        config = cfg(GateConfig(kind, z_loss_weight=0.1))  # type: ignore[arg-type]
        model = build_model(config)
        out = model(sparse, dense)
        assert out.aux["router_z"].item() > 0
        with_z = MultiTaskLoss.for_model(config)(out, labels, masks)
        without = MultiTaskLoss.for_model(cfg(GateConfig(kind)))(out, labels, masks)  # type: ignore[arg-type]
        assert with_z.router_z is not None
        assert with_z.total.item() == pytest.approx(without.total.item() + 0.1 * out.aux["router_z"].item(), rel=1e-5)


def test_lowering_k_at_inference() -> None:
    sparse, dense, _ = _batch(b=40)
    for gate, check in [
        (GateConfig(), lambda g: ((g > 0).sum(-1) == 1).all()),
        (GateConfig("top_p", top_p=0.99), lambda g: ((g > 0).sum(-1) <= 1).all()),
        (GateConfig("shared_topk", top_k=3), lambda g: ((g[..., :4] > 0).sum(-1) == 1).all()),
        (GateConfig("expert_choice", top_k=2), lambda g: ((g > 0).sum(0) == 10).all()),  # ceil(40 * 1 / 4)
    ]:
        model = build_model(cfg(gate)).eval()
        model.set_top_k(1)
        out = model(sparse, dense)
        assert out.gates is not None and check(out.gates), gate.kind
    with pytest.raises(ValueError, match="hash routing runs one expert per row"):
        build_model(cfg(GateConfig("hash"))).set_top_k(1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": "omoe", "gate": GateConfig("expert_choice")}, "gate.kind 'expert_choice' routes over MMoE's"),
        ({"model": "ple", "gate": GateConfig("hash")}, "gate.kind 'hash' routes over MMoE's task gates"),
        ({"gate": GateConfig("hash", hash_feature="tags")}, "gate.hash_feature must name a single-valued sparse "
                                                             "feature, one of ['user']; got 'tags'"),
        ({"gate": GateConfig("shared_topk", top_k=5)}, "gate.top_k must be <= 4 (the shared experts), got 5"),
        ({"gate": GateConfig("top_p", max_experts=5)}, "gate.max_experts must be <= 4"),
        ({"gate": GateConfig("expert_choice", top_k=5)}, "gate.top_k must be <= 4"),
        ({"model": "omoe", "gate": GateConfig(z_loss_weight=0.1)}, "gate.z_loss_weight applies to MMoE's router"),
    ],
)
def test_config_refuses_what_a_strategy_cannot_do(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as err:
        cfg(**overrides)  # type: ignore[arg-type]
    assert message in str(err.value)


def test_gate_config_refuses_bad_values() -> None:
    for kw, message in [({"top_p": 0.0}, "gate.top_p must be in (0, 1]"),
                        ({"capacity_factor": 0.0}, "gate.capacity_factor must be finite and > 0"),
                        ({"min_experts": 3, "max_experts": 2}, "gate.max_experts must be 0 or >= min_experts (3)"),
                        ({"kind": "hash", "dropout": 0.1}, "gate.dropout applies to"),
                        ({"z_loss_weight": -1.0}, "gate.z_loss_weight must be finite and >= 0")]:
        with pytest.raises(ValueError) as err:
            GateConfig(**kw)  # type: ignore[arg-type]
        assert message in str(err.value), kw


@pytest.mark.parametrize("gate", KINDS[2:], ids=lambda g: g.kind)
def test_each_new_kind_fits_on_real_batches(gate: GateConfig, small_features: Path) -> None:
    """Through ranking.train.fit (the path of ranker train): a few steps, validation, final evaluation."""
    config = ModelConfig.from_fitted(load_features(small_features), bottom_dims=(16,), expert_dims=(8,),
                                     tower_dims=(4,), num_experts=4, gate=gate)
    result = fit(small_features, config, FitConfig(epochs=1, accelerator="cpu", limit_train_batches=3))
    aucs = [v for k, v in result.metrics.items() if k.startswith("final/val/") and k.endswith("/auc")]
    assert aucs and all(0.0 <= a <= 1.0 for a in aucs)
