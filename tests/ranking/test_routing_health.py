"""Routing health: load, dropped rows, collapse and specialisation, and their logging.

The statistics are fed hand-made gate weights of the strategies the MMoE offers (hash, top-1,
expert choice's dropped rows, private experts), so every expected value is known; the last tests
run a real Lightning fit on the small synthetic features and read the keys and the heatmaps back
from MLflow.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ranking.config import ModelConfig, SparseSlot, TaskHead
from ranking.gate_health import (
    GateStats,
    Grouping,
    HealthConfig,
    mutual_information,
    routing_groups,
    task_experts,
)

E, K, USERS = 8, 30, 200  # experts, categories, users
CATEGORY = Grouping("category", "category", K)


def _one_hot(experts: torch.Tensor, tasks: int = 2) -> torch.Tensor:
    """(B,) chosen experts -> (B, T, E) weights of a hard router, the same for every task."""
    return F.one_hot(experts, E).double().unsqueeze(1).expand(-1, tasks, -1)


def _user_hash(users: torch.Tensor) -> torch.Tensor:
    """A fixed hash of the user id onto the experts (Knuth's multiplicative hash)."""
    return (users * 2654435761 % 2**32) % E


def _rows(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) users and (N,) item categories, drawn independently."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, USERS, (n,), generator=g), torch.randint(0, K, (n,), generator=g)


def _feed(stats: GateStats, gates: torch.Tensor, categories: torch.Tensor, batch: int = 256) -> GateStats:
    for start in range(0, gates.shape[0], batch):  # several batches: the sums must add up
        stats.update(gates[start : start + batch], {"category": categories[start : start + batch]})
    return stats


# ------------------------------------------------------------------------------- load and collapse
def test_hash_router_spreads_load_and_is_healthy() -> None:
    users, cats = _rows(4000, seed=0)
    h = _feed(GateStats(["a", "b"], E, groupings=[CATEGORY]), _one_hot(_user_hash(users)), cats).compute()
    assert h.active_experts == [1.0, 1.0] and h.dropped == [0.0, 0.0] and h.underserved == [0.0, 0.0]
    for t in range(2):
        assert sum(h.load[t]) == pytest.approx(1.0) and h.load[t] == pytest.approx(h.importance[t])
        assert h.load_cv[t] < 0.35 and h.importance_cv[t] == pytest.approx(h.load_cv[t])
    assert h.polarized == [True, True]  # every row is one-hot by design ...
    assert h.collapsed == [False, False] and h.problems() == []  # ... which is no finding for a hard router


def test_a_collapsed_top1_router_is_flagged_and_its_starved_experts_named() -> None:
    g = torch.Generator().manual_seed(1)
    experts = torch.where(torch.rand(3000, generator=g) < 0.97, 3, torch.randint(0, E, (3000,), generator=g))
    gates = torch.cat([_one_hot(experts, 1), _one_hot(torch.arange(3000) % E, 1)], dim=1)  # a collapsed, b even
    stats = GateStats(["a", "b"], E)
    stats.update(gates)
    h = stats.compute()
    assert h.collapsed == [True, False]
    assert h.importance[0][3] > 0.97 and h.load_cv[0] > 2.0 and h.load_cv[1] == pytest.approx(0.0)
    assert h.problems() == ["router of task a is collapsed: expert e3 takes 97% of its weight"]
    # with every task collapsed on e3 the other experts are near-dead too, and named
    stats.reset()
    stats.update(_one_hot(experts, 2))
    assert stats.compute().problems() == [
        "router of task a is collapsed: expert e3 takes 97% of its weight",
        "router of task b is collapsed: expert e3 takes 97% of its weight",
        "88% of experts are near-dead: e0, e1, e2, e4, e5, e6, e7",
    ]


def test_a_polarized_dense_gate_is_still_reported() -> None:
    """Softmax rows near one-hot on varying experts: not collapsed, but the YouTube failure mode."""
    logits = torch.full((64, 1, 4), 0.0)
    logits[torch.arange(64), 0, torch.arange(64) % 4] = 6.0
    stats = GateStats(["a"], 4)
    stats.update(torch.softmax(logits, dim=-1))
    h = stats.compute()
    assert h.dense == [True] and h.collapsed == [False] and h.active_experts == [4.0]
    assert h.problems() == ["gate of task a is polarized (mean top weight 0.993)"]


def test_dropped_and_underserved_rows_are_counted() -> None:
    """Expert choice leaves rows no expert takes (all-zero weights) and rows with less than full weight."""
    w = torch.tensor([[0.6, 0.4]] * 6 + [[0.0, 0.0]] * 3 + [[0.5, 0.0]], dtype=torch.float64).unsqueeze(1)
    stats = GateStats(["a"], 2)
    stats.update(w)  # (10, 1, 2)
    h = stats.compute()
    assert h.dropped == [pytest.approx(0.3)] and h.underserved == [pytest.approx(0.4)]
    assert h.active_experts == [pytest.approx((6 * 2 + 1) / 10)]
    assert h.load[0] == pytest.approx([0.7, 0.6])
    assert h.importance[0] == pytest.approx([4.1 / 6.5, 2.4 / 6.5])  # shares of the weight given
    # entropy and top weight over the 7 served rows, each renormalised (the half row is one-hot)
    served_entropy = -(0.6 * math.log(0.6) + 0.4 * math.log(0.4))
    assert h.entropy == [pytest.approx(6 * served_entropy / 7)]
    assert h.max_weight == [pytest.approx((6 * 0.6 + 1.0) / 7)]
    assert h.problems() == ["task a: 30.0% of rows get no expert (all-zero weights; above 5%)"]
    assert h.problems(max_dropped=0.5) == []


def test_exact_zeros_leave_dead_experts_detected_across_private_experts() -> None:
    """Shared top-k: columns 0-1 shared, 2 is task a's private expert, 3 task b's; 1 is never chosen."""
    cfg = ModelConfig(sparse=(SparseSlot("u", 10, 4),), dense=(), num_experts=2,
                      tasks=(TaskHead("a", "binary", "engagement"), TaskHead("b", "binary", "engagement")))
    reach = task_experts(cfg, 4)
    w = torch.zeros(100, 2, 4)
    w[:, 0, [0, 2]] = 0.5  # task a: shared expert 0 and its own
    w[:, 1, [0, 3]] = 0.5
    stats = GateStats(["a", "b"], 4, reachable=reach)
    stats.update(w)
    h = stats.compute()
    assert h.dead == [1] and h.dead_fraction == 0.25  # the private experts live: their tasks use them
    assert h.dense == [False, False] and h.active_experts == [2.0, 2.0]
    # CV over the three experts each task reaches (0.5, 0, 0.5), not over four with another task's
    assert h.load_cv[0] == pytest.approx(math.sqrt(2) / 2)
    assert h.problems(max_dead_fraction=0.2) == ["25% of experts are near-dead: e1"]


# ------------------------------------------------------------------------------- specialisation
def test_mutual_information_of_known_tables() -> None:
    assert mutual_information(torch.eye(4, dtype=torch.long) * 10) == pytest.approx(math.log(4))
    assert mutual_information(torch.ones(5, 3, dtype=torch.long)) == pytest.approx(0.0, abs=1e-12)
    assert mutual_information(torch.zeros(2, 2, dtype=torch.long)) == 0.0


def test_an_untrained_hash_router_is_not_specialised_on_independent_categories() -> None:
    """2,000 rows, 8 experts, 30 categories: the plug-in MI alone (about (K-1)(E-1)/2N = 0.05 nats) is
    above the 2% threshold; the shuffled-pairing correction must take it back to about zero."""
    n = 2000
    users, cats = _rows(n, seed=0)
    h = _feed(GateStats(["a", "b"], E, groupings=[CATEGORY]), _one_hot(_user_hash(users)), cats).compute()
    expected_bias = (K - 1) * (E - 1) / (2 * n)
    for d in h.group_mi["category"]:
        assert d.chance == pytest.approx(expected_bias, rel=0.15)
        assert d.plugin / math.log(E) > h.specialised_above  # what an uncorrected estimate would report
        assert d.mi < 0.2 * d.chance and d.normalised < 0.005
        assert not d.specialised
    assert h.task_mi is not None and h.task_mi.plugin == pytest.approx(0.0, abs=1e-12)  # same expert per task
    assert not h.task_mi.specialised
    assert h.group_choices["category"].shape == (2, K, E) and int(h.group_choices["category"].sum()) == 2 * n


def test_a_router_that_follows_the_category_is_specialised() -> None:
    users, cats = _rows(2000, seed=2)
    g = torch.Generator().manual_seed(3)
    follows = torch.rand(2000, generator=g) < 0.3  # task b: 30% of rows by category, the rest by user
    gates = torch.cat([_one_hot(cats % E, 1), _one_hot(torch.where(follows, cats % E, _user_hash(users)), 1)], dim=1)
    h = _feed(GateStats(["a", "b"], E, groupings=[CATEGORY]), gates, cats).compute()
    a, b = h.group_mi["category"]
    assert a.specialised and a.normalised > 0.9  # the choice is a function of the category
    assert b.specialised and 0.05 < b.normalised < 0.3 and b.z > 10
    assert h.task_mi is not None and not h.task_mi.specialised  # both tasks use every expert about evenly
    metrics = h.metrics("val")
    assert metrics["val/routing/a/specialised_category"] == 1.0 and metrics["val/routing/specialised_task"] == 0.0
    assert metrics["val/routing/b/mi_category_norm"] == pytest.approx(b.normalised)


def test_tasks_that_use_different_experts_are_specialised_on_the_task() -> None:
    users, cats = _rows(2000, seed=5)
    own = _user_hash(users) % 4  # task a on experts 0-3, task b on 4-7
    gates = torch.cat([_one_hot(own, 1), _one_hot(own + 4, 1)], dim=1)
    h = _feed(GateStats(["a", "b"], E, groupings=[CATEGORY]), gates, cats).compute()
    assert h.task_mi is not None and h.task_mi.specialised
    assert h.task_mi.plugin == pytest.approx(math.log(2))  # the task is one bit of the choice ...
    assert h.task_mi.normalised == pytest.approx(1 / 3, abs=0.01)  # ... of its three (8 experts)
    assert h.metrics("val")["val/routing/specialised_task"] == 1.0


def test_the_threshold_is_configurable_and_the_result_reproducible() -> None:
    users, cats = _rows(2000, seed=4)
    gates = _one_hot(torch.where(cats < 3, 0, _user_hash(users)))  # weak: 10% of rows by category
    strict = HealthConfig(specialised_above=0.5)
    a = _feed(GateStats(["a", "b"], E, groupings=[CATEGORY]), gates, cats).compute()
    b = _feed(GateStats(["a", "b"], E, strict, groupings=[CATEGORY]), gates, cats).compute()
    assert a.group_mi["category"][0].specialised and not b.group_mi["category"][0].specialised
    assert a.group_mi["category"][0].mi == b.group_mi["category"][0].mi  # the shuffles are seeded


def test_update_refuses_missing_or_out_of_range_ids() -> None:
    stats = GateStats(["a"], E, groupings=[CATEGORY])
    gates = _one_hot(torch.zeros(4, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="ids of grouping 'category'"):
        stats.update(gates)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 30\), got 0..30"):
        stats.update(gates, {"category": torch.tensor([0, 1, 2, 30])})
    with pytest.raises(ValueError, match=r"gates must be \(B, 1, 8\)"):
        stats.update(torch.zeros(4, 2, E), {"category": torch.zeros(4, dtype=torch.long)})


def test_routing_groups_follow_the_documented_names_of_each_spec() -> None:
    def config(*names: str) -> ModelConfig:
        return ModelConfig(sparse=tuple(SparseSlot(n, 20, 4) for n in names), dense=(),
                           tasks=(TaskHead("click", "binary", "engagement"),))

    synthetic = config("user_id", "device", "item_id", "creator_id", "category")
    kuairand = config("user_id", "video_id", "author_id", "music_type", "video_type", "upload_type",
                      "user_active_degree")
    census = config("class_worker", "education", "sex")
    assert {g: s.name for g, s in routing_groups(synthetic).items()} == {"category": "category"}
    assert {g: s.name for g, s in routing_groups(kuairand).items()} == {
        "category": "upload_type", "segment": "user_active_degree"}
    assert routing_groups(census) == {}
    multi = ModelConfig(sparse=(SparseSlot("category", 20, 4, multi=True, max_len=3),), dense=(),
                        tasks=(TaskHead("click", "binary", "engagement"),))
    assert routing_groups(multi) == {}  # a list of ids has no one category per row


# ------------------------------------------------------------------------------- a real training run
@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory, small_features: Path) -> tuple[str, str, Path]:
    """Two epochs of a real Lightning fit logging to a sqlite MLflow store, with the heatmap callback."""
    from lightning.pytorch.loggers import MLFlowLogger

    from pipelines.tracking import ensure_experiment
    from pipelines.train import GateHeatmaps
    from ranking.train import FitConfig, fit, load_features

    root = tmp_path_factory.mktemp("routing")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    ensure_experiment(uri, "routing")  # artifacts beside the database, not in ./mlruns
    logger = MLFlowLogger(experiment_name="routing", tracking_uri=uri, run_name="routing-health")
    cfg = ModelConfig.from_fitted(load_features(small_features), bottom_dims=(16,), expert_dims=(8,),
                                  tower_dims=(8,), num_experts=E)
    fit(small_features, cfg, FitConfig(epochs=2, batch_size=256, accelerator="cpu", limit_train_batches=4,
                                       final_eval=False, progress_bar=False),
        logger=logger, callbacks=[GateHeatmaps(root / "plots")])
    logger.finalize("success")
    return uri, str(logger.run_id), root / "plots"


