"""Gates: dense softmax, noisy top-k, gate dropout, load-balancing loss."""

from __future__ import annotations

import pytest
import torch

from ranking.config import GateConfig
from ranking.gating import Gate, cv_squared, drop_experts, load_balance_loss, mix_experts

E = 6


def noisy(k: int = 2, noise: float = 1.0, dropout: float = 0.0) -> Gate:
    torch.manual_seed(0)
    return Gate(8, E, GateConfig("noisy_topk", top_k=k, noise=noise, dropout=dropout))


def test_dense_softmax_gate_matches_softmax_of_its_projection() -> None:
    torch.manual_seed(0)
    gate = Gate(8, E).train()
    x = torch.randn(10, 8)
    torch.testing.assert_close(gate(x), torch.softmax(gate.proj(x), dim=-1))
    assert gate.noise is None  # dense gates have no noise parameters


@pytest.mark.parametrize("config", [GateConfig(), GateConfig("noisy_topk", top_k=2, noise=1.0, dropout=0.2)])
def test_weights_are_float32_under_bf16(config: GateConfig) -> None:
    gate = Gate(8, E, config).to(torch.bfloat16)
    for mode in (gate.train(), gate.eval()):
        w = mode(torch.randn(5, 8, dtype=torch.bfloat16))
        assert w.dtype == torch.float32
        torch.testing.assert_close(w.sum(-1), torch.ones(5))


@pytest.mark.parametrize("k", [1, 2, 5])
def test_noisy_top_k_keeps_exactly_k_weights_per_row(k: int) -> None:
    gate = noisy(k)
    x = torch.randn(64, 8)
    for mode in (gate.train(), gate.eval()):
        w = mode(x)
        assert ((w > 0).sum(-1) == k).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(64))


def test_noisy_top_k_in_eval_is_the_clean_top_k_softmax() -> None:
    gate = noisy(2).eval()
    x = torch.randn(32, 8)
    logits = gate.proj(x)
    top = logits.topk(2, dim=-1)
    want = torch.zeros_like(logits).scatter(-1, top.indices, torch.softmax(top.values, dim=-1))
    torch.testing.assert_close(gate(x), want)
    torch.testing.assert_close(gate(x), gate(x))  # no noise: deterministic


def test_noise_only_in_training_and_its_std_is_learned() -> None:
    gate = noisy(2).train()
    x = torch.randn(256, 8)
    a, b = gate(x), gate(x)
    assert not torch.equal(a, b)  # fresh noise each call
    assert not torch.equal(a, gate.eval()(x))
    gate.train()
    (gate(x) * torch.arange(E, dtype=torch.float32)).sum().backward()  # any loss that cares which experts win
    assert gate.noise is not None and gate.noise.weight.grad is not None
    assert gate.noise.weight.grad.abs().sum() > 0  # softplus std gets a gradient through the kept logits


def test_no_noise_when_scale_is_zero() -> None:
    gate = Gate(8, E, GateConfig("noisy_topk", top_k=2, noise=0.0)).train()
    x = torch.randn(16, 8)
    assert gate.noise is None
    torch.testing.assert_close(gate(x), gate(x))


def test_set_top_k_lowers_k_and_rejects_bad_values() -> None:
    gate = noisy(4).eval()
    x = torch.randn(20, 8)
    before = gate(x)
    gate.set_top_k(1)
    after = gate(x)
    assert ((after > 0).sum(-1) == 1).all()
    assert torch.equal(after.argmax(-1), before.argmax(-1))
    torch.testing.assert_close(after.max(-1).values, torch.ones(20))
    for bad in (0, E + 1, -1, True, 2.0):
        with pytest.raises(ValueError, match=rf"top_k must be an integer in \[1, {E}\], got {bad!r}"):
            gate.set_top_k(bad)  # type: ignore[arg-type]
    assert gate.top_k == 1  # a rejected value changes nothing


def test_set_top_k_sparsifies_a_dense_gate() -> None:
    torch.manual_seed(0)
    gate = Gate(8, E).eval()
    gate.set_top_k(3)
    assert ((gate(torch.randn(7, 8)) > 0).sum(-1) == 3).all()


