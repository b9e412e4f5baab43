"""Gate health: the statistics, and checks that fail on identical experts and on a collapsed gate.

The trained-model tests run a real training loop (the model, the batches, Adam) on the small
synthetic features, then ask :meth:`GateHealth.problems`. A healthy MMoE must come out clean;
constant initialisation and a gate pushed onto one expert must be caught. Routing statistics
(load, dropped rows, specialisation) are tested in test_routing_health.py.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ranking.artifact import build_model
from ranking.blocks import Experts
from ranking.config import GateConfig, ModelConfig
from ranking.gate_health import GateStats, expert_spread
from ranking.gating import Gate
from ranking.models import RankingModel
from ranking.train.data import RankingDataModule, load_features
from ranking.train.loss import task_loss


def test_uniform_and_one_hot_gates() -> None:
    stats = GateStats(["a", "b"], num_experts=4)
    uniform = torch.full((8, 1, 4), 0.25)
    one_hot = torch.nn.functional.one_hot(torch.zeros(8, dtype=torch.long), 4).float().unsqueeze(1)
    stats.update(torch.cat([uniform, one_hot], dim=1))  # (8, 2, 4): task a uniform, task b on expert 0
    h = stats.compute()
    assert h.entropy[0] == pytest.approx(math.log(4)) and h.entropy[1] == pytest.approx(0.0)
    assert h.polarized == [False, True]
    assert h.dead_fraction == 0.0  # task a still uses every expert
    # a one-hot gate on one expert for every row is a collapsed router, not merely a polarized one
    assert h.problems() == ["router of task b is collapsed: expert e0 takes 100% of its weight"]


def test_dead_experts_are_counted_across_tasks() -> None:
    stats = GateStats(["a", "b"], num_experts=4)
    w = torch.tensor([0.5, 0.5, 0.0, 0.0])
    stats.update(w.expand(3, 2, 4))
    h = stats.compute()
    assert h.dead_fraction == 0.5 and h.polarized == [False, False]
    assert h.problems(max_dead_fraction=0.25) == ["50% of experts are near-dead: e2, e3"]
    assert h.problems() == []


def test_spread_is_none_without_an_expert_pool_and_positive_for_random_experts() -> None:
    assert expert_spread(nn.Linear(3, 3)) is None
    assert expert_spread(Experts(6, (4,), num_experts=1)) is None
    torch.manual_seed(0)
    assert expert_spread(Experts(6, (8, 4), num_experts=5)) > 0.5


def test_spread_finds_one_copied_expert_among_many() -> None:
    torch.manual_seed(0)
    pool = Experts(6, (8, 4), num_experts=5)
    assert expert_spread(pool) > 0.5
    pool[3].load_state_dict(pool[1].state_dict())
    assert expert_spread(pool) == 0.0


# ------------------------------------------------------------------------------- trained models
def _train(features: Path, model: RankingModel, config: ModelConfig, steps: int = 60) -> GateStats:
    """A real training loop, then gate statistics over the validation split."""
    dm = RankingDataModule(features, config, batch_size=256, seed=0)
    dm.setup()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    done = 0
    while done < steps:
        for b in dm.train_dataloader():
            opt.zero_grad()
            out = model(b.sparse, b.dense, b.position)
            loss = sum(task_loss(t, out.logits[t.name], b.labels[t.name], b.masks[t.name]) for t in config.tasks)
            loss.backward()  # type: ignore[union-attr]
            opt.step()
            done += 1
            if done == steps:
                break
    model.eval()
    stats = GateStats([t.name for t in config.tasks], config.num_experts)
    with torch.no_grad():
        for b in dm.val_dataloader():
            stats.update(model(b.sparse, b.dense).gates)
    return stats


@pytest.fixture(scope="module")
def config(small_features: Path) -> ModelConfig:
    return ModelConfig.from_fitted(
        load_features(small_features), bottom_dims=(32,), expert_dims=(16,), tower_dims=(8,), num_experts=4
    )


def test_a_trained_mmoe_with_gate_dropout_is_healthy(small_features: Path, config: ModelConfig) -> None:
    """With the YouTube remedy on (gate dropout 0.1). Without it this short run at lr 5e-3 polarizes
    the dismiss gate for some seeds; benchmarks/gate_dropout.py counts that over many seeds."""
    torch.manual_seed(0)
    config = dataclasses.replace(config, gate=GateConfig(dropout=0.1))
    model = build_model(config)
    health = _train(small_features, model, config).compute(model)
    assert health.problems() == [], health
    assert health.expert_spread is not None and health.expert_spread > 0.5


def test_constant_initialisation_is_caught_and_does_not_heal(small_features: Path, config: ModelConfig) -> None:
    """Constant experts and gates get identical gradients: training never separates them."""
    torch.manual_seed(0)
    model = build_model(config)
    for m in model.modules():
        if isinstance(m, Experts | Gate):
            for p in m.parameters():
                nn.init.constant_(p, 0.05)
    assert expert_spread(model) == 0.0
    health = _train(small_features, model, config).compute(model)
    assert any(p.startswith("experts are identical") for p in health.problems()), health
    assert health.expert_spread is not None and health.expert_spread < 1e-6


def test_a_gate_pinned_on_one_expert_is_caught_as_collapsed(small_features: Path, config: ModelConfig) -> None:
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        gate = model.gates["like"]  # type: ignore[index]
        gate.proj.weight.zero_()
        gate.proj.bias.copy_(torch.tensor([12.0, 0.0, 0.0, 0.0]))
        gate.proj.weight.requires_grad_(False)  # keep it pinned while the rest trains
        gate.proj.bias.requires_grad_(False)
    health = _train(small_features, model, config, steps=20).compute(model)
    assert health.problems() == ["router of task like is collapsed: expert e0 takes 100% of its weight"], health
    assert health.polarized == [t.name == "like" for t in config.tasks]
    assert health.collapsed == [t.name == "like" for t in config.tasks]
