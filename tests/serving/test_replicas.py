"""Two ``ranker serve`` replicas behind a round-robin client, restarted one at a time under load.

The local stand-in for a Kubernetes rolling restart of ``deploy/k8s``: real processes on loopback,
real SIGTERM, the client settings the README gives (``serving.client.balanced_channel_options``).
The driver is ``benchmarks/replica_restart.py``, whose full run gives the figures in RESULTS.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import grpc
import pytest

from serving.client import RankerClient, balanced_channel_options
from tests.serving.conftest import RawRequest, Workspace


@pytest.fixture(scope="module")
def driver(load_benchmark: Callable[[str], ModuleType]) -> ModuleType:
    return load_benchmark("replica_restart")


def test_a_rolling_restart_under_load_fails_no_call(driver: ModuleType, workspace: Workspace,
                                                     raw_request: RawRequest, tmp_path: Path) -> None:
    requests = [raw_request.to_proto(request_id=f"r{i}").SerializeToString() for i in range(8)]
    r = driver.rolling_restart(str(workspace.artifact), requests, tmp_path, concurrency=3, before_s=2.0,
                               settle_s=2.0, after_s=2.0)
    assert r.exit_codes == [0, 0]  # each replica drained and exited cleanly on SIGTERM
    assert r.failed == 0, r.failures
    assert all(r.by_phase[p]["calls"] > 20 for p in ("before", "restart", "after")), r.by_phase
    # the client used both replicas, and came back to each one after its restart
    assert min(r.answered_before.values()) > 0, r.answered_before
    assert min(r.answered_after.values()) > 0, r.answered_after


def test_without_the_balanced_settings_one_replica_takes_every_call(
    driver: ModuleType, workspace: Workspace, raw_request: RawRequest, tmp_path: Path
) -> None:
    """The check above can fail: gRPC's default (pick_first) sends everything over one connection."""
    replicas = [driver.Replica(str(workspace.artifact), tmp_path, f"r{i}") for i in range(2)]
    try:
        for rep in replicas:
            rep.start()
        target = "ipv4:" + ",".join(f"127.0.0.1:{rep.port}" for rep in replicas)
        req = raw_request.to_proto()
        with grpc.insecure_channel(target) as plain:
            rank = plain.unary_unary("/ranking.v1.Ranker/Rank", request_serializer=lambda m: m.SerializeToString(),
                                     response_deserializer=lambda b: b)
            for _ in range(20):
                rank(req, timeout=5)
        assert sorted(rep.answered() for rep in replicas) == [0, 20]
        with grpc.insecure_channel(target, balanced_channel_options()) as balanced:
            grpc.channel_ready_future(balanced).result(timeout=10)
            rank = balanced.unary_unary("/ranking.v1.Ranker/Rank",
                                        request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=lambda b: b)
            for _ in range(20):
                rank(req, timeout=5)
        answered = sorted(rep.answered() for rep in replicas)
        assert answered[0] >= 5, answered  # round robin: both got their share (the ready one first)
        with RankerClient(target, balanced=True) as client:  # the small client takes the same settings
            client.wait_ready(timeout_s=10)
            assert client.rank(raw_request.user, raw_request.context, raw_request.candidates,
                               raw_request.item_ids).candidates
    finally:
        for rep in replicas:
            if rep.proc is not None and rep.proc.poll() is None:
                rep.stop()
