"""Client helpers: Python values -> proto oneofs, and the ranking table."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from protos.ranking.v1 import ranker_pb2 as pb
from serving.client import build_request, encode_column, encode_value, format_ranking


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (3, "int_value"),
        (np.int8(3), "int_value"),
        (2.5, "float_value"),
        ("ios", "string_value"),
        ([1, 2], "int_list"),
        ([], "int_list"),
        (("a", "b"), "string_list"),
    ],
)
def test_encode_value_picks_the_oneof(value: Any, kind: str) -> None:
    assert encode_value(value).WhichOneof("kind") == kind


@pytest.mark.parametrize("value", [True, None, {"a": 1}, [1, "a"], [1.5]])
def test_encode_value_rejects_other_types(value: Any) -> None:
    with pytest.raises(TypeError, match=r"user\['x'\]: cannot encode"):
        encode_value(value, "user['x']")


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        ([1, 2], "ints"),
        (np.array([1, 2], dtype=np.int32), "ints"),
        ([1, 2.5], "floats"),
        (np.array([0.5, 1.5], dtype=np.float32), "floats"),
        (["a", "b"], "strings"),
        ([[1], [], [2, 3]], "int_lists"),
        ([["a"], [], ["b", "c"]], "string_lists"),
        ([[], []], "int_lists"),
    ],
)
def test_encode_column_picks_the_oneof(values: Any, kind: str) -> None:
    assert encode_column(values).WhichOneof("kind") == kind


def test_encode_column_flattens_lists_with_lengths() -> None:
    col = encode_column([["a"], [], ["b", "c"]]).string_lists
    assert (list(col.values), list(col.lengths)) == (["a", "b", "c"], [1, 0, 2])


@pytest.mark.parametrize("values", [[1, "a"], [None], [[1], ["a"]], [True, False]])
def test_encode_column_rejects_mixed_types(values: Any) -> None:
    with pytest.raises(TypeError, match=r"candidates\['x'\]: cannot encode a column"):
        encode_column(values, "candidates['x']")


def test_build_request_sets_every_field() -> None:
    req = build_request(
        {"user_id": 1},
        {"device": "ios"},
        {"duration_s": [1.0, 2.0]},
        ["a", "b"],
        objective_weights={"like": 2.0},
        top_k=1,
        request_id="r",
        model_version="3",
    )
    assert list(req.candidates.item_ids.strings.values) == ["a", "b"]
    assert req.user["user_id"].int_value == 1 and req.context["device"].string_value == "ios"
    assert (dict(req.objective_weights), req.top_k, req.request_id, req.model_version) == ({"like": 2.0}, 1, "r", "3")


def test_format_ranking_is_a_fixed_width_table() -> None:
    resp = pb.RankResponse(model_name="ranker", model_version="7")
    for i, (item, score) in enumerate([("item-long-id-1", 2.0), ("b", -0.5), ("c", -1.0)]):
        resp.candidates.add(item_id=item, index=i, score=score, objective_scores={"like": 0.1, "click": 0.9})
    lines = format_ranking(resp, limit=2).splitlines()
    assert lines[0] == "ranker v7, 3 candidates"
    assert lines[1].split() == ["rank", "item_id", "score", "click", "like"]
    assert len(lines) == 4 and len({len(line) for line in lines[1:]}) == 1
    assert lines[2].split() == ["1", "item-long-id-1", "2.0000", "0.9000", "0.1000"]
