"""The model family on a tiny hand-made config: shapes, golden values, training, config round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F
from torchrec import KeyedJaggedTensor

from features.fitted import FittedTransform
from ranking.artifact import build_model
from ranking.config import MODEL_KINDS, GateConfig, ModelConfig, SparseSlot, TaskHead
from ranking.gating import Gate
from ranking.mmoe import MMoE
from ranking.models import PLE, ExtractionLevel, ModelOutput, OMoE, RankingModel, SharedBottom, SingleTask

B = 16
TASKS = (
    TaskHead("click", "binary", "engagement"),
    TaskHead("watch", "regression", "engagement"),
    TaskHead("like", "binary", "satisfaction"),
)
GATED = ("omoe", "mmoe", "ple")


def tiny(model: str, **overrides: Any) -> ModelConfig:
    base = ModelConfig(
        sparse=(SparseSlot("user", 20, 4), SparseSlot("tags", 30, 3, pooling="mean", multi=True, max_len=3)),
        dense=("age", "hour"),
        tasks=TASKS,
        model=model,  # type: ignore[arg-type]
        position_buckets=4,
        bottom_dims=(8,),
        expert_dims=(6, 5),
        tower_dims=(4,),
        num_experts=3,
        num_task_experts=1,
        num_shared_experts=2,
        ple_levels=2,
    )
    return dataclasses.replace(base, **overrides)


@dataclasses.dataclass
class TinyBatch:
    sparse: KeyedJaggedTensor
    user: torch.Tensor  # (B,)
    tags: torch.Tensor  # (N,) values
    tag_offsets: torch.Tensor  # (B,) start of each row's tags
    dense: torch.Tensor  # (B, 2)
    position: torch.Tensor  # (B,)
    labels: dict[str, torch.Tensor]


def tiny_batch(seed: int = 0) -> TinyBatch:
    g = torch.Generator().manual_seed(seed)
    user = torch.randint(0, 20, (B,), generator=g)
    tag_len = torch.randint(0, 4, (B,), generator=g)  # some rows have no tags
    tags = torch.randint(0, 30, (int(tag_len.sum()),), generator=g)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["user", "tags"], torch.cat([user, tags]), torch.cat([torch.ones(B, dtype=torch.long), tag_len])
    )
    labels = {
        "click": torch.randint(0, 2, (B,), generator=g).float(),
        "watch": torch.randn(B, generator=g),
        "like": torch.randint(0, 2, (B,), generator=g).float(),
    }
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), tag_len.cumsum(0)[:-1]])
    return TinyBatch(kjt, user, tags, offsets, torch.randn(B, 2, generator=g), torch.randint(0, 6, (B,), generator=g),
                     labels)


def total_loss(out: ModelOutput, batch: TinyBatch) -> torch.Tensor:
    return (
        F.binary_cross_entropy_with_logits(out.logits["click"], batch.labels["click"])
        + F.mse_loss(out.logits["watch"], batch.labels["watch"])
        + F.binary_cross_entropy_with_logits(out.logits["like"], batch.labels["like"])
    )


def experts_per_gate(cfg: ModelConfig) -> int:
    return cfg.num_task_experts + cfg.num_shared_experts if cfg.model == "ple" else cfg.num_experts


# --- an independent re-implementation from the state_dict, plain tensor ops ---------------------------------

def _mlp(sd: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, layers: int) -> torch.Tensor:
    for i in range(layers):  # Linear, ReLU pairs (no dropout in these configs): linears at 0, 2, 4, ...
        x = torch.relu(x @ sd[f"{prefix}.{2 * i}.weight"].T + sd[f"{prefix}.{2 * i}.bias"])
    return x


def _softmax_gate(sd: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, top_k: int | None) -> torch.Tensor:
    logits = x @ sd[f"{prefix}.proj.weight"].T + sd[f"{prefix}.proj.bias"]  # (B, E)
    if top_k is not None:
        kth = logits.sort(dim=-1, descending=True).values[:, top_k - 1 : top_k]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


def _weighted(g: torch.Tensor, pool: list[torch.Tensor]) -> torch.Tensor:
    out = torch.zeros_like(pool[0])
    for e, h in enumerate(pool):
        out = out + g[:, e : e + 1] * h
    return out


def reference(model: RankingModel, batch: TinyBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Logits per task (with position bias) and gates, recomputed from the weights alone."""
    cfg, sd = model.config, model.state_dict()
    top_k = cfg.gate.top_k if cfg.gate.sparse else None
    n_exp = len(cfg.expert_dims)
    user = F.embedding(batch.user, sd["embeddings.embedding_bags.t_user.weight"])
    tags = F.embedding_bag(batch.tags, sd["embeddings.embedding_bags.t_tags.weight"], batch.tag_offsets, mode="mean")
    x = torch.cat([user, tags, batch.dense], dim=1)
    if cfg.model != "single_task":
        x = _mlp(sd, "bottom", x, len(cfg.bottom_dims))
    names = [t.name for t in cfg.tasks]
    gates: torch.Tensor | None = None
    if cfg.model == "single_task":
        inputs = [_mlp(sd, f"task_nets.{t}", x, len(cfg.bottom_dims) + n_exp) for t in names]
    elif cfg.model == "shared_bottom":
        inputs = [_mlp(sd, "shared", x, n_exp)] * len(names)
    elif cfg.model in ("omoe", "mmoe"):
        experts = [_mlp(sd, f"experts.{e}", x, n_exp) for e in range(cfg.num_experts)]
        prefixes = ["gate"] * len(names) if cfg.model == "omoe" else [f"gates.{t}" for t in names]
        gate_list = [_softmax_gate(sd, p, x, top_k) for p in prefixes]
        inputs = [_weighted(g, experts) for g in gate_list]
        gates = torch.stack(gate_list, dim=1)
    else:  # ple
        task_in, shared_in = [x] * len(names), x
        for lvl in range(cfg.ple_levels):
            p = f"levels.{lvl}"
            own = [[_mlp(sd, f"{p}.task_experts.{t}.{j}", task_in[t], n_exp) for j in range(cfg.num_task_experts)]
                   for t in range(len(names))]
            shared = [_mlp(sd, f"{p}.shared_experts.{j}", shared_in, n_exp) for j in range(cfg.num_shared_experts)]
            gate_list = [_softmax_gate(sd, f"{p}.task_gates.{t}", task_in[t], top_k) for t in range(len(names))]
            task_out = []
            for t, g in enumerate(gate_list):
                pool = own[t] + shared  # the documented order: the task's own experts, then the shared ones
                task_out.append(_weighted(g, pool))
            if lvl < cfg.ple_levels - 1:
                every = [e for per_task in own for e in per_task] + shared
                sg = _softmax_gate(sd, f"{p}.shared_gate", shared_in, top_k)
                shared_in = _weighted(sg, every)
            task_in = task_out
        inputs, gates = task_in, torch.stack(gate_list, dim=1)
    bias = sd["position_tower.bias.weight"][batch.position.clamp(0, cfg.position_buckets - 1), 0]
    logits = {}
    for task, h in zip(cfg.tasks, inputs, strict=True):
        h = _mlp(sd, f"towers.{task.name}.mlp", h, len(cfg.tower_dims))
        y = (h @ sd[f"towers.{task.name}.out.weight"].T + sd[f"towers.{task.name}.out.bias"]).squeeze(-1)
        logits[task.name] = y + bias if task.group == "engagement" else y
    return logits, gates


