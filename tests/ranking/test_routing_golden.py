"""Golden values under a seed: each routing kind's gate weights and click logits for a fixed batch
(``test_routing``'s ``cfg`` and ``_batch``, ``torch.manual_seed(0)`` before the model is built), and
hash routing's experts of fixed ids. The values were computed by this code when the strategies were
added (torch 2.13, CPU); a change to initialisation order, the routing rules or the hash shows up
here even where the property tests still hold. Update them only for an intended change, and say so.
"""

from __future__ import annotations

import pytest
import torch

from ranking.artifact import build_model
from ranking.gating import hash_experts
from tests.ranking.test_routing import KINDS, _batch, cfg

GOLDEN = {  # kind -> (click logits of rows 0..3, click gate weights of rows 0..2)
    "softmax": ([-0.2734, -0.2675, -0.2734, -0.2713],
                [[0.3513, 0.1593, 0.2497, 0.2397], [0.3609, 0.1549, 0.232, 0.2523], [0.3466, 0.1564, 0.2611, 0.2359]]),
    "noisy_topk": ([-0.3627, -0.3582, -0.3652, -0.3672],
                   [[0.5845, 0.0, 0.4155, 0.0], [0.5886, 0.0, 0.0, 0.4114], [0.5704, 0.0, 0.4296, 0.0]]),
    "top_p": ([-0.2715, -0.2645, -0.2715, -0.2689],
              [[0.4179, 0.0, 0.297, 0.2851], [0.427, 0.0, 0.2745, 0.2985], [0.4109, 0.0, 0.3095, 0.2797]]),
    "hash": ([0.4975, 0.5198, 0.4975, 0.5145],
             [[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]),
    "expert_choice": ([-0.2873, -0.28, -0.2757, -0.275],
                      [[0.0, 0.0, 0.0, 0.0], [0.3609, 0.0, 0.0, 0.2523], [0.0, 0.0, 0.2611, 0.0]]),
    "shared_topk": ([-0.3093, -0.3073, -0.3093, -0.3093],
                    [[0.2087, 0.4781, 0.0, 0.0, 0.3132, 0.0], [0.2402, 0.4877, 0.0, 0.0, 0.2722, 0.0],
                     [0.2041, 0.4912, 0.0, 0.0, 0.3047, 0.0]]),
}


def test_every_kind_has_golden_values() -> None:
    assert sorted(GOLDEN) == sorted(g.kind for g in KINDS)


@pytest.mark.parametrize("gate", KINDS, ids=lambda g: g.kind)
def test_seeded_weights_and_logits_are_the_golden_ones(gate: object) -> None:
    torch.manual_seed(0)
    model = build_model(cfg(gate)).eval()  # type: ignore[arg-type]
    sparse, dense, _ = _batch()
    with torch.no_grad():
        out = model(sparse, dense)
    logits, weights = GOLDEN[gate.kind]  # type: ignore[attr-defined]
    assert out.gates is not None
    torch.testing.assert_close(out.logits["click"][:4], torch.tensor(logits), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.gates[:3, 0], torch.tensor(weights), atol=1e-4, rtol=0)


def test_hash_experts_of_fixed_ids() -> None:
    assert hash_experts(torch.arange(10), 4).tolist() == [1, 0, 3, 0, 3, 2, 0, 2, 0, 2]
    assert hash_experts(torch.tensor([12345, 2**40, 7]), 16).tolist() == [8, 7, 14]
