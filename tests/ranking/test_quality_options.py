"""The quality ablation's model and training options: feature gate, cross network, batch-normalised
experts, the cosine learning-rate schedule. Serving parity of each lives in ``test_fused.py``."""

from __future__ import annotations

import itertools
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.modules.crossnet import CrossNet, LowRankCrossNet, LowRankMixtureCrossNet

from ranking.artifact import build_model
from ranking.blocks import MLP, FeatureGate, run_stacked
from ranking.config import ModelConfig, SparseSlot, TaskHead
from ranking.train import FitConfig, OptimConfig, RankingDataModule, RankingModule, fit, load_features

TASKS = (TaskHead("click", "binary", "engagement"), TaskHead("like", "binary", "satisfaction"))


def _cfg(**fields: object) -> ModelConfig:
    return ModelConfig(sparse=(SparseSlot("user", 6, 3), SparseSlot("item", 5, 2)), dense=("x", "y"), tasks=TASKS,
                       bottom_dims=(8,), expert_dims=(4,), tower_dims=(2,), num_experts=2, **fields)  # type: ignore[arg-type]


def _inputs() -> tuple[KeyedJaggedTensor, torch.Tensor]:
    kjt = KeyedJaggedTensor.from_lengths_sync(["user", "item"], torch.tensor([1, 2, 4, 2, 0, 3]),
                                              torch.ones(6, dtype=torch.int64))
    return kjt, torch.randn(3, 2)


def test_feature_gate_scales_each_field_by_one_factor_and_starts_at_the_identity() -> None:
    torch.manual_seed(0)
    gate = FeatureGate([3, 2, 1, 1], hidden=5)
    x = torch.randn(4, 7)
    assert torch.equal(gate(x), x)  # zero-initialised last layer: every factor 2 * sigmoid(0) = 1
    with torch.no_grad():
        gate.out.weight.normal_()
        gate.out.bias.normal_()
    y = gate(x)
    factors = y / x  # (4, 7): the same factor on every column of a field, each in (0, 2)
    for cols in ([0, 1, 2], [3, 4]):
        torch.testing.assert_close(factors[:, cols], factors[:, cols[:1]].expand(-1, len(cols)))
    assert bool(((factors > 0) & (factors < 2)).all())
    assert not torch.allclose(factors[:, 0], factors[:, 3])  # fields get their own factors


@pytest.mark.parametrize(("fields", "kind"), [
    ({"cross_layers": 2}, CrossNet),
    ({"cross_layers": 2, "cross_rank": 3}, LowRankCrossNet),
    ({"cross_layers": 1, "cross_rank": 3, "cross_experts": 2}, LowRankMixtureCrossNet),
])
def test_the_cross_network_is_torchrecs_and_sits_before_the_bottom(fields: dict[str, int], kind: type) -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(**fields))
    assert isinstance(model.cross, kind)
    sparse, dense = _inputs()
    front = torch.cat([model.lookup_pooled(sparse), dense], dim=1)  # (3, 3 + 2 + 2)
    cross = model.cross
    assert cross is not None
    torch.testing.assert_close(model.embed(sparse, dense), model.bottom(cross(front)))
    out = model(sparse, dense)
    torch.stack(list(out.logits.values())).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cross.parameters())


def test_options_off_keep_the_default_models_keys_and_initialisation() -> None:
    torch.manual_seed(0)
    plain = build_model(_cfg()).state_dict()
    torch.manual_seed(0)
    default = build_model(_cfg(feature_gate_dim=0, cross_layers=0, expert_norm="none")).state_dict()
    assert list(plain) == list(default)
    assert all(torch.equal(plain[k], default[k]) for k in plain)


def test_batch_normalised_experts_train_one_by_one_and_update_their_statistics() -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(expert_norm="batch"))
    experts = list(model.experts)  # type: ignore[arg-type]  # nn.Module attribute typing
    assert all(any(isinstance(m, nn.BatchNorm1d) for m in e) for e in experts)
    x = torch.randn(16, 8) * 3 + 1
    model.train()
    stacked = run_stacked(experts, x)  # type: ignore[arg-type]
    torch.testing.assert_close(stacked, torch.stack([e(x) for e in experts], dim=1))
    bn = next(m for m in experts[0] if isinstance(m, nn.BatchNorm1d))
    # both calls above updated the running statistics
    assert bn.num_batches_tracked is not None and bn.num_batches_tracked.item() == 2


