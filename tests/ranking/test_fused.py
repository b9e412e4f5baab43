"""The fused serving network equals the training network, on the same rows.

``FusedScorer`` looks request-side features up once per request, gathers every table of a side
from one flat buffer, splits the first layer into a per-request and a per-candidate part and
stacks MMoE's experts, gates and towers. None of that may change a logit: for every model variant
and gate, with features all request-side, all item-side or mixed (multi-valued ones on both
sides, sum and mean pooling, empty and null lists), its (T, N) logits are held to 1e-5 of
``model(sparse, dense, None).logits`` on a ``FeatureTable`` of the reference transform's frame.

Shape letters: R requests, N candidates, T tasks.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch

from features.columns import Jagged
from features.fitted import FittedTransform
from features.plan import RawRequest, ServingPlan
from features.spec import FeatureSpec, parse_spec
from ranking.artifact import build_model, export_artifact
from ranking.batch import FeatureTable
from ranking.config import GateConfig, ModelConfig
from ranking.fused import FusedScorer
from ranking.inference import InferenceModel
from ranking.mmoe import MMoE
from ranking.models import RankingModel

TOLERANCE = 1e-5  # max abs difference of logits: float32 sums in another order, nothing more

# raw column -> (source, kind)
COLUMNS = {
    "u": ("user", "int"), "u_tags": ("user", "list[int]"), "u_age": ("user", "float"),
    "ctx": ("context", "str"), "c_words": ("context", "list[str]"), "c_hour": ("context", "float"),
    "i": ("item", "int"), "i_tags": ("item", "list[int]"), "i_cat": ("item", "str"),
    "i_words": ("item", "list[str]"), "i_price": ("item", "float"), "i_age": ("item", "float"),
}  # fmt: skip
DTYPES: dict[str, pl.DataType] = {
    "int": pl.Int64(), "float": pl.Float64(), "str": pl.String(),
    "list[int]": pl.List(pl.Int64), "list[str]": pl.List(pl.String),
}  # fmt: skip
# Config order interleaves the sides (and widths differ), so the fused front's permutation matters.
SPARSE: list[dict[str, Any]] = [
    {"name": "u", "source": "user", "embedding_dim": 4},
    {"name": "i", "source": "item", "embedding_dim": 4},
    {"name": "i_tags", "source": "item", "multi": True, "pooling": "mean", "max_len": 4, "embedding_dim": 6},
    {"name": "ctx", "source": "context", "embedding_dim": 3},
    {"name": "u_tags", "source": "user", "multi": True, "pooling": "sum", "max_len": 3, "embedding_dim": 4},
    {"name": "i_cat", "source": "item", "hash_buckets": 7, "embedding_dim": 5},
    {"name": "c_words", "source": "context", "multi": True, "pooling": "mean", "max_len": 2, "embedding_dim": 5},
    {"name": "u_x_i", "source": "item", "cross": ["u", "i"], "embedding_dim": 4},
    {"name": "i_words", "source": "item", "multi": True, "pooling": "sum", "hash_buckets": 11, "embedding_dim": 3},
]
DENSE: list[dict[str, Any]] = [
    {"name": "i_price", "source": "item", "transform": "log1p"},
    {"name": "u_age", "source": "user", "fill_null": 30.0},
    {"name": "i_age", "source": "item", "scale": "minmax"},
    {"name": "c_hour", "source": "context", "scale": "minmax"},
]
TASKS = [
    {"name": "click", "type": "binary", "label": "click", "group": "engagement"},
    {"name": "watch", "type": "regression", "label": "watch", "group": "engagement"},
    {"name": "like", "type": "binary", "label": "like", "group": "satisfaction"},
]
LAYOUTS = ("mixed", "request", "item")
SMALL = {"bottom_dims": (16,), "expert_dims": (12, 8), "tower_dims": (6,), "num_experts": 3}
MODELS: dict[str, dict[str, Any]] = {
    "mmoe": {},
    "mmoe_no_bottom": {"bottom_dims": ()},
    "mmoe_two_layer_bottom_dropout": {"bottom_dims": (16, 12), "dropout": 0.2, "gate": GateConfig(dropout=0.1)},
    "mmoe_noisy_topk": {"gate": GateConfig("noisy_topk", top_k=2), "num_experts": 4},
    "mmoe_noisy_topk_no_bottom": {"gate": GateConfig("noisy_topk", top_k=1), "num_experts": 4, "bottom_dims": ()},
    "mmoe_top_p": {"gate": GateConfig("top_p", top_p=0.7), "num_experts": 4},
    "mmoe_top_p_no_bottom": {"gate": GateConfig("top_p", top_p=0.9, max_experts=2), "num_experts": 4,
                             "bottom_dims": ()},
    "mmoe_hash": {"gate": GateConfig("hash"), "num_experts": 4},
    "mmoe_hash_no_bottom": {"gate": GateConfig("hash"), "num_experts": 4, "bottom_dims": ()},
    "mmoe_expert_choice": {"gate": GateConfig("expert_choice", top_k=1), "num_experts": 4},
    "mmoe_expert_choice_no_bottom": {"gate": GateConfig("expert_choice", top_k=2, capacity_factor=0.5),
                                     "num_experts": 4, "bottom_dims": ()},
    "mmoe_shared_topk": {"gate": GateConfig("shared_topk", top_k=2), "num_experts": 4},
    "mmoe_shared_topk_no_bottom": {"gate": GateConfig("shared_topk", top_k=1, private_experts=2), "num_experts": 3,
                                   "bottom_dims": ()},
    "mmoe_tower_batch_norm": {"tower_norm": "batch"},
    "mmoe_tower_batch_norm_no_bottom_top_k": {"tower_norm": "batch", "bottom_dims": (),
                                              "gate": GateConfig("noisy_topk", top_k=1), "num_experts": 4},
    "mmoe_swish_experts": {"expert_activation": "silu"},
    "mmoe_swish_experts_no_bottom_top_k": {"expert_activation": "silu", "bottom_dims": (),
                                           "gate": GateConfig("noisy_topk", top_k=1), "num_experts": 4},
    "mmoe_expert_batch_norm": {"expert_norm": "batch"},
    "mmoe_expert_batch_norm_no_bottom_top_k": {"expert_norm": "batch", "bottom_dims": (),
                                               "gate": GateConfig("noisy_topk", top_k=1), "num_experts": 4},
    "mmoe_feature_gate": {"feature_gate_dim": 8},
    "mmoe_feature_gate_no_bottom_top_k": {"feature_gate_dim": 8, "bottom_dims": (),
                                          "gate": GateConfig("noisy_topk", top_k=1), "num_experts": 4},
    "mmoe_cross_full_rank": {"cross_layers": 2},
    "mmoe_cross_low_rank_no_bottom": {"cross_layers": 2, "cross_rank": 4, "bottom_dims": ()},
    "mmoe_cross_mixture_gate_no_bottom_expert_choice": {
        "cross_layers": 1, "cross_rank": 3, "cross_experts": 2, "feature_gate_dim": 6, "bottom_dims": (),
        "gate": GateConfig("expert_choice", top_k=1), "num_experts": 4},
    "omoe": {"model": "omoe"},
    "omoe_top_p": {"model": "omoe", "gate": GateConfig("top_p", top_p=0.6)},
    "omoe_noisy_topk_no_bottom": {"model": "omoe", "gate": GateConfig("noisy_topk", top_k=2), "bottom_dims": ()},
    "ple": {"model": "ple", "ple_levels": 2, "num_task_experts": 1, "num_shared_experts": 2},
    "ple_tower_batch_norm": {"model": "ple", "tower_norm": "batch"},
    "ple_swish_experts": {"model": "ple", "expert_activation": "silu"},
    "ple_cgc_no_bottom": {"model": "ple", "ple_levels": 1, "bottom_dims": ()},
    "ple_expert_batch_norm": {"model": "ple", "expert_norm": "batch"},
    "ple_cross_low_rank": {"model": "ple", "cross_layers": 1, "cross_rank": 2},
    "shared_bottom": {"model": "shared_bottom"},
    "shared_bottom_feature_gate": {"model": "shared_bottom", "feature_gate_dim": 5},
    "single_task": {"model": "single_task"},
    "single_task_cross_no_bottom": {"model": "single_task", "cross_layers": 2, "bottom_dims": ()},
    "single_task_no_bottom": {"model": "single_task", "bottom_dims": ()},
}


def spec_for(layout: str) -> FeatureSpec:
    """The spec's features on one side only (``request``: user and context; ``item``), or both."""

    def keep(f: dict[str, Any]) -> bool:
        sides = {COLUMNS[c][0] != "item" for c in f.get("cross", [f["name"]])}
        return layout == "mixed" or sides == {layout == "request"}

    return parse_spec({
        "name": f"fused_{layout}", "position": None,
        "keys": {"request": None, "user": None, "item": None, "timestamp": None},
        "sparse": [f for f in SPARSE if keep(f)], "dense": [d for d in DENSE if keep(d)], "tasks": TASKS,
    })


