"""Warm start across training windows: embedding rows follow their raw ids, other tensors are copied."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import torch

from features.build import scan_log
from features.fitted import FittedTransform
from features.spec import FeatureSpec
from ranking.artifact import build_model, export_artifact, warm_start
from ranking.config import ModelConfig

SMALL = {"bottom_dims": (16,), "expert_dims": (8,), "tower_dims": (4,)}


def _table(model: torch.nn.Module, feature: str) -> torch.Tensor:
    [weight] = [v for k, v in model.state_dict().items() if k.endswith(f"t_{feature}.weight")]
    return weight


def test_rows_follow_raw_ids_across_vocabularies(small_log: Path, spec: FeatureSpec, tmp_path: Path) -> None:
    log = scan_log(small_log)
    days = sorted(log.select(pl.col("ts").dt.date().unique()).collect().to_series().to_list())
    old_fit = FittedTransform.fit(log.filter(pl.col("ts").dt.date() == days[0]), spec)
    new_fit = FittedTransform.fit(log.filter(pl.col("ts").dt.date() == days[1]), spec)
    old_items, new_items = old_fit.vocabs["item_id"].values, new_fit.vocabs["item_id"].values
    shared = sorted(set(old_items) & set(new_items), key=new_items.index)
    assert shared and old_items != new_items  # the two windows order and hold different ids

    torch.manual_seed(0)
    old = build_model(ModelConfig.from_fitted(old_fit, **SMALL))
    artifact = export_artifact(old, ModelConfig.from_fitted(old_fit, **SMALL), old_fit, tmp_path / "old")
    torch.manual_seed(1)
    new = build_model(ModelConfig.from_fitted(new_fit, **SMALL))
    fresh = _table(new, "item_id").clone()
    counts = warm_start(new, new_fit, artifact)

    assert counts["rows"] >= len(shared) and counts["tables"] >= 1
    old_t, new_t = _table(old, "item_id"), _table(new, "item_id")
    for value in shared[:50]:
        assert torch.equal(new_t[new_items.index(value) + 1], old_t[old_items.index(value) + 1]), value
    unseen = [i for i, v in enumerate(new_items) if v not in set(old_items)]
    assert unseen, "the second day should hold ids the first never saw"
    assert torch.equal(new_t[unseen[0] + 1], fresh[unseen[0] + 1])  # kept its fresh initialisation
    assert torch.equal(new_t[0], old_t[0])  # the out-of-vocabulary row
    dense = [k for k in new.state_dict() if "embedding" not in k and new.state_dict()[k].dim() == 2]
    assert dense and all(torch.equal(new.state_dict()[k], old.state_dict()[k]) for k in dense)
