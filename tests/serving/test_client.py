"""Client helpers: Python values -> proto oneofs, and the ranking table."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from protos.ranking.v1 import ranker_pb2 as pb
from serving.client import build_request, encode_column, encode_value, format_ranking, read_ranking


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
    assert req.response_format == pb.RESPONSE_FORMAT_CANDIDATES  # v1's list unless asked otherwise


def test_build_request_sets_the_response_format() -> None:
    req = build_request({}, {}, {}, [1], response_format=pb.RESPONSE_FORMAT_COLUMNS)
    assert req.response_format == pb.RESPONSE_FORMAT_COLUMNS
    assert pb.RankRequest.FromString(req.SerializeToString()).response_format == pb.RESPONSE_FORMAT_COLUMNS


def test_format_ranking_is_a_fixed_width_table() -> None:
    resp = pb.RankResponse(model_name="ranker", model_version="7")
    for i, (item, score) in enumerate([("item-long-id-1", 2.0), ("b", -0.5), ("c", -1.0)]):
        resp.candidates.add(item_id=item, index=i, score=score, objective_scores={"like": 0.1, "click": 0.9})
    lines = format_ranking(resp, limit=2).splitlines()
    assert lines[0] == "ranker v7, 3 candidates"
    assert lines[1].split() == ["rank", "item_id", "score", "click", "like"]
    assert len(lines) == 4 and len({len(line) for line in lines[1:]}) == 1
    assert lines[2].split() == ["1", "item-long-id-1", "2.0000", "0.9000", "0.1000"]


ROWS = [("item-long-id-1", 4, 2.0, {"like": 0.1, "click": 0.9}), ("b", 0, -0.5, {"like": 0.2, "click": 0.3}),
        ("c", 2, -1.0, {"like": 0.7, "click": 0.05})]


def _as_candidates(rows: list[Any]) -> pb.RankResponse:
    resp = pb.RankResponse(model_name="ranker", model_version="7")
    for item, index, score, objectives in rows:
        resp.candidates.add(item_id=item, index=index, score=score, objective_scores=objectives)
    return resp


def _as_columns(rows: list[Any]) -> pb.RankResponse:
    tasks = rows[0][3]
    ranked = pb.RankedColumns(
        item_ids=[r[0] for r in rows], index=[r[1] for r in rows], score=[r[2] for r in rows],
        objective_scores={t: pb.DoubleColumn(values=[r[3][t] for r in rows]) for t in tasks},
    )
    return pb.RankResponse(model_name="ranker", model_version="7", ranked=ranked)


@pytest.mark.parametrize("form", [_as_candidates, _as_columns], ids=["candidates", "columns"])
def test_read_ranking_reads_either_form(form: Any) -> None:
    got = read_ranking(form(ROWS))
    assert len(got) == 3 and got.item_ids == ["item-long-id-1", "b", "c"]
    assert got.index.dtype == np.int64 and got.index.tolist() == [4, 0, 2]
    assert got.score.dtype == np.float64 and got.score.tolist() == [2.0, -0.5, -1.0]
    assert sorted(got.objective_scores) == ["click", "like"]
    assert got.objective_scores["click"].tolist() == [0.9, 0.3, 0.05]
    assert got.objective_scores["like"].tolist() == [0.1, 0.2, 0.7]


def test_read_ranking_prefers_the_columns_when_both_are_set() -> None:
    resp = _as_candidates(ROWS)
    resp.ranked.CopyFrom(_as_columns(ROWS[:1]).ranked)  # differ on purpose, to see which one is read
    assert read_ranking(resp).item_ids == ["item-long-id-1"]


def test_read_ranking_of_an_empty_response_is_empty() -> None:
    got = read_ranking(pb.RankResponse())
    assert (len(got), got.index.shape, got.score.shape, got.objective_scores) == (0, (0,), (0,), {})


def test_format_ranking_prints_both_forms_alike() -> None:
    assert format_ranking(_as_columns(ROWS), limit=2) == format_ranking(_as_candidates(ROWS), limit=2)
    lines = format_ranking(_as_columns(ROWS)).splitlines()
    assert lines[0] == "ranker v7, 3 candidates" and len(lines) == 5
    assert lines[4].split() == ["3", "c", "-1.0000", "0.0500", "0.7000"]
