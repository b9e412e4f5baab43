"""The committed stubs are exactly what ``protos/generate.sh`` writes from ``ranker.proto``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO = "protos/ranking/v1/ranker.proto"
GENERATED = ("ranker_pb2.py", "ranker_pb2.pyi", "ranker_pb2_grpc.py")


def test_stubs_match_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    outs = [f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}"]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", *outs, PROTO], cwd=ROOT, check=True)
    for name in GENERATED:
        fresh = tmp_path / "protos" / "ranking" / "v1" / name
        committed = ROOT / "protos" / "ranking" / "v1" / name
        assert fresh.read_bytes() == committed.read_bytes(), f"{name} is stale; run protos/generate.sh"


def test_generated_code_imports_through_the_protos_package() -> None:
    text = (ROOT / "protos" / "ranking" / "v1" / "ranker_pb2_grpc.py").read_text()
    assert "from protos.ranking.v1 import ranker_pb2" in text
    from protos.ranking.v1 import ranker_pb2

    assert ranker_pb2.DESCRIPTOR.package == "ranking.v1"
    assert ranker_pb2.DESCRIPTOR.services_by_name["Ranker"].full_name == "ranking.v1.Ranker"
