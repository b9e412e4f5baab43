"""Sparse expert compute: each expert only on the rows routed to it equals the dense mixture.

Values and gradients (experts' parameters, the weights, the gate logits upstream) to 1e-5 against
``einsum('bte,bed->btd', weights, experts(x))``, for top-k weights, all-zero rows, an expert nobody
picks, one row and none; under bfloat16 autocast and inference mode; on a real :class:`Experts`
module; the dense/sparse chooser; and a ``torch.export`` with a dynamic batch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ranking.blocks import Experts, group_mixture, prefer_sparse, sparse_mixture
from ranking.gating import mix_experts

D, T, E, DIMS = 6, 3, 5, (7, 4)

Layers = list[tuple[torch.Tensor, torch.Tensor]]


def stacked_layers(seed: int = 0) -> Layers:
    """Per layer (E, Din, Dout) weights and (E, 1, Dout) biases that require grad."""
    g = torch.Generator().manual_seed(seed)
    layers, din = [], D
    for dout in DIMS:
        w = (torch.randn(E, din, dout, generator=g) / din**0.5).requires_grad_()
        b = (0.1 * torch.randn(E, 1, dout, generator=g)).requires_grad_()
        layers.append((w, b))
        din = dout
    return layers


def dense_mixture(layers: Layers, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The reference: every expert on every row, stacked (B, E, De), then the einsum."""
    outs = []
    for e in range(weights.shape[2]):
        h = x
        for w, b in layers:
            h = torch.relu(h @ w[e] + b[e])  # (B, Dout)
        outs.append(h)
    return mix_experts(weights, torch.stack(outs, dim=1))  # (B, T, De)


