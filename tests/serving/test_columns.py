"""The column-wise response (``RankRequest.response_format``) against the real server on loopback.

Every form must carry the same ranking, to the bit: the columns are what the candidates would
hold, in the same order, cut to ``top_k`` the same way, scored with the same weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from protos.ranking.v1 import ranker_pb2 as pb
from protos.ranking.v1 import ranker_pb2_grpc as pb_grpc
from ranking.inference import InferenceModel
from serving.client import RankerClient, Ranking, format_ranking, read_ranking

CANDIDATES, COLUMNS, BOTH = pb.RESPONSE_FORMAT_CANDIDATES, pb.RESPONSE_FORMAT_COLUMNS, pb.RESPONSE_FORMAT_BOTH
WEIGHTS = {"click": 0.0, "like": 0.0, "dismiss": 0.0, "watch_time": 1.0}  # ranks by watch_time alone


@pytest.fixture(scope="module")
def stub(server: Any) -> Iterator[pb_grpc.RankerStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.RankerStub(channel)


def _columns(resp: pb.RankResponse) -> Ranking:
    """``resp.ranked`` as a ``Ranking``, without going through the candidates."""
    assert resp.HasField("ranked")
    cols = resp.ranked
    return Ranking(
        item_ids=list(cols.item_ids),
        index=np.array(cols.index, dtype=np.int64),
        score=np.array(cols.score, dtype=np.float64),
        objective_scores={t: np.array(c.values) for t, c in cols.objective_scores.items()},
    )


def _candidates(resp: pb.RankResponse) -> Ranking:
    """``resp.candidates`` as a ``Ranking``, one message at a time."""
    cands = list(resp.candidates)
    tasks = {t for c in cands for t in c.objective_scores}
    return Ranking(
        item_ids=[c.item_id for c in cands],
        index=np.array([c.index for c in cands], dtype=np.int64),
        score=np.array([c.score for c in cands]),
        objective_scores={t: np.array([c.objective_scores[t] for c in cands]) for t in tasks},
    )


def _assert_same(got: Ranking, want: Ranking) -> None:
    """Equal to the last bit: ids, indices, combined and every objective's scores, in order."""
    assert got.item_ids == want.item_ids
    np.testing.assert_array_equal(got.index, want.index)
    np.testing.assert_array_equal(got.score, want.score)
    assert set(got.objective_scores) == set(want.objective_scores)
    for task, scores in want.objective_scores.items():
        np.testing.assert_array_equal(got.objective_scores[task], scores, err_msg=task)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"top_k": 3}, {"objective_weights": WEIGHTS}, {"objective_weights": {"like": 3.0}, "top_k": 1}],
    ids=["all", "top3", "watch_time", "like_top1"],
)
def test_columns_hold_exactly_what_the_candidates_hold(
    stub: pb_grpc.RankerStub, raw_request: Any, kwargs: dict[str, Any]
) -> None:
    v1 = stub.Rank(raw_request.to_proto(**kwargs))
    cols = stub.Rank(raw_request.to_proto(response_format=COLUMNS, **kwargs))
    assert len(cols.candidates) == 0
    assert (cols.request_id, cols.model_name, cols.model_version) == (v1.request_id, v1.model_name, v1.model_version)
    _assert_same(_columns(cols), _candidates(v1))
    _assert_same(read_ranking(cols), read_ranking(v1))


def test_columns_follow_the_model_with_top_k_and_weights(
    stub: pb_grpc.RankerStub, raw_request: Any, model: InferenceModel
) -> None:
    resp = stub.Rank(raw_request.to_proto(response_format=COLUMNS, objective_weights=WEIGHTS, top_k=4))
    scores = model.score_request(raw_request.user, raw_request.context, raw_request.all_candidates())
    order = np.argsort(-model.combine(scores, WEIGHTS), kind="stable")[:4]
    got = _columns(resp)
    assert got.index.tolist() == order.tolist()
    assert got.item_ids == [str(raw_request.item_ids[i]) for i in order]
    assert np.all(np.diff(got.score) <= 0), "columns not best first"
    np.testing.assert_allclose(got.score, scores["watch_time"][order], rtol=1e-6)  # the only weighted task
    assert set(got.objective_scores) == set(model.tasks)
    for task, s in scores.items():
        assert len(got.objective_scores[task]) == 4
        np.testing.assert_allclose(got.objective_scores[task], s[order], rtol=1e-6, err_msg=task)
    default = _columns(stub.Rank(raw_request.to_proto(response_format=COLUMNS, top_k=4)))
    assert default.index.tolist() != got.index.tolist(), "the weights changed nothing: a weak check"


