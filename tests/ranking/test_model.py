import dataclasses
from pathlib import Path

import polars as pl
import pytest
import torch

from features.fitted import FittedTransform
from ranking.batch import FeatureTable
from ranking.blocks import PositionBiasTower
from ranking.config import ModelConfig
from ranking.gating import Gate
from ranking.mmoe import MMoE


@pytest.fixture(scope="module")
def fitted(small_features: Path) -> FittedTransform:
    return FittedTransform.load(small_features / "transform.json")


@pytest.fixture(scope="module")
def config(fitted: FittedTransform) -> ModelConfig:
    return ModelConfig.from_fitted(fitted, bottom_dims=(32,), expert_dims=(16,), tower_dims=(8,), num_experts=3)


@pytest.fixture(scope="module")
def table(small_features: Path, config: ModelConfig) -> FeatureTable:
    return FeatureTable(pl.read_parquet(small_features / "train.parquet"), config)


def test_config_derives_from_spec(fitted: FittedTransform, config: ModelConfig) -> None:
    assert [s.name for s in config.sparse] == [f.name for f in fitted.spec.sparse]
    assert {s.name: s.num_embeddings for s in config.sparse} == {k: v.size for k, v in fitted.vocabs.items()}
    assert [t.name for t in config.tasks] == ["click", "watch_time", "like", "dismiss"]
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown model config field\(s\) \['nope'\]"):
        ModelConfig.from_fitted(fitted, nope=1)
    with pytest.raises(ValueError, match="num_experts must be >= 1, got 0"):
        dataclasses.replace(config, num_experts=0)


def test_feature_table_matches_frame(small_features: Path, table: FeatureTable) -> None:
    frame = pl.read_parquet(small_features / "train.parquet")
    idx = torch.tensor([5, 0, 17])
    b = table.batch(idx)
    assert b.sparse.keys() == [s.name for s in table.config.sparse]
    assert b.sparse["user_id"].values().tolist() == frame["s_user_id"].gather([5, 0, 17]).to_list()
    tags = frame["s_tags"].gather([5, 0, 17]).to_list()
    assert b.sparse["tags"].lengths().tolist() == [len(t) for t in tags]
    assert b.sparse["tags"].values().tolist() == [v for t in tags for v in t]
    assert b.dense.shape == (3, 2)
    assert b.labels["click"].tolist() == frame["y_click"].gather([5, 0, 17]).to_list()


def test_forward_shapes_and_gates(config: ModelConfig, table: FeatureTable) -> None:
    torch.manual_seed(0)
    model = MMoE(config)
    b = table.batch(torch.arange(64))
    out = model(b.sparse, b.dense, b.position)
    assert set(out.logits) == {"click", "watch_time", "like", "dismiss"}
    assert all(v.shape == (64,) for v in out.logits.values())
    assert out.gates.shape == (64, 4, 3)  # (B, T, E)
    torch.testing.assert_close(out.gates.sum(-1), torch.ones(64, 4))


def test_gate_softmax_in_float32_under_bf16() -> None:
    gate = Gate(8, 4).to(torch.bfloat16)
    w = gate(torch.randn(5, 8, dtype=torch.bfloat16))
    assert w.dtype == torch.float32


def test_position_bias_only_moves_engagement_and_only_with_position(config: ModelConfig,
                                                                    table: FeatureTable) -> None:
    torch.manual_seed(0)
    model = MMoE(config).eval()
    assert model.position_tower is not None
    with torch.no_grad():
        model.position_tower.bias.weight.uniform_(-1, 1)
    b = table.batch(torch.arange(32))
    with_pos = model(b.sparse, b.dense, b.position).logits
    served = model(b.sparse, b.dense, None).logits
    assert not torch.allclose(with_pos["click"], served["click"])  # engagement gets the bias
    assert not torch.allclose(with_pos["watch_time"], served["watch_time"])
    torch.testing.assert_close(with_pos["like"], served["like"])  # satisfaction does not
    torch.testing.assert_close(with_pos["dismiss"], served["dismiss"])


def test_position_dropout_hides_position_in_training() -> None:
    tower = PositionBiasTower(buckets=4, dropout=1.0).train()
    with torch.no_grad():
        tower.bias.weight.copy_(torch.arange(5.0).unsqueeze(1))
    assert tower(torch.tensor([0, 1, 2])).tolist() == [4.0, 4.0, 4.0]  # all mapped to "unknown"
    assert tower.eval()(torch.tensor([0, 1, 9])).tolist() == [0.0, 1.0, 3.0]  # clamped to last bucket


def test_tables_follow_every_id_rule(spec) -> None:  # type: ignore[no-untyped-def]
    from features.spec import parse_spec
    from features.synthetic import SynthConfig, generate_day

    data = spec.model_dump(mode="json")
    data["sparse"] += [
        {"name": "dev_x_cat", "source": "item", "cross": ["device", "category"]},
        {"name": "dur_q", "source": "item", "column": "duration_s", "quantiles": 8},
        {"name": "item_h", "source": "item", "column": "item_id", "hash_buckets": 97},
    ]
    raw = generate_day(SynthConfig(users=50, items=300, requests_per_day=100, slate_size=5), 0)
    fitted = FittedTransform.fit(raw.lazy(), parse_spec(data))
    cfg = ModelConfig.from_fitted(fitted, bottom_dims=(8,), expert_dims=(8,), tower_dims=(4,), num_experts=2)
    sizes = {s.name: s.num_embeddings for s in cfg.sparse}
    assert sizes["item_h"] == 98 and sizes["dur_q"] == 9
    table = FeatureTable(fitted.transform(raw.lazy()).collect(), cfg)
    b = table.all()
    out = MMoE(cfg)(b.sparse, b.dense, b.position)  # ids stay inside every table
    assert out.logits["click"].shape == (raw.height,)