@pytest.mark.parametrize(("fields", "match"), [
    ({"cross_experts": 2}, "needs low-rank"),
    ({"cross_layers": -1}, "cross_layers"),
    ({"feature_gate_dim": 1.5}, "feature_gate_dim"),
    ({"expert_norm": "layer"}, "expert_norm"),
])
def test_bad_option_values_are_refused(fields: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _cfg(**fields)


def test_mlp_batch_norm_is_folded_layer_by_layer() -> None:  # the fold the serving network uses for experts
    from ranking.fused import _affine_layers

    torch.manual_seed(0)
    mlp = MLP(5, (6, 3), norm="batch")
    for m in mlp:
        if isinstance(m, nn.BatchNorm1d) and m.running_mean is not None and m.running_var is not None:
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    mlp.eval()
    x = torch.randn(7, 5)
    h = x
    for w, b in _affine_layers(mlp):
        h = torch.relu(h @ w.t() + b)
    torch.testing.assert_close(h, mlp(x))


# ------------------------------------------------------------------------------ learning-rate schedule
def test_the_cosine_schedule_warms_up_then_decays_to_zero() -> None:
    o = OptimConfig(lr_schedule="cosine", warmup_steps=4)
    factors = [o.lr_factor(s, 100) for s in range(101)]
    assert factors[:4] == pytest.approx([0.25 * (s + 1) * f for s, f in enumerate(
        [OptimConfig(lr_schedule="cosine").lr_factor(s, 100) for s in range(4)])])
    assert factors[50] == pytest.approx(0.5)
    assert factors[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[3:]))  # decreasing after warm-up
    assert not OptimConfig().scheduled and [OptimConfig().lr_factor(s, 10) for s in (0, 9)] == [1.0, 1.0]
    with pytest.raises(ValueError, match="lr_schedule"):
        OptimConfig(lr_schedule="step")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="warmup_steps"):
        OptimConfig(warmup_steps=-1)


def test_a_real_fit_follows_the_schedule_on_both_parameter_groups(small_features: Path) -> None:
    cfg = ModelConfig.from_fitted(load_features(small_features), bottom_dims=(16,), expert_dims=(8,), tower_dims=(4,))
    optim = OptimConfig(lr=4e-3, embedding_lr=1e-2, lr_schedule="cosine", warmup_steps=3)
    module = RankingModule(build_model(cfg), cfg, FitConfig(optim=optim))
    seen: list[tuple[float, float]] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
            dense, emb = trainer.optimizers[0].param_groups
            seen.append((dense["lr"], emb["lr"]))

    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[Record()])
    trainer.fit(module, datamodule=RankingDataModule(small_features, cfg, batch_size=256, seed=0))
    total = len(seen)
    assert total == trainer.estimated_stepping_batches > 4
    for step, (dense, emb) in enumerate(seen):
        f = optim.lr_factor(step, total)
        assert dense == pytest.approx(4e-3 * f) and emb == pytest.approx(1e-2 * f)
    assert seen[0][0] < seen[2][0] and seen[-1][0] < 0.05 * 4e-3  # warm-up, then down to almost 0


def test_fit_trains_every_option_together(small_features: Path) -> None:
    """The options at once through ``ranking.train.fit``: it learns, and the artifact's config keeps them."""
    cfg = ModelConfig.from_fitted(load_features(small_features), bottom_dims=(32,), expert_dims=(16,),
                                  tower_dims=(8,), feature_gate_dim=16, cross_layers=2, cross_rank=8,
                                  expert_norm="batch", expert_activation="silu")
    result = fit(small_features, cfg, FitConfig(epochs=2, batch_size=256, accelerator="cpu",
                                                optim=OptimConfig(lr=5e-3, lr_schedule="cosine")))
    assert result.metrics["final/val/click/auc"] > 0.65
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