def top_k_logits(b: int, k: int, seed: int = 1) -> torch.Tensor:
    """(B, T, E) logits with -inf outside each (row, task)'s k largest: softmax gives top-k weights."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, T, E, generator=g)
    top = logits.topk(k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)


def zero_rows(logits: torch.Tensor) -> torch.Tensor:
    """Rows 0 and 2 routed nowhere (all-zero weights, as expert choice leaves rows no expert took)."""
    return torch.where(torch.isin(torch.arange(logits.shape[0]), torch.tensor([0, 2]))[:, None, None],
                       torch.full_like(logits, -1e9), logits)


def unpicked_expert(logits: torch.Tensor) -> torch.Tensor:
    """Expert 3 gets no row: its logits are -inf everywhere."""
    return logits.index_fill(2, torch.tensor([3]), float("-inf"))


def weights_of(logits: torch.Tensor) -> torch.Tensor:
    w = torch.softmax(logits, dim=-1)  # -inf -> exactly 0
    return torch.where(logits < -1e8, torch.zeros_like(w), w)  # the zero rows: a mask, as the routings do


CASES: dict[str, tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "top1": (16, lambda lg: lg),
    "top2": (16, lambda lg: lg),
    "zero_rows": (16, zero_rows),
    "unpicked_expert": (16, unpicked_expert),
    "one_row": (1, lambda lg: lg),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sparse_equals_dense_with_gradients(case: str) -> None:
    b, shape = CASES[case]
    layers = stacked_layers()
    x = torch.randn(b, D, generator=torch.Generator().manual_seed(2), requires_grad=True)
    logits = shape(top_k_logits(b, 1 if case == "top1" else 2)).requires_grad_()
    weights = weights_of(logits)
    active = weights.detach().ne(0).any(dim=1, keepdim=True).expand_as(weights)  # (B, T, E): pairs that ran
    if case == "zero_rows":
        assert not active[[0, 2]].any()
    if case == "unpicked_expert":
        assert not active[..., 3].any()
    params = [p for layer in layers for p in layer]
    got, want = sparse_mixture(layers, x, weights), dense_mixture(layers, x, weights)
    assert got.shape == (b, T, DIMS[-1])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(3))
    inputs = [*params, x, logits, weights]
    g_got = torch.autograd.grad((got * upstream).sum(), inputs, retain_graph=True)  # the gates' softmax is shared
    g_want = torch.autograd.grad((want * upstream).sum(), inputs)
    for a, w in zip(g_got[:-1], g_want[:-1], strict=True):  # parameters, x, the gate logits
        torch.testing.assert_close(a, w, atol=1e-5, rtol=0)
    # the weights' own gradient: equal where the expert ran, 0 (not <grad, output>) where it did not
    torch.testing.assert_close(g_got[-1][active], g_want[-1][active], atol=1e-5, rtol=0)
    assert g_got[-1][~active].eq(0).all()


def test_no_rows() -> None:
    layers = stacked_layers()
    x, weights = torch.zeros(0, D, requires_grad=True), torch.zeros(0, T, E, requires_grad=True)
    out = sparse_mixture(layers, x, weights)
    assert out.shape == (0, T, DIMS[-1])
    grads = torch.autograd.grad(out.sum(), [layers[0][0], x, weights])
    assert grads[0].eq(0).all() and grads[1].shape == (0, D)


def test_bfloat16_autocast() -> None:
    layers = stacked_layers()
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(2))
    weights = weights_of(top_k_logits(32, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = sparse_mixture(layers, x, weights), dense_mixture(layers, x, weights)
    assert got.dtype == want.dtype == torch.bfloat16
    # same bfloat16 matmuls; the sparse side adds its few terms in float32, the einsum in bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    g_got = torch.autograd.grad(got.float().sum(), layers[0][0])[0]
    g_want = torch.autograd.grad(want.float().sum(), layers[0][0])[0]
    torch.testing.assert_close(g_got, g_want, atol=2e-2, rtol=2e-2)


def test_inference_mode() -> None:
    layers = [(w.detach(), b.detach()) for w, b in stacked_layers()]
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(2))
    weights = weights_of(top_k_logits(20, 2))
    with torch.inference_mode():
        got = sparse_mixture(layers, x, weights)
    torch.testing.assert_close(got, dense_mixture(layers, x, weights), atol=1e-5, rtol=0)


def test_dropout_acts_in_training_only() -> None:
    layers = stacked_layers()
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(2))
    weights = weights_of(top_k_logits(64, 2))
    evaluated = sparse_mixture(layers, x, weights, dropout=0.5, training=False)
    torch.testing.assert_close(evaluated, dense_mixture(layers, x, weights), atol=1e-5, rtol=0)
    trained = sparse_mixture(layers, x, weights, dropout=0.5, training=True)
    assert not torch.equal(trained, evaluated)
    assert not torch.equal(trained, sparse_mixture(layers, x, weights, dropout=0.5, training=True))


def test_shapes_are_checked() -> None:
    layers = stacked_layers()
    with pytest.raises(ValueError, match="for 4 experts"):
        sparse_mixture(layers, torch.zeros(2, D), torch.zeros(2, T, 4))
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        Experts(D, DIMS, num_experts=E).mix(torch.zeros(2, D), torch.zeros(2, 3, 4))


@pytest.mark.parametrize("training", [False, True])
def test_experts_mix_equals_experts_then_mix_experts(training: bool) -> None:
    torch.manual_seed(0)
    experts = Experts(D, DIMS, num_experts=E).train(training)  # no dropout: training changes nothing else
    x = torch.randn(16, D)
    weights = weights_of(unpicked_expert(top_k_logits(16, 2)))
    params = list(experts.parameters())
    want = mix_experts(weights, experts(x))
    g_want = torch.autograd.grad(want.square().sum(), params)
    for sparse in (True, False, None):
        got = experts.mix(x, weights, sparse=sparse)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        for a, b in zip(torch.autograd.grad(got.square().sum(), params), g_want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # the unpicked expert's: zeros on both sides


def test_experts_mix_sparse_applies_the_experts_dropout() -> None:
    experts = Experts(D, DIMS, num_experts=E, dropout=0.5)
    x, weights = torch.randn(64, D), weights_of(top_k_logits(64, 2))
    assert not torch.equal(experts.train().mix(x, weights, sparse=True), experts.mix(x, weights, sparse=True))
    torch.testing.assert_close(experts.eval().mix(x, weights, sparse=True), mix_experts(weights, experts(x)),
                               atol=1e-5, rtol=0)


def exact_k(b: int, e: int, k: int) -> torch.Tensor:
    """(B, T, E) weights with the same k of E experts non-zero for every task of a row."""
    g = torch.Generator().manual_seed(0)
    pick = torch.rand(b, e, generator=g).argsort(dim=1)[:, :k]
    mask = torch.zeros(b, e, dtype=torch.bool).scatter_(1, pick, True)
    logits = torch.randn(b, 4, e, generator=g).masked_fill(~mask.unsqueeze(1), float("-inf"))
    return torch.softmax(logits, dim=-1)


def test_chooser_picks_sparse_for_large_experts_at_low_k_and_dense_for_tiny_dense_experts() -> None:
    large, tiny = Experts(256, (512, 256), num_experts=16), Experts(256, (128, 64), num_experts=4)
    assert large.row_macs == 256 * 512 + 512 * 256
    with torch.inference_mode():
        assert prefer_sparse(exact_k(1000, 16, 2), large.row_macs)
        assert prefer_sparse(exact_k(100, 16, 1), large.row_macs)
        assert not prefer_sparse(exact_k(1000, 16, 16), large.row_macs)  # nothing to skip
        assert not prefer_sparse(exact_k(100, 4, 4), tiny.row_macs)
        assert not prefer_sparse(exact_k(1, 4, 1), tiny.row_macs)  # one row: fixed costs dominate


def test_chooser_decides_for_experts_mix(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def counting(*args: object) -> torch.Tensor:
        calls.append(1)
        return group_mixture(*args)  # type: ignore[arg-type]

    monkeypatch.setattr("ranking.blocks.group_mixture", counting)
    large, tiny = Experts(256, (512, 256), num_experts=16).eval(), Experts(256, (128, 64), num_experts=4).eval()
    with torch.inference_mode():
        large.mix(torch.randn(200, 256), exact_k(200, 16, 2))
        assert calls == [1]
        tiny.mix(torch.randn(100, 256), exact_k(100, 4, 4))
        assert calls == [1]


class _Mixture(torch.nn.Module):
    def __init__(self, layers: Layers) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return sparse_mixture(self.layers, x, weights)


def test_exports_with_a_dynamic_batch() -> None:
    layers = [(w.detach(), b.detach()) for w, b in stacked_layers()]
    batch = torch.export.Dim("batch")
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(2))
    program = torch.export.export(_Mixture(layers), (x, weights_of(top_k_logits(8, 2))),
                                  dynamic_shapes=({0: batch}, {0: batch}))
    assert "nonzero" in str(program.graph)  # the rows per expert are data-dependent (unbacked) sizes
    exported = program.module()
    for b, logits in ((1, top_k_logits(1, 1)), (3, top_k_logits(3, 2)), (40, zero_rows(top_k_logits(40, 2)))):
        x, weights = torch.randn(b, D), weights_of(logits)
        torch.testing.assert_close(exported(x, weights), dense_mixture(layers, x, weights), atol=1e-5, rtol=0)
    none = torch.zeros(5, T, E)
    assert exported(torch.randn(5, D), none).eq(0).all()


# Inductor's own imports touch deprecated torch.jit entry points, and export pickles pytree specs
# with a check torch deprecated (torch 2.13); not ours to fix.
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*")
@pytest.mark.filterwarnings(r"ignore:.*isinstance\(treespec, LeafSpec\):FutureWarning")
def test_compiles_with_aot_inductor(tmp_path: Path) -> None:
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    layers = [(w.detach(), b.detach()) for w, b in stacked_layers()]
    batch = torch.export.Dim("batch")
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        program = torch.export.export(_Mixture(layers), (x, weights_of(top_k_logits(8, 2))),
                                      dynamic_shapes=({0: batch}, {0: batch}))
        compiled = aoti_load_package(aoti_compile_and_package(program, package_path=str(tmp_path / "mix.pt2")))
    for b in (0, 1, 30):
        x, weights = torch.randn(b, D), weights_of(zero_rows(top_k_logits(b, 2)) if b > 2 else top_k_logits(b, 1))
        torch.testing.assert_close(compiled(x, weights), dense_mixture(layers, x, weights), atol=1e-5, rtol=0)


def test_swish_experts_are_the_same_network_stacked_sparse_and_one_by_one() -> None:
    """``activation="silu"``: run_stacked, the sparse mixture of stacked layers and Experts.mix agree
    with each expert module run on its own (Swish has no zero region, so a ReLU left anywhere shows)."""
    from ranking.blocks import run_stacked
    from ranking.fused import _stack_layers

    torch.manual_seed(0)
    experts = Experts(6, (8, 5), num_experts=4, activation="silu").eval()
    x = torch.randn(30, 6)
    one_by_one = torch.stack([m(x) for m in experts], dim=1)  # (B, E, De)
    assert (one_by_one < 0).any()  # Swish goes below zero; ReLU would not
    torch.testing.assert_close(run_stacked(list(experts), x), one_by_one)
    w = torch.zeros(30, 2, 4).index_fill_(2, torch.tensor([1, 3]), 0.5)
    want = torch.einsum("bte,bed->btd", w, one_by_one)
    torch.testing.assert_close(experts.mix(x, w, sparse=True), want)
    weights, biases = _stack_layers(list(experts))
    torch.testing.assert_close(sparse_mixture(list(zip(weights, biases, strict=True)), x, w, activation="silu"), want)
