import torch
import torch.nn.functional as F

from ranking.config import TaskHead
from ranking.losses import task_loss

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
