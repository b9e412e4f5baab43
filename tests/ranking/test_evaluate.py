from pathlib import Path

import numpy as np
import torch

from features.fitted import FittedTransform
from ranking.artifact import build_model
from ranking.config import ModelConfig
from ranking.evaluate import evaluate, split_table
from ranking.metrics import auc
from ranking.scores import combined_score, task_scores


def test_evaluate_reports_every_metric_and_matches_direct_computation(small_features: Path) -> None:
    fitted = FittedTransform.load(small_features / "transform.json")
    cfg = ModelConfig.from_fitted(fitted, bottom_dims=(16,), expert_dims=(8,), tower_dims=(4,), num_experts=2)
    torch.manual_seed(0)
    model = build_model(cfg)
    table = split_table(small_features, "val", cfg, fitted)
    r = evaluate(model, table, cfg, "val", batch_size=333)  # odd batch size: results must not depend on it
    for key in ("val/click/auc", "val/click/gauc", "val/click/ne", "val/click/calibration", "val/watch_time/r2",
                "val/combined/ndcg_at_10", "val/true/ndcg_at_10"):
        assert key in r, key
    b = table.all()
    model.eval()
    with torch.no_grad():
        click = torch.sigmoid(model(b.sparse, b.dense, b.position).logits["click"]).numpy()
    assert r["val/click/auc"] == auc(b.labels["click"].numpy(), click)
    assert 0 < r["val/true/ndcg_at_10"] <= 1


def test_combined_score_signs() -> None:
    from ranking.config import SparseSlot, TaskHead

    cfg = ModelConfig(sparse=(SparseSlot("u", 3, 2),), dense=(), tasks=(
        TaskHead("click", "binary", "engagement", serving_weight=2.0),
        TaskHead("dismiss", "binary", "satisfaction", serving_weight=1.0, higher_is_better=False)))
    logits = {"click": torch.zeros(2), "dismiss": torch.tensor([0.0, 100.0])}
    s = combined_score(task_scores(logits, cfg.tasks), cfg.tasks)
    np.testing.assert_allclose(s.numpy(), [2 * 0.5 - 0.5, 2 * 0.5 - 1.0])
