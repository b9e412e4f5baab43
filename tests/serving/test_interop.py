"""Interop: an independent Node client (``tests/serving/interop/client.js``) that knows only the ``.proto``.

The client uses ``@grpc/grpc-js`` and ``@grpc/proto-loader`` (pinned in ``interop/package.json``,
locked in ``interop/package-lock.json``), installed with ``npm ci`` into ``interop/node_modules`` on
first use; a failing install fails the test (only a machine without ``node``/``npm`` skips it). The
request goes to Node as proto3 JSON, so its wire encoding is protobufjs's, not Python's; the
answers must match the Python client's to the last few bits.
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
from serving.client import RankerClient, build_request

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


def _run_node(client: Path, target: str, req: pb.RankRequest, tmp_path: Path) -> dict[str, Any]:
    """Send ``req`` with the Node client; its printed result as a dict."""
    request_json = tmp_path / "request.json"
    body = json_format.MessageToDict(req, preserving_proto_field_name=True)  # int64 as strings
    request_json.write_text(json.dumps(body, ensure_ascii=False), encoding="utf-8")
    assert NODE is not None
    cmd = [NODE, str(client), target, str(PROTO), str(request_json)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, encoding="utf-8")
    assert done.returncode == 0, f"node client failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_node_client_ranks_like_the_python_client(
    node_client: Path, server: Any, raw_request: Any, tmp_path: Path
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
    with RankerClient(server.target) as client:
        client.wait_ready(timeout_s=10)
        want = client.rank(user, raw_request.context, raw_request.candidates, item_ids, **kwargs)
    req = build_request(user, raw_request.context, raw_request.candidates, item_ids, **kwargs)
    got = _run_node(node_client, server.target, req, tmp_path)

    assert got["health"] == "SERVING"
    assert (got["code"], got["details"]) == ("OK", "")
    resp = got["response"]
    assert (resp["request_id"], resp["model_name"], resp["model_version"]) == (
        want.request_id,
        want.model_name,
        want.model_version,
    )
    assert resp["server_time_us"].isdigit() and int(resp["server_time_us"]) > 0  # uint64 as a string
    assert [(c["item_id"], c["index"]) for c in resp["candidates"]] == [(c.item_id, c.index) for c in want.candidates]
    assert len(resp["candidates"]) == len(item_ids) - 1
    assert {str(2**62 + 1), str(2**63 - 1)} & {c["item_id"] for c in resp["candidates"]}  # one may be the worst
    for node_c, py_c in zip(resp["candidates"], want.candidates, strict=True):
        assert node_c["score"] == pytest.approx(py_c.score, abs=SCORE_ATOL, rel=0)
        assert set(node_c["objective_scores"]) == set(py_c.objective_scores)
        for task, score in py_c.objective_scores.items():
            assert node_c["objective_scores"][task] == pytest.approx(score, abs=SCORE_ATOL, rel=0)


def test_node_client_gets_invalid_argument_naming_the_field(
    node_client: Path, server: Any, raw_request: Any, tmp_path: Path
) -> None:
    req = raw_request.to_proto(request_id="interop-bad")
    del req.context["device"]
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.RankerStub(channel).Rank(req, timeout=10)
    got = _run_node(node_client, server.target, req, tmp_path)
    assert (got["code"], got["response"]) == ("INVALID_ARGUMENT", None)
    assert got["details"] == err.value.details()
    assert got["details"].startswith("context['device']: missing context feature")