def random_columns(rng: np.random.Generator, n: int, fit: bool) -> dict[str, list[Any]]:
    """Raw rows column-wise; outside the fit rows with unseen ids, nulls, and null or long lists."""
    p_null = 0.0 if fit else 0.1

    def maybe(v: Any) -> Any:
        return None if rng.random() < p_null else v

    def ids(high: int) -> int:
        return int(rng.integers(0, high if fit else high + 5))  # the last 5 never seen

    def words(pool: int, longest: int) -> list[str]:
        return [f"w{int(rng.integers(0, pool))}é" for _ in range(int(rng.integers(0, longest + 1)))]

    cols: dict[str, list[Any]] = {c: [] for c in COLUMNS}
    for _ in range(n):
        cols["u"].append(maybe(ids(30)))
        cols["u_tags"].append(maybe([ids(12) for _ in range(int(rng.integers(0, 6)))]))
        cols["u_age"].append(maybe(float(rng.normal(40, 12))))
        cols["ctx"].append(maybe(["home", "feed", "search", "", "news"][int(rng.integers(0, 4 if fit else 5))]))
        cols["c_words"].append(maybe(words(8, 4)))
        cols["c_hour"].append(maybe(float(rng.integers(0, 24))))
        cols["i"].append(maybe(ids(50)))
        cols["i_tags"].append(maybe([ids(20) for _ in range(int(rng.integers(0, 7)))]))
        cols["i_cat"].append(maybe(f"cat{ids(9)}"))
        cols["i_words"].append(maybe(words(15, 5)))
        cols["i_price"].append(maybe(float(rng.lognormal(3, 1))))
        cols["i_age"].append(maybe(float(rng.exponential(20))))
    return cols


