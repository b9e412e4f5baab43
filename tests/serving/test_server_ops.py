"""Server options end to end on loopback: batching, overload, metrics, TLS, hot reload, CLI errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.ranking.v1 import ranker_pb2 as pb
from protos.ranking.v1 import ranker_pb2_grpc as pb_grpc
from serving.batcher import BatcherConfig
from serving.server import ServerOptions

from .conftest import BackgroundServer


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _strip(resp: pb.RankResponse) -> bytes:
    resp.server_time_us = 0
    return resp.SerializeToString(deterministic=True)


def test_batched_answers_equal_unbatched_ones_and_batches_form(workspace: Any, raw_request: Any) -> None:
    """32 concurrent requests: with batching, fewer batches than requests and the very same rankings."""
    requests = [raw_request.to_proto(request_id=f"r{i}", top_k=1 + i % 7) for i in range(32)]
    answers = {}
    for enabled in (False, True):
        opts = ServerOptions(metrics_port=0, batching=BatcherConfig(max_queue_delay_us=20_000, enabled=enabled))
        bg = BackgroundServer(workspace.artifact, opts)
        try:
            with grpc.insecure_channel(bg.target) as ch, ThreadPoolExecutor(32) as pool:
                rank = pb_grpc.RankerStub(ch).Rank
                answers[enabled] = list(pool.map(lambda r, rank=rank: _strip(rank(r, timeout=30)), requests))
            assert bg.rs.metrics_port is not None
            m = _scrape(bg.rs.metrics_port)
        finally:
            bg.close()
        assert m[("ranker_requests_total", (("code", "OK"),))] == 32
        batches = m[("ranker_batch_requests_count", ())]
        assert m[("ranker_batch_requests_sum", ())] == 32
        if enabled:
            assert batches < 32, "no two concurrent requests were batched"
        else:
            assert batches == 32
    for off, on in zip(answers[False], answers[True], strict=True):
        a, b = pb.RankResponse.FromString(off), pb.RankResponse.FromString(on)
        assert [c.index for c in a.candidates] == [c.index for c in b.candidates]
        assert [c.score for c in a.candidates] == pytest.approx([c.score for c in b.candidates], rel=1e-6)


def test_full_queue_answers_resource_exhausted_at_once(workspace: Any, raw_request: Any) -> None:
    """max_queue 1 and a long queue delay: the second request is refused within milliseconds."""
    opts = ServerOptions(metrics_port=0, batching=BatcherConfig(max_queue=1, max_queue_delay_us=1_500_000))
    bg = BackgroundServer(workspace.artifact, opts)
    try:
        with grpc.insecure_channel(bg.target) as ch:
            stub = pb_grpc.RankerStub(ch)
            # A request just before makes the batcher expect more: the next one waits for company
            # (a lone request at low rate is cut at once).
            stub.Rank(raw_request.to_proto(request_id="first"), timeout=30)
            first = stub.Rank.future(raw_request.to_proto(request_id="waits"), timeout=30)
            time.sleep(0.3)  # the first one is now queued, waiting for the batch to fill
            t = time.perf_counter()
            with pytest.raises(grpc.RpcError) as err:
                stub.Rank(raw_request.to_proto(request_id="refused"), timeout=30)
            refused_after = time.perf_counter() - t
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused_after < 0.5  # not after the 1.5 s queue delay
            assert len(first.result().candidates) == len(raw_request.item_ids)
        m = _scrape(bg.rs.metrics_port)  # type: ignore[arg-type]
        assert m[("ranker_requests_total", (("code", "RESOURCE_EXHAUSTED"),))] == 1
    finally:
        bg.close()


def test_metrics_count_bad_requests_and_show_the_model_version(workspace: Any, raw_request: Any) -> None:
    bg = BackgroundServer(workspace.artifact, ServerOptions(metrics_port=0))
    try:
        with grpc.insecure_channel(bg.target) as ch:
            stub = pb_grpc.RankerStub(ch)
            stub.Rank(raw_request.to_proto())
            bad = raw_request.to_proto(objective_weights={"nope": 1.0})
            with pytest.raises(grpc.RpcError) as err:
                stub.Rank(bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nope" in err.value.details()
        m = _scrape(bg.rs.metrics_port)  # type: ignore[arg-type]
        assert m[("ranker_requests_total", (("code", "OK"),))] == 1
        assert m[("ranker_requests_total", (("code", "INVALID_ARGUMENT"),))] == 1
        assert m[("ranker_request_latency_seconds_count", ())] == 2
        assert m[("ranker_model_info", (("name", "ranker"), ("version", "1")))] == 1
        assert m[("ranker_model_loads_total", (("outcome", "ok"),))] == 1
    finally:
        bg.close()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_serves_secure_channels_only(workspace: Any, raw_request: Any, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    bg = BackgroundServer(workspace.artifact, ServerOptions(tls_cert=str(cert), tls_key=str(key)))
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"localhost:{bg.rs.port}", creds) as ch:
            resp = pb_grpc.RankerStub(ch).Rank(raw_request.to_proto(), timeout=30)
        assert len(resp.candidates) == len(raw_request.item_ids)
        with grpc.insecure_channel(bg.target) as ch, pytest.raises(grpc.RpcError) as err:
            pb_grpc.RankerStub(ch).Rank(raw_request.to_proto(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        bg.close()


def test_new_version_in_the_folder_is_picked_up_while_serving(workspace: Any, raw_request: Any,
                                                             tmp_path: Path) -> None:
    art = tmp_path / "artifact"
    shutil.copytree(workspace.artifact, art)
    bg = BackgroundServer(art, ServerOptions(reload_interval_s=0.1, metrics_port=0))
    try:
        with grpc.insecure_channel(bg.target) as ch:
            stub = pb_grpc.RankerStub(ch)
            assert stub.Rank(raw_request.to_proto()).model_version == "1"
            meta = json.loads((art / "metadata.json").read_text())
            (art / "metadata.json").write_text(json.dumps({**meta, "model_version": "2"}))
            deadline = time.monotonic() + 10
            version = "1"
            while version == "1" and time.monotonic() < deadline:
                version = stub.Rank(raw_request.to_proto()).model_version  # never fails during the swap
                time.sleep(0.05)
            assert version == "2"
        m = _scrape(bg.rs.metrics_port)  # type: ignore[arg-type]
        assert m[("ranker_model_info", (("name", "ranker"), ("version", "2")))] == 1
        assert ("ranker_model_info", (("name", "ranker"), ("version", "1"))) not in m
        assert m[("ranker_requests_total", (("code", "OK"),))] >= 2
        assert sum(v for (name, labels), v in m.items() if name == "ranker_requests_total"
                   and labels != (("code", "OK"),)) == 0
    finally:
        bg.close()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"tls_cert": "c.pem"}, "tls_cert and tls_key go together"),
        ({"tls_cert": "/nope/c.pem", "tls_key": "/nope/k.pem"}, "tls_cert: file not found: '/nope/c.pem'"),
        ({"reload_interval_s": -1.0}, "reload_interval_s must be finite and >= 0, got -1.0"),
        ({"max_candidates": 0}, "max_candidates must be >= 1, got 0"),
        ({"port": 70000}, "port must be in [0, 65535], got 70000"),
    ],
)
def test_bad_options_name_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ServerOptions(**kwargs)


def test_cli_serve_rejects_a_missing_certificate_in_one_line(tmp_path: Path) -> None:
    ranker = Path(sys.executable).with_name("ranker")
    r = subprocess.run([str(ranker), "serve", "--model", str(tmp_path), "--tls-cert", str(tmp_path / "c.pem"),
                        "--tls-key", str(tmp_path / "k.pem")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines and "tls_cert: file not found" in lines[-1]
    assert "Traceback" not in r.stderr
