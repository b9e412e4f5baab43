from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features.build import BuildSummary
from features.fitted import OOV, FittedTransform, sparse_col
from features.spec import FeatureSpec


@pytest.fixture(scope="module")
def fitted(small_features: Path) -> FittedTransform:
    return FittedTransform.load(small_features / "transform.json")


def test_no_validation_leakage(small_log: Path, small_features: Path, fitted: FittedTransform,
                               small_summary: BuildSummary) -> None:
    raw = pl.read_parquet(sorted(small_log.rglob("*.parquet")))
    train = raw.filter(pl.col("ts").dt.date() <= pl.lit(small_summary.windows["train"]["end"]).str.to_date())
    assert fitted.rows == train.height
    # every vocab value was seen in training; validation-only ids map to OOV
    assert set(fitted.vocabs["item_id"].values) == set(train["item_id"].unique().to_list())
    val = pl.read_parquet(small_features / "val.parquet")
    val_only = set(val["item_id"].to_list()) - set(train["item_id"].to_list())
    assert val_only, "fixture should have unseen items in validation"
    unseen = val.filter(pl.col("item_id").is_in(list(val_only)))
    assert (unseen["s_item_id"] == OOV).all()


def test_dense_standardised_on_train(small_features: Path) -> None:
    train = pl.read_parquet(small_features / "train.parquet")
    for c in ("d_duration_s", "d_item_age_days"):
        assert abs(train[c].mean()) < 1e-3
        assert abs(train[c].std() - 1.0) < 1e-2


def test_save_load_roundtrip_and_hash(tmp_path: Path, fitted: FittedTransform) -> None:
    path = fitted.save(tmp_path / "t.json")
    again = FittedTransform.load(path)
    assert again.content_hash == fitted.content_hash
    assert again.vocabs == fitted.vocabs
    tampered = path.read_text().replace('"rows": ', '"rows": 1')
    (tmp_path / "bad.json").write_text(tampered)
    with pytest.raises(ValueError, match="content_hash mismatch"):
        FittedTransform.load(tmp_path / "bad.json")


def test_serving_transform_equals_offline_transform(small_log: Path, fitted: FittedTransform,
                                                    spec: FeatureSpec) -> None:
    """Parity: one request through transform_request == the same rows through transform."""
    raw = pl.read_parquet(sorted(small_log.rglob("*.parquet")))
    rng = np.random.default_rng(0)
    for rid in rng.choice(raw["request_id"].unique().to_numpy(), 5, replace=False):
        rows = raw.filter(pl.col("request_id") == rid)
        first = rows.row(0, named=True)
        served = fitted.transform_request(
            {c: first[c] for c in spec.features_from("user")},
            {c: first[c] for c in spec.features_from("context")},
            {c: rows[c] for c in spec.features_from("item")},
        )
        offline = fitted.transform(rows.lazy(), with_labels=False).collect().select(served.columns)
        assert served.equals(offline), f"request {rid}"


def test_batched_serving_transform_equals_the_offline_transform(small_log: Path, fitted: FittedTransform,
                                                               spec: FeatureSpec) -> None:
    """Parity: several requests through transform_requests == their rows through transform, in order."""
    raw = pl.read_parquet(sorted(small_log.rglob("*.parquet")))
    rids = np.random.default_rng(1).choice(raw["request_id"].unique().to_numpy(), 6, replace=False)
    requests, offline = [], []
    for rid in rids:
        rows = raw.filter(pl.col("request_id") == rid).head(3 + len(requests))  # different sizes
        first = rows.row(0, named=True)
        requests.append(({c: first[c] for c in spec.features_from("user")},
                         {c: first[c] for c in spec.features_from("context")},
                         {c: rows[c] for c in spec.features_from("item")}))
        offline.append(fitted.transform(rows.lazy(), with_labels=False).collect())
    served = fitted.transform_requests(requests)
    assert served.height == sum(f.height for f in offline)
    assert served.equals(pl.concat(offline).select(served.columns))
    with pytest.raises(ValueError, match="missing user feature 'user_id'"):
        fitted.transform_requests([requests[0], ({}, requests[1][1], requests[1][2])])


def test_serving_transform_errors_name_the_feature(fitted: FittedTransform) -> None:
    ok_user, ok_ctx = {"user_id": 1}, {"device": "ios", "surface": "home", "hour": 3}
    cands = {"item_id": [1, 2], "creator_id": [1, 2], "category": ["cat_1", "cat_2"],
             "tags": [["tag_1"], []], "duration_s": [10.0, 20.0], "item_age_days": [1.0, 2.0]}
    with pytest.raises(ValueError, match="missing context feature 'hour'"):
        fitted.transform_request(ok_user, {"device": "ios", "surface": "home"}, cands)
    with pytest.raises(ValueError, match="candidate column 'creator_id' has 1 values, expected 2"):
        fitted.transform_request(ok_user, ok_ctx, {**cands, "creator_id": [1]})
    with pytest.raises(ValueError, match="feature 'user_id' expects int values, got 'bob'"):
        fitted.transform_request({"user_id": "bob"}, ok_ctx, cands)
    # unseen ids are not errors: they map to the OOV id
    out = fitted.transform_request({"user_id": 10**9}, ok_ctx, {**cands, "category": ["new", "cat_2"]})
    assert out["s_user_id"].to_list() == [OOV, OOV]
    assert out["s_category"][0] == OOV


def test_position_is_crossed_with_device(small_log: Path, fitted: FittedTransform) -> None:
    p = fitted.spec.position
    assert p is not None and p.cross == "device"
    width = p.max_position + 1
    assert fitted.position_buckets() == width * fitted.table_size("device")
    raw = pl.scan_parquet(small_log / "**/*.parquet").head(500).collect()
    out = raw.lazy().select(fitted.expressions()).collect()
    device_id = out[sparse_col("device")].to_numpy()
    expected = np.minimum(raw["position"].to_numpy(), p.max_position) + width * device_id
    np.testing.assert_array_equal(out["position"].to_numpy(), expected)
    assert out["position"].max() < fitted.position_buckets()
    assert len(set(device_id)) > 1  # the cross really separates devices here