def frame(cols: dict[str, list[Any]], spec: FeatureSpec) -> pl.DataFrame:
    wanted = {*spec.features_from("user"), *spec.features_from("context"), *spec.features_from("item")}
    n = len(cols["u"])
    out = {c: pl.Series(c, cols[c], dtype=DTYPES[k]) for c, (_, k) in COLUMNS.items() if c in wanted}
    return pl.DataFrame(out, height=n)


def slates(cols: dict[str, list[Any]], spec: FeatureSpec, rng: np.random.Generator,
           ) -> tuple[dict[str, list[Any]], list[RawRequest]]:
    """Rows grouped into requests of 1..9 candidates sharing the first row's user and context
    (the rows are changed to match); candidate columns as a client or the decoder gives them."""
    out = {c: list(v) for c, v in cols.items()}
    n = len(cols["u"])
    bounds = [0]
    while bounds[-1] < n:
        bounds.append(min(n, bounds[-1] + int(rng.integers(1, 10))))
    requests: list[RawRequest] = []
    for k, (a, b) in enumerate(itertools.pairwise(bounds)):
        user = {c: cols[c][a] for c in spec.features_from("user")}
        context = {c: cols[c][a] for c in spec.features_from("context")}
        for c in (*user, *context):
            out[c][a:b] = [cols[c][a]] * (b - a)
        cands: dict[str, Any] = {"item_key": np.arange(a, b)}  # not a feature: counts the candidates
        for c in spec.features_from("item"):
            part, kind = out[c][a:b], COLUMNS[c][1]
            if k % 2 and kind.startswith("list"):
                cands[c] = Jagged.from_lists(pl.Series(part, dtype=DTYPES[kind]))
            elif k % 2 and None not in part:
                cands[c] = np.array(part)
            else:
                cands[c] = part
        requests.append((user, context, cands))
    return out, requests