def test_routing_metrics_are_logged_every_epoch(tracked: tuple[str, str, Path]) -> None:
    from mlflow import MlflowClient

    uri, run_id, _ = tracked
    client = MlflowClient(uri)
    keys = set(client.get_run(run_id).data.metrics)
    tasks = ("click", "watch_time", "like", "dismiss")
    expected = {"val/routing/mi_task", "val/routing/mi_task_norm", "val/routing/specialised_task"}
    for t in tasks:
        expected |= {f"val/routing/{t}/{m}" for m in ("dropped", "underserved", "active_experts", "load_cv",
                                                      "importance_cv", "top_share", "collapsed", "mi_category",
                                                      "mi_category_norm", "specialised_category")}
        expected |= {f"val/routing/{t}/expert_{e}/{m}" for e in range(E) for m in ("load", "importance")}
    assert expected <= keys, sorted(expected - keys)
    assert not any("segment" in k for k in keys)  # the synthetic spec has no user-activity feature
    for key in ("val/routing/click/load_cv", "val/routing/mi_task", "val/routing/like/mi_category_norm"):
        assert len(client.get_metric_history(run_id, key)) == 2, key  # one point per epoch
    dense_softmax = client.get_metric_history(run_id, "val/routing/click/active_experts")
    assert all(m.value == E for m in dense_softmax)


def test_routing_heatmaps_are_logged_every_epoch(tracked: tuple[str, str, Path]) -> None:
    from mlflow import MlflowClient

    uri, run_id, plots = tracked
    names = {f.path for f in MlflowClient(uri).list_artifacts(run_id, "routing")}
    assert names == {f"routing/{kind}_epoch_{e:03d}.png" for kind in ("routing", "category") for e in (0, 1)}
    assert (plots / "category_epoch_001.png").stat().st_size > 1000