# --- tests ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_output_shapes_and_gates(kind: str) -> None:
    torch.manual_seed(0)
    cfg = tiny(kind)
    batch = tiny_batch()
    out = build_model(cfg)(batch.sparse, batch.dense, batch.position)
    assert set(out.logits) == {"click", "watch", "like"}
    assert all(v.shape == (B,) for v in out.logits.values())
    assert out.aux == {}  # load_balance_weight is 0
    if kind in GATED:
        assert out.gates is not None
        assert out.gates.shape == (B, len(TASKS), experts_per_gate(cfg))  # (B, T, E)
        assert out.gates.dtype == torch.float32
        torch.testing.assert_close(out.gates.sum(-1), torch.ones(B, len(TASKS)))
    else:
        assert out.gates is None


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_build_model_dispatches_on_kind(kind: str) -> None:
    classes = {"single_task": SingleTask, "shared_bottom": SharedBottom, "omoe": OMoE, "mmoe": MMoE, "ple": PLE}
    assert type(build_model(tiny(kind))) is classes[kind]


def test_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"model must be one of .*got 'moe'"):
        tiny("moe")
    cfg = tiny("mmoe")
    object.__setattr__(cfg, "model", "moe")  # a config that skipped validation
    with pytest.raises(ValueError, match=r"unknown model 'moe'; known: \['single_task'"):
        build_model(cfg)


