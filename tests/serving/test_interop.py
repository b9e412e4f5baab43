"""Interop: an independent Node client (``tests/serving/interop/client.js``) that knows only the ``.proto``.

The client uses ``@grpc/grpc-js`` and ``@grpc/proto-loader`` (pinned in ``interop/package.json``,
locked in ``interop/package-lock.json``), installed with ``npm ci`` into ``interop/node_modules`` on
first use; a failing install fails the test (only a machine without ``node``/``npm`` skips it). The
request goes to Node as proto3 JSON, so its wire encoding is protobufjs's, not Python's; the
answers must match the Python client's to the last few bits, in every ``response_format``: the
Node client reads the ranking from ``ranked`` (the columns) when set, else from ``candidates``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from protos.ranking.v1 import ranker_pb2 as pb
from protos.ranking.v1 import ranker_pb2_grpc as pb_grpc
from serving.client import RankerClient, build_request, read_ranking

ROOT = Path(__file__).resolve().parents[2]
INTEROP = Path(__file__).resolve().parent / "interop"
PROTO = ROOT / "protos" / "ranking" / "v1" / "ranker.proto"
NODE, NPM = shutil.which("node"), shutil.which("npm")
SCORE_ATOL = 1e-9

pytestmark = pytest.mark.skipif(NODE is None or NPM is None, reason="node and npm must be on PATH for the Node client")


def _installed() -> bool:
    """``npm ci`` has run against the current lockfile (npm writes the hidden lockfile last)."""
    hidden = INTEROP / "node_modules" / ".package-lock.json"
    lock = INTEROP / "package-lock.json"
    return hidden.is_file() and hidden.stat().st_mtime >= lock.stat().st_mtime


@pytest.fixture(scope="module")
def node_client() -> Path:
    """``interop/client.js`` with its dependencies installed (``npm ci`` when absent or stale)."""
    assert NPM is not None
    # One install at a time on this machine: test runs in parallel share the folder.
    lock_name = f"ranker-interop-{hashlib.sha1(str(INTEROP).encode()).hexdigest()[:12]}.lock"
    with open(Path(tempfile.gettempdir()) / lock_name, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _installed():
            cmd = [NPM, "ci", "--prefix", str(INTEROP), "--ignore-scripts", "--no-audit", "--no-fund"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return INTEROP / "client.js"


def _run_node(
    client: Path, target: str, req: pb.RankRequest, tmp_path: Path, fmt: str | None = None
) -> dict[str, Any]:
    """Send ``req`` with the Node client (``fmt``: its ``--format``, set in JavaScript); its printed result."""
    request_json = tmp_path / "request.json"
    body = json_format.MessageToDict(req, preserving_proto_field_name=True)  # int64 as strings
    request_json.write_text(json.dumps(body, ensure_ascii=False), encoding="utf-8")
    assert NODE is not None
    cmd = [NODE, str(client), *(["--format", fmt] if fmt else []), target, str(PROTO), str(request_json)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, encoding="utf-8")
    assert done.returncode == 0, f"node client failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def _node_rows_of_candidates(resp: dict[str, Any]) -> list[dict[str, Any]]:
    """The Node client's decoded ``candidates`` list, as its rows."""
    return [{k: c[k] for k in ("item_id", "index", "score", "objective_scores")} for c in resp["candidates"]]


# (--format given to Node, response_format in the request JSON): COLUMNS is set by the JavaScript
# side (an enum by name, encoded by protobufjs), BOTH comes in the JSON from Python.
FORMATS = {
    "candidates": (None, pb.RESPONSE_FORMAT_CANDIDATES),
    "columns": ("COLUMNS", pb.RESPONSE_FORMAT_CANDIDATES),
    "both": (None, pb.RESPONSE_FORMAT_BOTH),
}


