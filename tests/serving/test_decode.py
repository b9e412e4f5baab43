"""decode_request: valid requests become the transform's inputs; bad ones name the field."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl
import pytest

from features.fitted import FittedTransform
from protos.ranking.v1 import ranker_pb2 as pb
from serving.client import encode_column, encode_value
from serving.decode import DecodeError, decode_request


def test_valid_request_decodes_to_spec_columns(raw_request: Any, fitted: FittedTransform) -> None:
    user, context, candidates, item_ids, _ = decode_request(raw_request.to_proto(), fitted)
    spec = fitted.spec
    assert user == raw_request.user
    assert context == raw_request.context
    assert sorted(candidates) == sorted(spec.features_from("item"))
    assert item_ids == [str(i) for i in raw_request.item_ids]
    np.testing.assert_array_equal(candidates["item_id"], raw_request.item_ids)
    np.testing.assert_allclose(candidates["duration_s"], raw_request.candidates["duration_s"])
    assert candidates["category"].tolist() == raw_request.candidates["category"]
    assert candidates["tags"].to_series().to_list() == raw_request.candidates["tags"]


def test_decoded_request_transforms_like_the_raw_one(raw_request: Any, fitted: FittedTransform) -> None:
    user, context, candidates, _, _ = decode_request(raw_request.to_proto(), fitted)
    got = fitted.transform_request(user, context, candidates)
    want = fitted.transform_request(raw_request.user, raw_request.context, raw_request.all_candidates())
    assert got.equals(want)


def test_jagged_string_lists_rebuilt_from_lengths(raw_request: Any, fitted: FittedTransform) -> None:
    req = raw_request.to_proto(top_k=0)
    tags = [["a", "b"], [], ["c"], *raw_request.candidates["tags"][3:]]
    req.candidates.features["tags"].CopyFrom(encode_column(tags))
    decoded = decode_request(req, fitted).candidates["tags"].to_series()
    assert decoded.dtype == pl.List(pl.String)
    assert decoded.to_list() == tags


def test_jagged_int_lists_rebuilt_from_lengths(raw_request: Any, fitted: FittedTransform) -> None:
    as_int_lists = dataclasses.replace(fitted, raw_types={**fitted.raw_types, "tags": "list[int]"})
    req = raw_request.to_proto()
    lists = [[1, 2, 3], [], [4], [], [5, 6], [7], [8], [9], [], [10]]
    req.candidates.features["tags"].CopyFrom(encode_column(lists))
    decoded = decode_request(req, as_int_lists).candidates["tags"].to_series()
    assert decoded.dtype == pl.List(pl.Int64)
    assert decoded.to_list() == lists


def test_empty_lists_of_either_kind_fit_any_list_feature(raw_request: Any, fitted: FittedTransform) -> None:
    req = raw_request.to_proto()
    req.candidates.features["tags"].CopyFrom(encode_column([[] for _ in raw_request.item_ids]))
    assert req.candidates.features["tags"].WhichOneof("kind") == "int_lists"
    assert decode_request(req, fitted).candidates["tags"].to_series().to_list() == [[]] * len(raw_request.item_ids)


def test_ints_are_accepted_for_float_features(raw_request: Any, fitted: FittedTransform) -> None:
    req = raw_request.to_proto()
    req.candidates.features["duration_s"].CopyFrom(encode_column(list(range(len(raw_request.item_ids)))))
    got = decode_request(req, fitted).candidates["duration_s"]
    assert got.dtype == np.float64


def test_unseen_ids_are_not_errors(raw_request: Any, fitted: FittedTransform) -> None:
    n = len(raw_request.item_ids)
    req = dataclasses.replace(
        raw_request,
        user={**raw_request.user, "user_id": 10**12},
        context={**raw_request.context, "device": "fridge"},
        candidates={**raw_request.candidates, "category": ["never_seen"] * n},
        item_ids=list(range(10**9, 10**9 + n)),
    ).to_proto()
    user, context, candidates, _, _ = decode_request(req, fitted)
    frame = fitted.transform_request(user, context, candidates)
    assert (frame["s_item_id"] == 0).all() and (frame["s_user_id"] == 0).all()


def _set(path: str, value: Any) -> Callable[[pb.RankRequest], None]:
    """A mutation that replaces one user/context value or candidate column."""

    def mutate(req: pb.RankRequest) -> None:
        source, name = path.split(":")
        if source == "features":
            req.candidates.features[name].CopyFrom(value)
        else:
            getattr(req, source)[name].CopyFrom(value)

    return mutate


def _drop(source: str, name: str) -> Callable[[pb.RankRequest], None]:
    def mutate(req: pb.RankRequest) -> None:
        target = req.candidates.features if source == "features" else getattr(req, source)
        del target[name]

    return mutate


def _empty_ids(req: pb.RankRequest) -> None:
    req.candidates.item_ids.CopyFrom(pb.FeatureColumn(ints=pb.Int64Column()))


def _unset_ids(req: pb.RankRequest) -> None:
    req.candidates.ClearField("item_ids")


def _item_key_as_feature(req: pb.RankRequest) -> None:
    req.candidates.features["item_id"].CopyFrom(req.candidates.item_ids)


TAGS_4 = pb.FeatureColumn(string_lists=pb.StringListColumn(values=["a"] * 4, lengths=[1, 1, 1, 1]))
TAGS_BAD_SUM = pb.FeatureColumn(string_lists=pb.StringListColumn(values=["a"] * 9, lengths=[1] * 10))
DURATION_NAN = encode_column([1.0, float("nan"), *[1.0] * 8])
DURATION_INF = encode_column([1.0, 2.0, float("inf"), *[1.0] * 7])

BAD_REQUESTS = {
    "no candidates": (_empty_ids, "candidates.item_ids: no candidates"),
    "item ids unset": (_unset_ids, "candidates.item_ids: no column set"),
    "unknown user feature": (_set("user:age", encode_value(30)), "user['age']: unknown user feature"),
    "unknown context feature": (_set("context:weather", encode_value("rain")), "context['weather']: unknown"),
    "unknown candidate feature": (
        _set("features:color", encode_column(["red"] * 10)),
        "candidates.features['color']: unknown candidate feature",
    ),
    "missing user feature": (_drop("user", "user_id"), "user['user_id']: missing user feature"),
    "missing context feature": (_drop("context", "hour"), "context['hour']: missing context feature"),
    "missing candidate feature": (
        _drop("features", "duration_s"),
        "candidates.features['duration_s']: missing candidate feature",
    ),
    "short column": (
        _set("features:duration_s", encode_column([1.0, 2.0, 3.0])),
        "candidates.features['duration_s']: 3 values, expected 10 (one per item id)",
    ),
    "long column": (
        _set("features:category", encode_column(["x"] * 11)),
        "candidates.features['category']: 11 values, expected 10 (one per item id)",
    ),
    "jagged lengths count": (
        _set("features:tags", TAGS_4),
        "candidates.features['tags'].lengths: 4 entries, expected 10 (one per item id)",
    ),
    "jagged lengths sum": (
        _set("features:tags", TAGS_BAD_SUM),
        "candidates.features['tags']: lengths sum to 10 but 9 values were given",
    ),
    "nan": (_set("features:duration_s", DURATION_NAN), "candidates.features['duration_s']: value nan at index 1"),
    "inf": (_set("features:duration_s", DURATION_INF), "candidates.features['duration_s']: value inf at index 2"),
    "wrong column kind": (
        _set("features:duration_s", encode_column(["long"] * 10)),
        "candidates.features['duration_s']: strings given, expected float values",
    ),
    "wrong value kind": (
        _set("user:user_id", encode_value(1.5)),
        "user['user_id']: float_value given, expected an int value",
    ),
    "value unset": (_set("context:device", pb.FeatureValue()), "context['device']: no value set"),
    "non-finite value": (_set("user:user_id", encode_value(float("nan"))), "user['user_id']"),
    "item key as feature": (_item_key_as_feature, "candidates.features['item_id']: the item key is sent in"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_names_the_field(case: str, raw_request: Any, fitted: FittedTransform) -> None:
    mutate, message = BAD_REQUESTS[case]
    req = raw_request.to_proto()
    mutate(req)
    with pytest.raises(DecodeError) as err:
        decode_request(req, fitted)
    assert message in str(err.value)


def test_non_finite_float_value_is_rejected(raw_request: Any, fitted: FittedTransform) -> None:
    as_float_user = dataclasses.replace(fitted, raw_types={**fitted.raw_types, "user_id": "float"})
    req = raw_request.to_proto()
    req.user["user_id"].CopyFrom(encode_value(float("-inf")))
    with pytest.raises(DecodeError, match=r"user\['user_id'\]: -inf is not finite"):
        decode_request(req, as_float_user)


def test_too_many_candidates(raw_request: Any, fitted: FittedTransform) -> None:
    with pytest.raises(DecodeError, match=r"candidates.item_ids: 10 candidates, at most 3 are allowed"):
        decode_request(raw_request.to_proto(), fitted, max_candidates=3)


def test_decode_error_is_a_value_error() -> None:
    assert issubclass(DecodeError, ValueError)
