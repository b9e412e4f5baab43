"""Whole-split evaluation of a trained network: every task metric, gAUC, and NDCG of the serving score."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import torch
from torch import nn

from features.fitted import FittedTransform
from ranking.batch import FeatureTable
from ranking.config import ModelConfig
from ranking.metrics import SplitMetrics, ndcg_at_k
from ranking.scores import combined_score, task_scores


def split_table(features_dir: str | Path, split: str, config: ModelConfig, fitted: FittedTransform) -> FeatureTable:
    """A split of a features folder as a table carrying user and request group ids for evaluation."""
    keys = fitted.spec.keys
    extra = {"user": keys.user, "request": keys.request, "true_relevance": "true_relevance"}
    frame = pl.read_parquet(Path(features_dir) / f"{split}.parquet")
    return FeatureTable(frame, config, {k: v for k, v in extra.items() if v is not None})


EVAL_BATCH = 16_384  # rows per forward pass of evaluate; expert choice routes within each such group


@torch.inference_mode()
def evaluate(model: nn.Module, table: FeatureTable, config: ModelConfig, prefix: str,
             batch_size: int = EVAL_BATCH, ndcg_k: int = 10,
             keep: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] | None = None) -> dict[str, float]:
    """Metrics ``<prefix>/<task>/<metric>`` over the whole table.

    Task metrics score logged labels, so the position-bias tower is applied (it models how the
    log was produced). Ranking metrics score what serving would do, without position:
    ``<prefix>/combined/ndcg@k`` against the first binary task's label per request, and
    ``<prefix>/true/ndcg@k`` against ``true_relevance`` when the data has it.

    ``keep``, when given, receives per task the ``(prediction, label, mask)`` tensors of every
    batch (for plots such as ROC and calibration curves).

    The rows are scored ``batch_size`` at a time in file order; for every routing but expert choice
    that changes nothing. Expert choice routes within a group, here one such batch (at serving:
    one request's candidates), so its offline metrics are those of groups of ``batch_size`` rows.
    """
    was_training = model.training
    model.eval()
    metrics = SplitMetrics([(t.name, t.type) for t in config.tasks])
    first_binary = next((t.name for t in config.tasks if t.type == "binary"), None)
    rank_gains = {"combined": first_binary, "true": "true_relevance"}
    ranking: dict[str, list[torch.Tensor]] = {"request": [], "score": [], "combined": [], "true": []}
    for start in range(0, len(table), batch_size):
        b = table.batch(torch.arange(start, min(start + batch_size, len(table))))
        out = model(b.sparse, b.dense, b.position)
        preds = task_scores(out.logits, config.tasks)  # what serving scores, task by task
        metrics.update(preds, b.labels, b.masks, b.extra.get("user"))
        if keep is not None:
            for t in config.tasks:
                keep.setdefault(t.name, []).append((preds[t.name].float(), b.labels[t.name], b.masks[t.name]))
        if "request" in b.extra and first_binary is not None:
            served = model(b.sparse, b.dense, None) if b.position is not None else out
            ranking["request"].append(b.extra["request"])
            ranking["score"].append(combined_score(task_scores(served.logits, config.tasks), config.tasks))
            ranking["combined"].append(b.labels[first_binary])
            if "true_relevance" in b.extra:
                ranking["true"].append(b.extra["true_relevance"])
    model.train(was_training)
    result = {f"{prefix}/{k}": v for k, v in metrics.compute().items()}
    for name in rank_gains:
        if ranking[name]:
            m = ndcg_at_k(torch.cat(ranking["score"]), torch.cat(ranking[name]), torch.cat(ranking["request"]), ndcg_k)
            result[f"{prefix}/{name}/ndcg_at_{ndcg_k}"] = m.value  # MLflow keys allow no "@"
            result[f"{prefix}/{name}/ndcg_requests"] = float(m.groups)
    return result
