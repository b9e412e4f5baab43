"""Embedding regularisation of the training module: L2 on touched rows, decoupled decay, own learning rate."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torchrec import KeyedJaggedTensor

from ranking.artifact import build_model
from ranking.config import ModelConfig, SparseSlot, TaskHead
from ranking.train import (
    FitConfig,
    LossConfig,
    OptimConfig,
    RankingDataModule,
    RankingModule,
    load_features,
    touched_rows_l2,
)

TASK = (TaskHead("click", "binary", "engagement"),)


def _cfg() -> ModelConfig:
    return ModelConfig(sparse=(SparseSlot("user", 6, 3), SparseSlot("item", 5, 2)), dense=("x",), tasks=TASK,
                       bottom_dims=(8,), expert_dims=(4,), tower_dims=(2,), num_experts=2)


def _kjt() -> KeyedJaggedTensor:
    # user ids [1, 1, 4], item ids [2, 0, 2]
    return KeyedJaggedTensor.from_lengths_sync(
        ["user", "item"], torch.tensor([1, 1, 4, 2, 0, 2]), torch.ones(6, dtype=torch.int64)
    )


def test_touched_rows_l2_counts_each_distinct_row_once() -> None:
    model = build_model(_cfg())
    bags = model.embeddings.embedding_bags
    user, item = bags["t_user"].weight, bags["t_item"].weight
    expected = user[[1, 4]].pow(2).sum() + item[[0, 2]].pow(2).sum()
    torch.testing.assert_close(touched_rows_l2(model, _kjt()), expected)


def test_touched_rows_l2_gradient_reaches_only_touched_rows() -> None:
    model = build_model(_cfg())
    touched_rows_l2(model, _kjt()).backward()
    grad = model.embeddings.embedding_bags["t_user"].weight.grad  # (6, 3)
    assert grad is not None
    nonzero = grad.abs().sum(dim=1) > 0  # (6,)
    assert nonzero.tolist() == [False, True, False, False, True, False]


def test_optimizer_groups_carry_embedding_settings() -> None:
    module = RankingModule(build_model(_cfg()), _cfg(), FitConfig(optim=OptimConfig(
        lr=1e-3, weight_decay=1e-4, embedding_lr=5e-4, embedding_weight_decay=0.5)))
    opt = module.optimizer()
    dense, emb = opt.param_groups
    assert (dense["lr"], dense["weight_decay"], dense["decoupled_weight_decay"]) == (1e-3, 1e-4, False)
    assert (emb["lr"], emb["weight_decay"], emb["decoupled_weight_decay"]) == (5e-4, 0.5, True)
    n_emb = sum(p.numel() for p in module.model.embeddings.parameters())
    assert sum(p.numel() for p in emb["params"]) == n_emb


def test_defaults_leave_embeddings_unregularised() -> None:
    opt = RankingModule(build_model(_cfg()), _cfg(), FitConfig(optim=OptimConfig(lr=2e-3))).optimizer()
    emb = opt.param_groups[1]
    assert (emb["lr"], emb["weight_decay"]) == (2e-3, 0.0)


@pytest.mark.parametrize(
    ("make", "match"),
    [(lambda: OptimConfig(embedding_lr=0.0), "embedding_lr"), (lambda: LossConfig(embedding_l2=-1.0), "embedding_l2"),
     (lambda: OptimConfig(embedding_weight_decay=float("nan")), "embedding_weight_decay"),
     (lambda: OptimConfig(lr=0.0), "lr must be > 0")],
)
def test_bad_settings_are_refused(make: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()  # type: ignore[operator]


def _embedding_norm(features: Path, embedding_l2: float = 0.0) -> tuple[float, float]:
    """(norm of the trained embedding tables, their OOV rows' change) after one epoch."""
    L.seed_everything(0, verbose=False)
    cfg = ModelConfig.from_fitted(load_features(features), bottom_dims=(32,), expert_dims=(16,), tower_dims=(8,))
    module = RankingModule(build_model(cfg), cfg, FitConfig(optim=OptimConfig(lr=5e-3),
                                                           loss=LossConfig(embedding_l2=embedding_l2)))
    before = {n: p.detach().clone() for n, p in module.model.embeddings.named_parameters()}
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=RankingDataModule(features, cfg, batch_size=256, seed=0))
    params = dict(module.model.embeddings.named_parameters())
    norm = float(sum(p.detach().pow(2).sum() for p in params.values()))
    oov = float(sum((params[n].detach()[0] - before[n][0]).abs().sum() for n in params))
    return norm, oov


def test_embedding_l2_shrinks_tables_and_spares_unseen_rows(small_features: Path) -> None:
    free, _ = _embedding_norm(small_features)
    l2, oov_change = _embedding_norm(small_features, embedding_l2=1.0)
    assert l2 < 0.5 * free
    assert oov_change == 0.0  # row 0 (OOV) never occurs in training batches, so L2 never touches it
