import numpy as np
import polars as pl
import pytest

from features.synthetic import SynthConfig, generate_day, write_log

CFG = SynthConfig(users=300, items=800, requests_per_day=1500, slate_size=10, seed=3)


@pytest.fixture(scope="module")
def day() -> pl.DataFrame:
    return generate_day(CFG, 0)


def test_shape_and_schema(day: pl.DataFrame) -> None:
    assert day.height == CFG.requests_per_day * CFG.slate_size
    for col in ("request_id", "user_id", "ts", "device", "surface", "hour", "item_id", "creator_id",
                "category", "tags", "duration_s", "item_age_days", "position", "click", "watch_time_s",
                "like", "dismiss", "true_relevance", "true_satisfaction"):
        assert col in day.columns
    assert day.schema["tags"] == pl.List(pl.String)
    # one slate per request: positions 0..S-1 each once, items distinct
    per = day.group_by("request_id").agg(pl.col("position").sort(), pl.col("item_id").n_unique())
    assert per["position"].to_list()[0] == list(range(CFG.slate_size))
    assert (per["item_id"] == CFG.slate_size).all()


def test_deterministic_under_seed() -> None:
    a, b = generate_day(CFG, 1), generate_day(CFG, 1)
    assert a.equals(b)
    assert not a.equals(generate_day(SynthConfig(**{**CFG.__dict__, "seed": 4}), 1))


def test_labels_are_consistent(day: pl.DataFrame) -> None:
    # watch time only after a click; likes only after a click
    assert day.filter(pl.col("click") == 0)["watch_time_s"].max() == 0
    assert day.filter(pl.col("like") == 1)["click"].min() == 1


def test_position_bias_is_independent_of_relevance(day: pl.DataFrame) -> None:
    """Click/relevance ratio follows the examination curve (1 + p) ** -bias at every position."""
    by_pos = day.group_by("position").agg(pl.col("click").mean(), pl.col("true_relevance").mean()).sort("position")
    ratio = (by_pos["click"] / by_pos["true_relevance"]).to_numpy()
    expected = (1.0 + by_pos["position"].to_numpy()) ** -CFG.position_bias
    np.testing.assert_allclose(ratio[:4], expected[:4], rtol=0.2)


def test_no_position_bias_knob() -> None:
    df = generate_day(SynthConfig(**{**CFG.__dict__, "position_bias": 0.0}), 0)
    by_pos = df.group_by("position").agg(pl.col("click").mean(), pl.col("true_relevance").mean())
    np.testing.assert_allclose(by_pos["click"], by_pos["true_relevance"], atol=0.05)


def test_correlation_knob_moves_engagement_satisfaction_agreement() -> None:
    def corr(rho: float) -> float:
        df = generate_day(SynthConfig(**{**CFG.__dict__, "correlation": rho}), 0)
        return float(df.select(pl.corr("true_relevance", "true_satisfaction")).item())

    low, high = corr(0.0), corr(0.9)
    assert high > low + 0.3


def test_bad_config_names_field() -> None:
    with pytest.raises(ValueError, match="correlation must be in"):
        SynthConfig(correlation=1.5)
    with pytest.raises(ValueError, match="slate_size"):
        SynthConfig(items=5, slate_size=10)


def test_write_log_partitions(tmp_path) -> None:
    paths = write_log(SynthConfig(days=2, users=20, items=50, requests_per_day=5, slate_size=4), tmp_path)
    assert [p.parent.name for p in paths] == ["date=2026-01-01", "date=2026-01-02"]


def test_policy_promotion_moves_promoted_categories_up_without_changing_relevance() -> None:
    import dataclasses

    plain = generate_day(CFG, day=0)
    promo = generate_day(dataclasses.replace(CFG, policy_promotion=3.0), day=0)
    assert plain["true_relevance"].equals(promo["true_relevance"])  # only the display order changes

    def mean_position(df: pl.DataFrame, promoted: bool) -> float:
        category = pl.col("category").str.extract(r"(\d+)").cast(pl.Int64)
        return float(df.filter((category % 3 == 0) == promoted)["position"].mean())

    assert mean_position(promo, True) < mean_position(plain, True) - 2
    assert mean_position(promo, False) > mean_position(plain, False)
