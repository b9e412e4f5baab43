"""Id rules beyond plain vocabularies: crosses, quantile buckets, hashing; and their serving parity."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features.fitted import OOV, FittedTransform
from features.spec import FeatureSpec, parse_spec
from features.synthetic import SynthConfig, generate_day

EXTRA = [
    {"name": "device_x_category", "source": "item", "cross": ["device", "category"]},
    {"name": "duration_bucket", "source": "item", "column": "duration_s", "quantiles": 10},
    {"name": "item_hashed", "source": "item", "column": "item_id", "hash_buckets": 1000},
    {"name": "tags_hashed", "source": "item", "column": "tags", "multi": True, "hash_buckets": 64},
]


@pytest.fixture(scope="module")
def rich_spec(spec: FeatureSpec) -> FeatureSpec:
    data = spec.model_dump(mode="json")
    data["sparse"] = data["sparse"] + EXTRA
    return parse_spec(data)


@pytest.fixture(scope="module")
def raw() -> pl.DataFrame:
    return generate_day(SynthConfig(users=100, items=2000, requests_per_day=500, slate_size=10, seed=5), 0)


@pytest.fixture(scope="module")
def fitted(raw: pl.DataFrame, rich_spec: FeatureSpec) -> FittedTransform:
    return FittedTransform.fit(raw.lazy(), rich_spec)


@pytest.fixture(scope="module")
def out(raw: pl.DataFrame, fitted: FittedTransform) -> pl.DataFrame:
    return fitted.transform(raw.lazy()).collect()


def test_quantile_buckets_are_monotone_and_balanced(raw: pl.DataFrame, fitted: FittedTransform,
                                                    out: pl.DataFrame) -> None:
    ids = out["s_duration_bucket"].to_numpy()
    assert fitted.table_size("duration_bucket") == len(fitted.boundaries["duration_bucket"]) + 2 == 11
    assert ids.min() == 1 and ids.max() == 10
    order = np.argsort(raw["duration_s"].to_numpy(), kind="stable")
    assert (np.diff(ids[order]) >= 0).all()  # larger durations never get a smaller bucket
    share = np.bincount(ids, minlength=11)[1:] / len(ids)
    np.testing.assert_allclose(share, 0.1, atol=0.03)


def test_cross_ids_follow_the_pair(raw: pl.DataFrame, fitted: FittedTransform, out: pl.DataFrame) -> None:
    pairs = raw.select("device", "category").with_columns(out["s_device_x_category"].alias("id"))
    per_pair = pairs.group_by("device", "category").agg(pl.col("id").n_unique().alias("n"), pl.col("id").first())
    assert (per_pair["n"] == 1).all()
    assert per_pair["id"].n_unique() == per_pair.height  # distinct pairs, distinct ids
    assert fitted.table_size("device_x_category") == per_pair.height + 1
    unseen = fitted.transform_request({"user_id": 1}, {"device": "fridge", "surface": "home", "hour": 1},
                                      _cands(raw, 2))
    assert (unseen["s_device_x_category"] == OOV).all()


def test_hashed_ids_in_range_without_vocabulary(raw: pl.DataFrame, fitted: FittedTransform,
                                                out: pl.DataFrame) -> None:
    assert "item_hashed" not in fitted.vocabs and fitted.table_size("item_hashed") == 1001
    ids = out["s_item_hashed"]
    assert ids.min() >= 1 and ids.max() <= 1000
    same = raw.select("item_id").with_columns(ids.alias("id")).group_by("item_id").agg(pl.col("id").n_unique())
    assert (same["id"] == 1).all()
    tags = out["s_tags_hashed"].explode()
    assert tags.min() >= 1 and tags.max() <= 64


def test_serving_parity_with_all_id_rules(raw: pl.DataFrame, fitted: FittedTransform,
                                          rich_spec: FeatureSpec) -> None:
    for rid in raw["request_id"].unique().sort().head(5):
        rows = raw.filter(pl.col("request_id") == rid)
        first = rows.row(0, named=True)
        served = fitted.transform_request(
            {c: first[c] for c in rich_spec.features_from("user")},
            {c: first[c] for c in rich_spec.features_from("context")},
            {c: rows[c] for c in rich_spec.features_from("item")},
        )
        offline = fitted.transform(rows.lazy(), with_labels=False).collect().select(served.columns)
        assert served.equals(offline)


def test_roundtrip_and_version_guard(fitted: FittedTransform, tmp_path: Path) -> None:
    again = FittedTransform.load(fitted.save(tmp_path / "t.json"))
    assert again.boundaries == fitted.boundaries and again.content_hash == fitted.content_hash
    data = json.loads((tmp_path / "t.json").read_text())
    data["polars_version"] = "0.1.0"
    data.pop("content_hash")
    with pytest.raises(ValueError, match="hashes ids with polars 0.1.0"):
        FittedTransform.from_dict(data)


def test_spec_rejects_bad_id_rules(spec: FeatureSpec) -> None:
    base = spec.model_dump(mode="json")
    with pytest.raises(ValueError, match=r"cross 'x' uses \['nope'\]"):
        parse_spec({**base, "sparse": [*base["sparse"], {"name": "x", "source": "item", "cross": ["device", "nope"]}]})
    with pytest.raises(ValueError, match="choose one of"):
        parse_spec({**base, "sparse": [*base["sparse"],
                                       {"name": "x", "source": "item", "hash_buckets": 9, "quantiles": 4}]})


def _cands(raw: pl.DataFrame, n: int) -> dict[str, list[object]]:
    rows = raw.head(n)
    return {c: rows[c].to_list() for c in ("item_id", "creator_id", "category", "tags", "duration_s",
                                           "item_age_days")}
