"""The served score's one definition (``ranking.scores``): task scores, weights, the combined score."""

import numpy as np
import pytest
import torch

from ranking.config import TaskHead
from ranking.scores import binary_mask, combined_score, serving_weights, task_score, task_scores

TASKS = (
    TaskHead("click", "binary", "engagement", serving_weight=1.0),
    TaskHead("watch_time", "regression", "engagement", serving_weight=0.2),
    TaskHead("dismiss", "binary", "satisfaction", serving_weight=3.0, higher_is_better=False),
)
LOGITS = {"click": torch.tensor([0.0, 2.0, -1.0]), "watch_time": torch.tensor([10.0, 0.5, 3.0]),
          "dismiss": torch.tensor([-3.0, 0.0, 4.0])}


def test_binary_tasks_score_probabilities_and_regression_tasks_their_prediction() -> None:
    s = task_scores(LOGITS, TASKS)
    torch.testing.assert_close(s["click"], torch.sigmoid(LOGITS["click"]))
    torch.testing.assert_close(s["watch_time"], LOGITS["watch_time"])
    assert binary_mask(TASKS).tolist() == [[True], [False], [True]]
    stacked = torch.stack(list(LOGITS.values()))  # (T, N), what the fused serving network holds
    fused = torch.where(binary_mask(TASKS), torch.sigmoid(stacked), stacked)
    for i, t in enumerate(TASKS):
        torch.testing.assert_close(fused[i], task_score(t, LOGITS[t.name]))


def test_the_combined_score_weighs_signs_and_sums_in_float64() -> None:
    s = task_scores(LOGITS, TASKS)
    expected = 1.0 * s["click"].double() + 0.2 * s["watch_time"].double() - 3.0 * s["dismiss"].double()
    got = combined_score(s, TASKS)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected)
    as_numpy = combined_score({k: v.numpy() for k, v in s.items()}, TASKS)  # the serving side's arrays
    assert as_numpy.dtype == np.float64
    np.testing.assert_array_equal(as_numpy, got.numpy())


def test_request_weights_override_the_serving_weights() -> None:
    s = {k: v.numpy() for k, v in task_scores(LOGITS, TASKS).items()}
    only_click = combined_score(s, TASKS, {"watch_time": 0.0, "dismiss": 0.0})
    np.testing.assert_array_equal(only_click, s["click"].astype(np.float64))
    assert serving_weights(TASKS, {"click": 2}) == {"click": 2.0, "watch_time": 0.2, "dismiss": 3.0}
    huge = combined_score(s, TASKS, {"click": 1e39})  # float32 * 1e39 would be inf
    assert np.isfinite(huge).all()


@pytest.mark.parametrize(("weights", "match"), [
    ({"ctr": 1.0}, "unknown objective 'ctr'"),
    ({"click": -1.0}, "must be finite and >= 0, got -1.0"),
    ({"click": float("inf")}, "must be finite and >= 0, got inf"),
])
def test_bad_weights_are_refused_naming_the_objective(weights: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        serving_weights(TASKS, weights)