@pytest.mark.parametrize("form", list(FORMATS))
def test_node_client_ranks_like_the_python_client(
    node_client: Path, server: Any, raw_request: Any, tmp_path: Path, form: str
) -> None:
    # Ids beyond 2**53 check that int64 survives JSON and protobufjs (JavaScript numbers would round them).
    item_ids = [*raw_request.item_ids[:-2], 2**62 + 1, 2**63 - 1]
    user = {**raw_request.user, "user_id": 2**53 + 1}
    kwargs: dict[str, Any] = {
        "objective_weights": {"like": 3.0, "dismiss": 0.5},
        "top_k": len(item_ids) - 1,  # all but the worst
        "request_id": "interop-ключ-🔑",
        "model_version": "1",
    }
    node_format, json_format_value = FORMATS[form]
    with RankerClient(server.target) as client:
        client.wait_ready(timeout_s=10)
        want = client.rank(user, raw_request.context, raw_request.candidates, item_ids, **kwargs)
        want_cols = client.rank(user, raw_request.context, raw_request.candidates, item_ids, **kwargs,
                                response_format=pb.RESPONSE_FORMAT_COLUMNS)
    req = build_request(user, raw_request.context, raw_request.candidates, item_ids, **kwargs,
                        response_format=json_format_value)
    got = _run_node(node_client, server.target, req, tmp_path, node_format)

    assert got["health"] == "SERVING"
    assert (got["code"], got["details"]) == ("OK", "")
    resp = got["response"]
    assert (resp["request_id"], resp["model_name"], resp["model_version"]) == (
        want.request_id,
        want.model_name,
        want.model_version,
    )
    assert resp["server_time_us"].isdigit() and int(resp["server_time_us"]) > 0  # uint64 as a string
    # Which fields the server filled, as Node decoded them.
    assert (len(resp["candidates"]) > 0, resp["ranked"] is not None) == {
        "candidates": (True, False), "columns": (False, True), "both": (True, True)
    }[form]
    if form == "both":  # one answer, two forms: equal to the bit
        assert got["rows"] == _node_rows_of_candidates(resp)

    rows = got["rows"]
    py = read_ranking(want)
    assert [(r["item_id"], r["index"]) for r in rows] == list(zip(py.item_ids, py.index.tolist(), strict=True))
    assert read_ranking(want_cols).item_ids == py.item_ids  # Python's columns: the same order
    assert len(rows) == len(item_ids) - 1
    assert {str(2**62 + 1), str(2**63 - 1)} & {r["item_id"] for r in rows}  # one may be the worst
    for j, row in enumerate(rows):
        assert row["score"] == pytest.approx(float(py.score[j]), abs=SCORE_ATOL, rel=0)
        assert set(row["objective_scores"]) == set(py.objective_scores)
        for task, scores in py.objective_scores.items():
            assert row["objective_scores"][task] == pytest.approx(float(scores[j]), abs=SCORE_ATOL, rel=0)


def test_node_client_gets_invalid_argument_for_an_unknown_response_format(
    node_client: Path, server: Any, raw_request: Any, tmp_path: Path
) -> None:
    req = raw_request.to_proto(request_id="interop-format")
    req.response_format = 7  # type: ignore[assignment]  # an open enum: JSON carries the bare number
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.RankerStub(channel).Rank(req, timeout=10)
    got = _run_node(node_client, server.target, req, tmp_path)
    assert (got["code"], got["response"], got["rows"]) == ("INVALID_ARGUMENT", None, None)
    assert got["details"] == err.value.details()
    assert got["details"].startswith("response_format: unknown value 7;")


def test_node_client_gets_invalid_argument_naming_the_field(
    node_client: Path, server: Any, raw_request: Any, tmp_path: Path
) -> None:
    req = raw_request.to_proto(request_id="interop-bad")
    del req.context["device"]
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.RankerStub(channel).Rank(req, timeout=10)
    got = _run_node(node_client, server.target, req, tmp_path)
    assert (got["code"], got["response"], got["rows"]) == ("INVALID_ARGUMENT", None, None)
    assert got["details"] == err.value.details()
    assert got["details"].startswith("context['device']: missing context feature")