def test_both_fills_both_forms_with_the_same_ranking(stub: pb_grpc.RankerStub, raw_request: Any) -> None:
    both = stub.Rank(raw_request.to_proto(response_format=BOTH, top_k=5))
    assert len(both.candidates) == 5 and len(both.ranked.item_ids) == 5
    _assert_same(_columns(both), _candidates(both))
    _assert_same(_candidates(both), _candidates(stub.Rank(raw_request.to_proto(top_k=5))))


def test_default_format_is_v1_unchanged(stub: pb_grpc.RankerStub, raw_request: Any) -> None:
    req = raw_request.to_proto(request_id="v1", top_k=3)
    assert req.response_format == CANDIDATES
    assert 8 not in {f.number for f, _ in req.ListFields()}  # a v1 client's bytes: no field 8 on the wire
    resp = stub.Rank(req)
    assert not resp.HasField("ranked")
    assert 6 not in {f.number for f, _ in resp.ListFields()}
    assert len(resp.candidates) == 3
    explicit = stub.Rank(raw_request.to_proto(request_id="v1", top_k=3, response_format=CANDIDATES))
    resp.server_time_us = explicit.server_time_us = 0
    assert resp.SerializeToString(deterministic=True) == explicit.SerializeToString(deterministic=True)


def test_duplicates_and_ties_keep_request_order_in_the_columns(stub: pb_grpc.RankerStub, raw_request: Any) -> None:
    first = {k: [v[0]] * 3 for k, v in raw_request.candidates.items()}  # one candidate, three times
    dup = dataclasses.replace(raw_request, candidates=first, item_ids=[raw_request.item_ids[0]] * 3)
    resp = stub.Rank(dup.to_proto(response_format=BOTH))
    got = _columns(resp)
    assert sorted(got.index.tolist()) == [0, 1, 2]  # duplicates are scored independently, told apart by index
    assert got.item_ids == [str(raw_request.item_ids[0])] * 3
    # Identical rows may differ in the last bits (the forward is batched), so only equal scores must
    # keep request order.
    for j in range(2):
        if got.score[j] == got.score[j + 1]:
            assert got.index[j] < got.index[j + 1], f"tie at {j} out of request order: {got.index.tolist()}"
    _assert_same(got, _candidates(resp))


@pytest.mark.parametrize("value", [3, 7, 2**31 - 1, -1])
def test_unknown_response_format_is_invalid_argument_naming_the_field(
    stub: pb_grpc.RankerStub, raw_request: Any, value: int
) -> None:
    req = raw_request.to_proto()
    req.response_format = value  # type: ignore[assignment]  # proto3 enums are open: any int32 goes on the wire
    with pytest.raises(grpc.RpcError) as err:
        stub.Rank(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert details.startswith(f"response_format: unknown value {value}; expected one of ")
    assert "RESPONSE_FORMAT_COLUMNS (1)" in details
    assert stub.Rank(raw_request.to_proto(response_format=COLUMNS)).HasField("ranked")  # the server still answers


def test_client_reads_and_prints_both_forms_alike(server: Any, raw_request: Any) -> None:
    args = (raw_request.user, raw_request.context, raw_request.candidates, raw_request.item_ids)
    with RankerClient(server.target) as client:
        client.wait_ready(timeout_s=10)
        v1 = client.rank(*args, top_k=5, objective_weights={"like": 3.0})
        cols = client.rank(*args, top_k=5, objective_weights={"like": 3.0}, response_format=COLUMNS)
    assert len(cols.candidates) == 0 and len(cols.ranked.item_ids) == 5
    _assert_same(read_ranking(cols), read_ranking(v1))
    v1.server_time_us = cols.server_time_us = 0  # the table's first line reports it
    assert format_ranking(cols) == format_ranking(v1)
    assert format_ranking(cols).splitlines()[0] == "ranker v1, 5 candidates"