def network(cfg: ModelConfig, seed: int) -> RankingModel:
    """``build_model(cfg)`` with weights of trained magnitude: untrained towers give logits that
    differ across rows by about 1e-3, too little for a 1e-5 tolerance to mean much."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ".t_" in f".{name}":  # embedding tables
                p.normal_(0.0, 1.0)
            elif name.startswith("cross."):  # x0 * (W x + b) + x: small W keeps each layer's output O(x0)
                p.normal_(0.0, 0.3 / p.shape[-1] ** 0.5)
            elif p.dim() == 2:  # linear layers: variance kept through the ReLUs
                p.normal_(0.0, 1.6 / p.shape[1] ** 0.5)
            elif p.dim() == 1 and name.endswith(".weight"):  # batch norms' scales
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.2)
        for name, buf in model.named_buffers():  # batch norms: running statistics as after training
            if name.endswith("running_mean"):
                buf.normal_(0.0, 0.5)
            elif name.endswith("running_var"):
                buf.uniform_(0.3, 2.0)
    return model.eval()


def reference_logits(model: RankingModel, fitted: FittedTransform, rows: pl.DataFrame,
                     requests: list[RawRequest] | None = None) -> torch.Tensor:
    """(T, N) logits of the training network on the reference transform's rows; with ``requests``
    (the rows' requests, in order) an MMoE's expert choice groups the rows by request, as serving does."""
    ready = fitted.transform(rows.lazy(), with_labels=False).collect()
    batch = FeatureTable(ready.drop("position", strict=False), model.config).all()
    model.eval()
    with torch.no_grad():
        if isinstance(model, MMoE) and requests is not None:
            sizes = [len(r[2]["item_key"]) for r in requests]
            groups = torch.from_numpy(np.repeat(np.arange(len(sizes)), sizes))
            out = model(batch.sparse, batch.dense, None, groups=groups).logits
        else:
            out = model(batch.sparse, batch.dense, None).logits
    return torch.stack([out[t.name] for t in model.config.tasks])


@pytest.fixture(scope="module", params=LAYOUTS)
def layout(request: pytest.FixtureRequest) -> tuple[str, FittedTransform, pl.DataFrame, list[RawRequest]]:
    spec = spec_for(request.param)
    rng = np.random.default_rng(LAYOUTS.index(request.param))
    fitted = FittedTransform.fit(frame(random_columns(rng, 600, fit=True), spec).lazy(), spec)
    shared, requests = slates(random_columns(rng, 160, fit=False), spec, rng)
    return request.param, fitted, frame(shared, spec), requests


def fused_and_reference(fitted: FittedTransform, rows: pl.DataFrame, requests: list[RawRequest],
                        model: RankingModel) -> tuple[torch.Tensor, torch.Tensor]:
    plan = ServingPlan.from_fitted(fitted)
    scorer = FusedScorer(model, plan)
    with torch.inference_mode():
        got = scorer(*scorer.inputs(plan.encode(requests)))
    return got, reference_logits(model, fitted, rows, requests)


# ------------------------------------------------------------------------------------------- tests
def test_layouts_put_features_where_they_say(layout: tuple[str, FittedTransform, pl.DataFrame, list[RawRequest]],
                                             ) -> None:
    name, fitted, _, requests = layout
    plan = ServingPlan.from_fitted(fitted)
    sides = {plan.side(f.name) for f in fitted.spec.sparse} | {plan.side(d.name) for d in fitted.spec.dense}
    assert sides == {"mixed": {"request", "item"}, "request": {"request"}, "item": {"item"}}[name]
    multi = [f for f in fitted.spec.sparse if f.multi]
    assert {f.pooling for f in multi} == {"sum", "mean"}
    assert len(requests) > 20 and max(len(r[2]["item_key"]) for r in requests) > 1


@pytest.mark.parametrize("variant", list(MODELS))
def test_fused_logits_equal_the_training_network(
    layout: tuple[str, FittedTransform, pl.DataFrame, list[RawRequest]], variant: str
) -> None:
    _, fitted, rows, requests = layout
    cfg = ModelConfig.from_fitted(fitted, **{**SMALL, **MODELS[variant]})
    model = network(cfg, seed=7)
    got, want = fused_and_reference(fitted, rows, requests, model)
    assert got.shape == want.shape == (len(cfg.tasks), rows.height)
    spread = want.std(dim=1).min().item()  # the rows differ: equal logits would prove nothing
    assert spread > 0.01, spread  # a thousand times the tolerance
    assert (got - want).abs().max().item() <= TOLERANCE


def test_lists_empty_for_every_row_still_match(layout: tuple[str, FittedTransform, pl.DataFrame, list[RawRequest]],
                                               ) -> None:
    """Every list empty or null: embedding bags pool to zeros on both paths (mean pooling of nothing)."""
    _, fitted, _, _ = layout
    spec = fitted.spec
    rng = np.random.default_rng(21)
    cols = random_columns(rng, 90, fit=False)
    for c, (_, kind) in COLUMNS.items():
        if kind.startswith("list"):
            cols[c] = [[] if i % 3 else None for i in range(90)]
    shared, requests = slates(cols, spec, rng)
    cfg = ModelConfig.from_fitted(fitted, **SMALL)
    got, want = fused_and_reference(fitted, frame(shared, spec), requests, network(cfg, seed=3))
    assert (got - want).abs().max().item() <= TOLERANCE


def test_top_k_set_before_the_scorer_is_built_is_kept(
    layout: tuple[str, FittedTransform, pl.DataFrame, list[RawRequest]],
) -> None:
    """``set_top_k`` on a softmax-gated MMoE (sparser inference without retraining) reaches the fused head."""
    _, fitted, rows, requests = layout
    model = network(ModelConfig.from_fitted(fitted, **{**SMALL, "num_experts": 4}), seed=5)
    dense_gates = reference_logits(model, fitted, rows)
    model.set_top_k(1)
    got, want = fused_and_reference(fitted, rows, requests, model)
    assert (want - dense_gates).abs().max().item() > 1e-3  # top-1 really changes the logits
    assert (got - want).abs().max().item() <= TOLERANCE


def test_a_dense_only_model_matches() -> None:
    spec = parse_spec({
        "name": "dense_only", "position": None, "sparse": [], "dense": DENSE, "tasks": TASKS,
        "keys": {"request": None, "user": None, "item": None, "timestamp": None},
    })
    rng = np.random.default_rng(9)
    fitted = FittedTransform.fit(frame(random_columns(rng, 300, fit=True), spec).lazy(), spec)
    shared, requests = slates(random_columns(rng, 80, fit=False), spec, rng)
    for variant in ("mmoe", "mmoe_no_bottom", "ple", "single_task_no_bottom"):
        model = network(ModelConfig.from_fitted(fitted, **{**SMALL, **MODELS[variant]}), seed=1)
        got, want = fused_and_reference(fitted, frame(shared, spec), requests, model)
        assert want.std(dim=1).min().item() > 1e-3
        assert (got - want).abs().max().item() <= TOLERANCE, variant


@pytest.mark.parametrize("variant", ["mmoe", "mmoe_expert_choice", "mmoe_expert_choice_no_bottom", "mmoe_hash",
                                     "mmoe_shared_topk"])
def test_batched_requests_score_as_each_alone(layout: tuple[str, FittedTransform, pl.DataFrame, list[RawRequest]],
                                              variant: str) -> None:
    """A request's scores never depend on the other requests of its batch (expert choice included:
    its experts choose among one request's candidates)."""
    _, fitted, _, requests = layout
    plan = ServingPlan.from_fitted(fitted)
    cfg = ModelConfig.from_fitted(fitted, **{**SMALL, **MODELS[variant]})
    scorer = FusedScorer(network(cfg, seed=2), plan)
    together = scorer.score(plan.encode(requests))
    alone = torch.cat([scorer.score(plan.encode([r])) for r in requests], dim=1)
    assert (together - alone).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("variant", ["mmoe", "mmoe_noisy_topk_no_bottom", "mmoe_expert_choice", "ple", "single_task"])
def test_inference_model_serving_path_equals_reference_path(
    layout: tuple[str, FittedTransform, pl.DataFrame, list[RawRequest]], variant: str, tmp_path: Path
) -> None:
    """An exported artifact: ``score_requests`` (plan + fused) equals ``reference_score_requests``."""
    _, fitted, _, requests = layout
    cfg = ModelConfig.from_fitted(fitted, **{**SMALL, **MODELS[variant]})
    model = InferenceModel(export_artifact(network(cfg, seed=11), cfg, fitted, tmp_path / "artifact"))
    served = model.score_requests(requests)
    reference = model.reference_score_requests(requests)
    assert len(served) == len(reference) == len(requests)
    for got, want, (_, _, cands) in zip(served, reference, requests, strict=True):
        for task in model.tasks:
            assert got[task].shape == want[task].shape == (len(cands["item_key"]),)
            np.testing.assert_allclose(got[task], want[task], atol=TOLERANCE, rtol=0, err_msg=task)
    click = np.concatenate([s["click"] for s in served])
    assert ((click > 0) & (click < 1)).all() and click.std() > 1e-4  # probabilities, and not all alike


def _count_sparse_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one per sparse mixture the fused head runs (on the bottom's output or
    on the split front)."""
    import ranking.fused as fused

    calls: list[int] = []
    for name in ("sparse_mixture", "group_mixture"):
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    return calls


ROUTED = [v for v in MODELS if v.startswith("mmoe_") and "gate" in MODELS[v] and MODELS[v]["gate"].kind != "softmax"]


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("variant", ROUTED)
def test_a_routed_head_scores_the_same_with_each_expert_on_its_rows_only(
    layout: tuple[str, FittedTransform, pl.DataFrame, list[RawRequest]], variant: str, sparse: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fused head's two ways to mix a routed pool (every expert on every row, or each expert on
    the rows routed to it) give the training network's logits; the test forces each way and checks
    that it was the one taken."""
    import ranking.fused as fused

    _, fitted, rows, requests = layout
    cfg = ModelConfig.from_fitted(fitted, **{**SMALL, **MODELS[variant]})
    model = network(cfg, seed=13)
    calls = _count_sparse_calls(monkeypatch)
    monkeypatch.setattr(fused, "prefer_sparse", lambda g, macs: sparse)
    got, want = fused_and_reference(fitted, rows, requests, model)
    assert len(calls) == (1 if sparse else 0)
    assert want.std(dim=1).min().item() > 0.01
    assert (got - want).abs().max().item() <= TOLERANCE


BIG = {**SMALL, "expert_dims": (1024, 64), "num_experts": 16}  # large enough for the sparse mixture to pay


def test_large_experts_run_sparse_and_small_or_dense_pools_do_not(
    layout: tuple[str, FittedTransform, pl.DataFrame, list[RawRequest]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """16 experts of [1024, 64] at top-1: the cost rule picks the sparse mixture at load (for the
    exported network) and per call (eager); the dense softmax never, nor top-1 of the small pool."""

    _, fitted, rows, requests = layout
    plan = ServingPlan.from_fitted(fitted)
    softmax = FusedScorer(network(ModelConfig.from_fitted(fitted, **BIG), seed=3), plan)
    assert softmax.mmoe is not None and not softmax.mmoe.may_sparse
    small = FusedScorer(network(ModelConfig.from_fitted(fitted, **{**SMALL, **MODELS["mmoe_noisy_topk_no_bottom"]}),
                                seed=3), plan)
    assert small.mmoe is not None and small.mmoe.may_sparse and not small.mmoe.sparse_when_exported
    model = network(ModelConfig.from_fitted(fitted, **BIG, gate=GateConfig("noisy_topk", top_k=1)), seed=3)
    scorer = FusedScorer(model, plan)
    head = scorer.mmoe
    assert head is not None and head.may_sparse and head.sparse_when_exported
    assert head.pairs_per_row == len(model.config.tasks) == 3  # top-1 per task: at most 3 of 16 experts a row
    calls = _count_sparse_calls(monkeypatch)
    with torch.inference_mode():
        got = scorer(*scorer.inputs(plan.encode(requests)))
        small(*small.inputs(plan.encode(requests)))
    assert calls == [1]  # eager chose sparse for the 160 candidates of the large pool, dense for the small one
    want = reference_logits(model, fitted, rows, requests)
    assert want.std(dim=1).min().item() > 0.01
    assert (got - want).abs().max().item() <= 1e-4  # 1024-wide sums in another order


@pytest.mark.parametrize("layout", ["mixed"], indirect=True)  # the one-sided layouts do not export (see below)
@pytest.mark.parametrize("kind", ["noisy_topk", "hash", "expert_choice", "shared_topk"])
def test_the_exported_sparse_network_scores_like_eager_at_any_batch_size(
    layout: tuple[str, FittedTransform, pl.DataFrame, list[RawRequest]], kind: str,
) -> None:
    """The network ``compile`` exports, with the sparse mixture chosen at load and a dynamic batch,
    equals eager on batch sizes other than its example's. (With every feature on one side, the
    other side's (R, 0) or (N, 0) inputs pin a dimension, so ``InferenceModel.compile`` falls back
    to eager there; the softmax network does the same.)"""
    from ranking.inference import _probe  # the example compile exports with: no dimension of 0 or 1

    _, fitted, _, requests = layout
    plan = ServingPlan.from_fitted(fitted)
    gate = GateConfig(kind, top_k=1)
    scorer = FusedScorer(network(ModelConfig.from_fitted(fitted, **BIG, gate=gate), seed=4), plan)
    assert scorer.mmoe is not None and scorer.mmoe.sparse_when_exported
    program = scorer.export(plan.encode([_probe(fitted, 3)] * 2)).module()
    with torch.inference_mode():
        for part in (requests, requests[3:4], requests[5:12]):
            b = plan.encode(part)
            assert (program(*scorer.inputs(b)) - scorer.score(b)).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("layout", ["mixed"], indirect=True)
@pytest.mark.parametrize("variant", ["mmoe_cross_mixture_gate_no_bottom_expert_choice", "mmoe_cross_full_rank",
                                     "mmoe_expert_batch_norm"])
def test_the_exported_network_with_interactions_scores_like_eager(
    layout: tuple[str, FittedTransform, pl.DataFrame, list[RawRequest]], variant: str,
) -> None:
    """A feature gate, TorchRec's cross networks and folded expert batch norms export with a dynamic batch."""
    from ranking.inference import _probe

    _, fitted, _, requests = layout
    plan = ServingPlan.from_fitted(fitted)
    scorer = FusedScorer(network(ModelConfig.from_fitted(fitted, **{**SMALL, **MODELS[variant]}), seed=4), plan)
    program = scorer.export(plan.encode([_probe(fitted, 3)] * 2)).module()
    with torch.inference_mode():
        for part in (requests, requests[3:4], requests[5:12]):
            b = plan.encode(part)
            assert (program(*scorer.inputs(b)) - scorer.score(b)).abs().max().item() <= TOLERANCE