@pytest.mark.parametrize(
    "kind,overrides",
    [(k, {}) for k in MODEL_KINDS]
    + [("mmoe", {"gate": GateConfig("noisy_topk", top_k=2)}), ("omoe", {"gate": GateConfig("noisy_topk", top_k=1)}),
       ("ple", {"gate": GateConfig("noisy_topk", top_k=3), "ple_levels": 1}), ("ple", {"ple_levels": 3})],
)
def test_golden_values_match_an_independent_reimplementation(kind: str, overrides: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(kind, **overrides)).eval()
    assert model.position_tower is not None
    with torch.no_grad():
        model.position_tower.bias.weight.uniform_(-1, 1)  # zero-initialised; make the bias visible
    batch = tiny_batch(seed=1)
    with torch.no_grad():
        out = model(batch.sparse, batch.dense, batch.position)
        want, want_gates = reference(model, batch)
    for t in want:
        torch.testing.assert_close(out.logits[t], want[t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sum(v.sum() for v in out.logits.values()), sum(v.sum() for v in want.values()))
    if want_gates is None:
        assert out.gates is None
    else:
        torch.testing.assert_close(out.gates, want_gates)


@pytest.mark.parametrize(
    "kind,overrides",
    [(k, {}) for k in MODEL_KINDS]
    + [("mmoe", {"gate": GateConfig("noisy_topk", top_k=2, dropout=0.1), "load_balance_weight": 0.01}),
       ("ple", {"gate": GateConfig("noisy_topk", top_k=2), "load_balance_weight": 0.01})],
)
def test_one_batch_fit_lowers_the_loss(kind: str, overrides: dict[str, Any]) -> None:
    torch.manual_seed(0)
    cfg = tiny(kind, **overrides)
    model = build_model(cfg).train()
    batch = tiny_batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        first = float(total_loss(model.eval()(batch.sparse, batch.dense, batch.position), batch))
    model.train()
    for _ in range(60):
        out = model(batch.sparse, batch.dense, batch.position)
        loss = total_loss(out, batch) + cfg.load_balance_weight * out.aux.get("load_balance", torch.zeros(()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = float(total_loss(model.eval()(batch.sparse, batch.dense, batch.position), batch))
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_config_round_trips_for_every_kind(kind: str) -> None:
    cfg = tiny(kind, gate=GateConfig("noisy_topk", top_k=2, noise=0.5, dropout=0.1), load_balance_weight=0.01)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict(tiny(kind).to_dict()) == tiny(kind)


def test_config_written_before_the_model_family_still_loads() -> None:
    new = ("num_task_experts", "num_shared_experts", "ple_levels", "gate", "load_balance_weight")
    old = {k: v for k, v in tiny("mmoe").to_dict().items() if k not in new}
    assert ModelConfig.from_dict(old) == tiny("mmoe")  # tiny() keeps the PLE counts at their defaults
    assert ModelConfig.from_dict({**old, "extra": {}}) == tiny("mmoe")  # artifacts before 2026-12-07 carry it


def test_a_format_1_config_with_flat_gate_fields_loads_nested() -> None:
    """model_config.json of artifact format 1 wrote the gate's settings as four flat fields."""
    flat = {k: v for k, v in tiny("mmoe").to_dict().items() if k != "gate"}
    old = {**flat, "gate": "noisy_topk", "top_k": 1, "gate_noise": 0.5, "gate_dropout": 0.1}
    assert ModelConfig.from_dict(old) == tiny("mmoe", gate=GateConfig("noisy_topk", top_k=1, noise=0.5, dropout=0.1))
    assert ModelConfig.from_dict({**flat, "gate": "softmax", "top_k": 2, "gate_noise": 1.0,
                                  "gate_dropout": 0.0}) == tiny("mmoe")
    assert tiny("mmoe").to_dict()["gate"] == dataclasses.asdict(GateConfig()) and GateConfig().kind == "softmax"


def test_flat_gate_overrides_are_refused_with_the_new_names(small_features: Path) -> None:
    fitted = FittedTransform.load(small_features / "transform.json")
    with pytest.raises(ValueError, match=r"unknown model config field\(s\) \['gate_noise', 'top_k'\].*"
                                         r"fields of 'gate': gate.kind, gate.top_k"):
        ModelConfig.from_fitted(fitted, top_k=1, gate_noise=0.5)
    got = ModelConfig.from_fitted(fitted, gate={"kind": "noisy_topk", "top_k": 1})
    assert got.gate == GateConfig("noisy_topk", top_k=1)
    assert ModelConfig.from_fitted(fitted, gate="noisy_topk").gate == GateConfig("noisy_topk")
    with pytest.raises(ValueError, match=r"unknown gate field\(s\) \['k'\]"):
        ModelConfig.from_fitted(fitted, gate={"k": 1})


def test_defaults_keep_the_dense_softmax_mmoe() -> None:
    cfg = ModelConfig(sparse=(), dense=("x",), tasks=TASKS)
    assert (cfg.model, cfg.gate, cfg.load_balance_weight) == ("mmoe", GateConfig(), 0.0)
    assert cfg.gate.kind == "softmax" and not cfg.gate.sparse and cfg.gate.dropout == 0.0


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"gate": "dense"}, "gate must be a GateConfig (GateConfig.of builds one), got 'dense'"),
        ({"gate": GateConfig("noisy_topk", top_k=4)}, "gate.top_k must be <= 3 (experts one mmoe gate sees), got 4"),
        ({"load_balance_weight": -0.1}, "load_balance_weight must be finite and >= 0, got -0.1"),
        ({"ple_levels": 0}, "ple_levels must be >= 1, got 0"),
        ({"num_shared_experts": 0}, "num_shared_experts must be >= 1, got 0"),
        ({"num_task_experts": -1}, "num_task_experts must be >= 1, got -1"),
    ],
)
def test_config_rejects_bad_values_naming_them(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        tiny("mmoe", **overrides)
    assert str(err.value) == message


def test_top_k_limit_follows_the_smallest_gate() -> None:
    tiny("ple", gate=GateConfig("noisy_topk", top_k=3))  # task gates see 1 own + 2 shared experts
    with pytest.raises(ValueError, match=r"top_k must be <= 3 \(experts one ple gate sees\), got 4"):
        tiny("ple", gate=GateConfig("noisy_topk", top_k=4))
    tiny("single_task", gate=GateConfig("noisy_topk", top_k=9))  # no gates: nothing to check against


def test_single_task_losses_stay_in_their_own_network() -> None:
    torch.manual_seed(0)
    model = build_model(tiny("single_task"))
    batch = tiny_batch()
    out = model(batch.sparse, batch.dense, batch.position)
    F.binary_cross_entropy_with_logits(out.logits["click"], batch.labels["click"]).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for n, g in grads.items():
        if n.startswith(("task_nets.click.", "towers.click.")):
            assert g is not None and g.abs().sum() > 0, n
        elif n.startswith(("task_nets.", "towers.")):
            assert g is None or not g.any(), n  # other tasks' dense layers
    assert grads["embeddings.embedding_bags.t_user.weight"] is not None  # the tables are the shared part


def test_shared_bottom_shares_where_single_task_does_not() -> None:
    torch.manual_seed(0)
    model = build_model(tiny("shared_bottom"))
    batch = tiny_batch()
    model(batch.sparse, batch.dense, batch.position).logits["click"].sum().backward()
    assert model.get_parameter("shared.0.weight").grad is not None
    assert model.get_parameter("towers.like.out.weight").grad is None


def test_position_bias_only_moves_engagement_tasks_in_every_kind() -> None:
    batch = tiny_batch()
    for kind in MODEL_KINDS:
        torch.manual_seed(0)
        model = build_model(tiny(kind)).eval()
        assert model.position_tower is not None
        with torch.no_grad():
            model.position_tower.bias.weight.uniform_(-1, 1)
            with_pos = model(batch.sparse, batch.dense, batch.position).logits
            served = model(batch.sparse, batch.dense, None).logits
        assert not torch.allclose(with_pos["click"], served["click"]), kind
        torch.testing.assert_close(with_pos["like"], served["like"])


@pytest.mark.parametrize("levels", [1, 2])
def test_ple_levels(levels: int) -> None:
    torch.manual_seed(0)
    cfg = tiny("ple", ple_levels=levels, load_balance_weight=1.0)
    model = build_model(cfg)
    assert isinstance(model, PLE) and len(model.levels) == levels
    assert model.levels[-1].shared_gate is None  # the last level's shared output would be unused
    assert all(lvl.shared_gate is not None for lvl in model.levels[:-1])
    if levels > 1:  # shared gate mixes every expert: T * own + shared
        assert model.levels[0].shared_gate is not None
        assert model.levels[0].shared_gate.num_experts == len(TASKS) * 1 + 2
    batch = tiny_batch()
    out = model(batch.sparse, batch.dense, batch.position)
    assert out.gates is not None and out.gates.shape == (B, len(TASKS), 3)  # (B, T, own + shared)
    assert out.aux["load_balance"].shape == () and out.aux["load_balance"] >= 0


def test_ple_gate_order_is_own_experts_then_shared() -> None:
    torch.manual_seed(0)
    model = build_model(tiny("ple", ple_levels=1)).eval()
    assert isinstance(model, PLE)
    level = model.levels[0]
    assert isinstance(level, ExtractionLevel)
    gate = level.task_gates[1]
    assert isinstance(gate, Gate)
    with torch.no_grad():  # task 1's gate: all weight on its first slot
        gate.proj.weight.zero_()
        gate.proj.bias.copy_(torch.tensor([50.0, 0.0, 0.0]))
    x = torch.randn(B, model.width)
    own = level.task_experts[1]
    out = level(x.unsqueeze(1).expand(-1, len(TASKS), -1), x)
    torch.testing.assert_close(out.tasks[:, 1], own(x)[:, 0])  # task 1's own expert


def test_load_balance_aux_is_near_zero_for_uniform_gates_and_larger_when_polarized() -> None:
    torch.manual_seed(0)
    model = build_model(tiny("mmoe", load_balance_weight=0.1))
    gates = [m for m in model.modules() if isinstance(m, Gate)]
    batch = tiny_batch()
    with torch.no_grad():
        for g in gates:
            g.proj.weight.zero_()
            g.proj.bias.zero_()
        uniform = model(batch.sparse, batch.dense).aux["load_balance"]
    with torch.no_grad():
        for g in gates:
            g.proj.bias.copy_(torch.tensor([20.0, 0.0, 0.0]))
        polarized = model(batch.sparse, batch.dense).aux["load_balance"]
    assert float(uniform) < 1e-6
    assert float(polarized) > 1.0


def test_gateless_models_return_no_aux_even_when_asked() -> None:
    batch = tiny_batch()
    for kind in ("single_task", "shared_bottom"):
        out = build_model(tiny(kind, load_balance_weight=0.1))(batch.sparse, batch.dense)
        assert out.aux == {} and out.gates is None


def test_set_top_k_lowers_k_at_inference_without_retraining() -> None:
    torch.manual_seed(0)
    model = build_model(tiny("mmoe", gate=GateConfig("noisy_topk", top_k=3))).eval()
    batch = tiny_batch()
    with torch.no_grad():
        dense_gates = model(batch.sparse, batch.dense).gates
        model.set_top_k(1)
        sparse_gates = model(batch.sparse, batch.dense).gates
    assert dense_gates is not None and sparse_gates is not None
    assert ((sparse_gates > 0).sum(-1) == 1).all()
    torch.testing.assert_close(sparse_gates.argmax(-1), dense_gates.argmax(-1))
    for bad in (0, 4, True, 1.5):
        with pytest.raises(ValueError, match=rf"top_k must be an integer in \[1, 3\].*got {bad!r}"):
            model.set_top_k(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'single_task' has no gates"):
        build_model(tiny("single_task")).set_top_k(1)


def test_set_top_k_on_ple_is_bounded_by_the_task_gates() -> None:
    model = build_model(tiny("ple", ple_levels=2))
    model.set_top_k(2)  # softmax-trained gates can be sparsified too
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        model.set_top_k(4)  # the shared gate has 5 experts, the task gates only 3


def test_gate_dropout_in_the_model_only_in_training() -> None:
    torch.manual_seed(0)
    model = build_model(tiny("mmoe", gate=GateConfig(dropout=0.5)))
    batch = tiny_batch()
    trained = model.train()(batch.sparse, batch.dense).gates
    served = model.eval()(batch.sparse, batch.dense).gates
    assert trained is not None and served is not None
    torch.testing.assert_close(trained.sum(-1), torch.ones(B, len(TASKS)))
    assert (trained == 0).any() and ((trained > 0).sum(-1) >= 1).all()
    assert (served > 0).all()


def test_mmoe_keeps_its_state_dict_layout() -> None:
    keys = set(build_model(tiny("mmoe")).state_dict())
    assert {"experts.0.0.weight", "gates.click.proj.weight", "towers.like.out.bias", "bottom.0.weight",
            "position_tower.bias.weight", "embeddings.embedding_bags.t_user.weight"} <= keys


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_dense_only_model_runs_and_learns_from_its_dense_inputs(kind: str) -> None:
    """No sparse features at all (the MMoE paper's synthetic study): the dense inputs feed the bottom alone."""
    cfg = dataclasses.replace(tiny(kind), sparse=())
    model = build_model(cfg)
    empty = KeyedJaggedTensor(keys=[], values=torch.zeros(0, dtype=torch.long),
                              lengths=torch.zeros(0, dtype=torch.int32), stride=5)
    dense = torch.randn(5, len(cfg.dense))
    out = model(empty, dense)
    assert all(v.shape == (5,) for v in out.logits.values())
    out.logits[cfg.tasks[0].name].sum().backward()
    first = next(p for n, p in model.named_parameters() if not n.startswith("embeddings"))
    assert first.grad is not None and first.grad.abs().sum() > 0