def test_gate_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    gate = Gate(8, E, GateConfig(dropout=0.5))
    plain = Gate(8, E)
    plain.load_state_dict(gate.state_dict())
    x = torch.randn(200, 8)
    torch.testing.assert_close(gate.eval()(x), plain.eval()(x))
    w = gate.train()(x)
    torch.testing.assert_close(w.sum(-1), torch.ones(200))
    zeros = (w == 0).float().mean()
    assert 0.3 < zeros < 0.6  # about half the experts dropped
    assert ((w > 0).sum(-1) >= 1).all()  # never all


def test_drop_experts_never_empties_a_row() -> None:
    torch.manual_seed(0)
    one_hot = torch.zeros(500, E).scatter(1, torch.randint(0, E, (500, 1)), 1.0)  # top-1 rows
    w = drop_experts(one_hot, 0.9)
    torch.testing.assert_close(w, one_hot)  # dropping the only expert keeps the row as it was
    uniform = torch.full((500, E), 1 / E)
    w = drop_experts(uniform, 0.9)
    torch.testing.assert_close(w.sum(-1), torch.ones(500))
    assert ((w > 0).sum(-1) >= 1).all() and (w == 0).any()


def test_drop_experts_rejects_bad_p_and_has_finite_gradients() -> None:
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got 1.0"):
        drop_experts(torch.ones(2, 2) / 2, 1.0)
    logits = torch.randn(50, E, requires_grad=True)
    drop_experts(torch.softmax(logits, -1), 0.8).pow(2).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_gate_config_validates() -> None:
    with pytest.raises(ValueError, match=r"gate.kind must be one of \['softmax', 'noisy_topk', 'top_p', 'hash', "
                                         r"'expert_choice', 'shared_topk'\], got 'dense'"):
        GateConfig("dense")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gate.top_k must be an integer >= 1, got 0"):
        GateConfig(top_k=0)
    with pytest.raises(ValueError, match="gate.noise must be finite and >= 0, got -1.0"):
        GateConfig(noise=-1.0)
    with pytest.raises(ValueError, match=r"gate.dropout must be in \[0, 1\), got 1.5"):
        GateConfig(dropout=1.5)
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 3\], got 4"):
        Gate(8, 3, GateConfig("noisy_topk", top_k=4))
    dense = Gate(8, 3, GateConfig(top_k=4, noise=2.0))  # top_k and noise belong to noisy_topk only
    assert dense.top_k is None and dense.noise is None


def test_load_balance_is_zero_for_uniform_and_grows_with_polarization() -> None:
    uniform = torch.full((32, 3, E), 1 / E)  # (B, T, E)
    assert float(load_balance_loss(uniform)) < 1e-6
    mild = torch.softmax(torch.tensor([1.0, 0, 0, 0, 0, 0]), -1).expand(32, 3, E)
    polar = torch.zeros(32, 3, E)
    polar[..., 0] = 1.0
    assert 0 < float(load_balance_loss(mild)) < float(load_balance_loss(polar))
    # all on one expert: importance and load each have CV² = E - 1
    torch.testing.assert_close(load_balance_loss(polar), torch.tensor(2.0 * (E - 1)))


def test_load_balance_balanced_top_k_is_zero_and_gradient_flows() -> None:
    rows = torch.eye(E).repeat(4, 1)  # (B, E): every expert chosen by the same number of rows
    assert float(load_balance_loss(rows)) < 1e-6
    logits = torch.randn(40, E, requires_grad=True)
    load_balance_loss(torch.softmax(logits, -1)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_cv_squared_and_mix_experts() -> None:
    assert float(cv_squared(torch.tensor([3.0, 3.0, 3.0]))) == 0.0
    torch.testing.assert_close(cv_squared(torch.tensor([1.0, 3.0])), torch.tensor(0.25))
    w = torch.tensor([[[0.25, 0.75], [1.0, 0.0]]])  # (B=1, T=2, E=2)
    experts = torch.tensor([[[4.0, 0.0], [0.0, 8.0]]])  # (B=1, E=2, D=2)
    torch.testing.assert_close(mix_experts(w, experts), torch.tensor([[[1.0, 6.0], [4.0, 0.0]]]))
    assert mix_experts(w, experts.bfloat16()).dtype == torch.bfloat16
