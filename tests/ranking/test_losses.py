"""Per-task losses and the multi-task loss (``ranking.train.loss``), without Lightning."""

import pytest
import torch
import torch.nn.functional as F
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from ranking.config import TaskHead
from ranking.models import ModelOutput
from ranking.train.loss import LossConfig, MultiTaskLoss, task_loss, touched_rows_l2

CLICK = TaskHead("click", "binary", "engagement")
WATCH = TaskHead("watch", "regression", "engagement")


def test_masked_rows_do_not_count() -> None:
    logit = torch.tensor([0.5, -1.0, 3.0])
    y = torch.tensor([1.0, 0.0, 0.0])
    m = torch.tensor([True, True, False])
    expected = F.binary_cross_entropy_with_logits(logit[:2], y[:2])
    torch.testing.assert_close(task_loss(CLICK, logit, y, m), expected)


def test_regression_is_mse_and_empty_mask_is_zero() -> None:
    pred, y = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])
    assert task_loss(WATCH, pred, y, torch.tensor([True, True])).item() == 2.5
    assert task_loss(WATCH, pred, y, torch.tensor([False, False])).item() == 0.0


# ------------------------------------------------------------------------------- MultiTaskLoss
def _out(aux: dict[str, torch.Tensor] | None = None) -> ModelOutput:
    return ModelOutput(logits={"click": torch.tensor([0.5, -1.0, 3.0]), "watch": torch.tensor([1.0, 2.0, 5.0])},
                       aux=aux or {})


LABELS = {"click": torch.tensor([1.0, 0.0, 0.0]), "watch": torch.tensor([0.0, 4.0, 5.0])}
MASKS = {"click": torch.tensor([True, True, False]), "watch": torch.tensor([True, True, True])}
HEADS = (CLICK, TaskHead("watch", "regression", "engagement", loss_weight=0.25))


def test_fixed_weights_sum_the_masked_task_losses() -> None:
    parts = MultiTaskLoss(HEADS)(_out(), LABELS, MASKS)
    click = task_loss(CLICK, _out().logits["click"], LABELS["click"], MASKS["click"])
    watch = torch.tensor((1.0 + 4.0 + 0.0) / 3)
    torch.testing.assert_close(parts.tasks["click"], click)
    torch.testing.assert_close(parts.tasks["watch"], watch)
    torch.testing.assert_close(parts.total, click + 0.25 * watch)
    assert parts.load_balance is None and parts.embedding_l2 is None


def test_uncertainty_weights_are_a_learned_parameter() -> None:
    loss = MultiTaskLoss(HEADS, config=LossConfig(weighting="uncertainty"))
    assert loss.log_vars is not None and [n for n, _ in loss.named_parameters()] == ["log_vars"]
    with torch.no_grad():
        loss.log_vars.copy_(torch.tensor([0.0, 1.0]))
    parts = loss(_out(), LABELS, MASKS)
    expected = parts.tasks["click"] + torch.exp(torch.tensor(-1.0)) * parts.tasks["watch"] + 1.0
    torch.testing.assert_close(parts.total, expected)
    parts.total.backward()
    assert loss.log_vars.grad is not None and bool(loss.log_vars.grad.abs().gt(0).all())


def test_the_load_balance_term_counts_only_with_a_weight() -> None:
    aux = {"load_balance": torch.tensor(2.0)}
    plain = MultiTaskLoss(HEADS)(_out(aux), LABELS, MASKS)
    weighted = MultiTaskLoss(HEADS, load_balance_weight=0.1)(_out(aux), LABELS, MASKS)
    assert plain.load_balance is None
    assert weighted.load_balance is not None and float(weighted.load_balance) == 2.0
    torch.testing.assert_close(weighted.total, plain.total + 0.2)


def test_embedding_l2_is_added_only_when_the_tables_are_given() -> None:
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=2, num_embeddings=4,
                                                            feature_names=["f"])], device=torch.device("cpu"))
    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor([1, 1, 3]), torch.tensor([1, 1, 1]))
    loss = MultiTaskLoss(HEADS, config=LossConfig(embedding_l2=0.5))
    without = loss(_out(), LABELS, MASKS)  # evaluation: no tables, no penalty
    with_tables = loss(_out(), LABELS, MASKS, ebc, kjt)
    assert without.embedding_l2 is None and with_tables.embedding_l2 is not None
    torch.testing.assert_close(with_tables.total, without.total + 0.5 * touched_rows_l2(ebc, kjt))


def test_a_batch_without_any_label_of_a_task_adds_nothing_for_it() -> None:
    masks = {"click": torch.zeros(3, dtype=torch.bool), "watch": MASKS["watch"]}
    parts = MultiTaskLoss(HEADS)(_out(), LABELS, masks)
    assert float(parts.tasks["click"]) == 0.0
    torch.testing.assert_close(parts.total, 0.25 * parts.tasks["watch"])


def test_bad_loss_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="loss_weighting must be 'fixed' or 'uncertainty'"):
        LossConfig(weighting="equal")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="embedding_l2 must be >= 0"):
        LossConfig(embedding_l2=float("nan"))
