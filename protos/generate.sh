#!/usr/bin/env bash
# Regenerate the Python stubs of the API from the repository root, so that generated imports read
# `from protos.ranking.v1 import ranker_pb2` (the top-level `ranking` package is ours, not the proto's).
# tests/protos/test_stubs_fresh.py fails when the committed stubs differ from what this writes.
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-.venv/bin/python}" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/ranking/v1/ranker.proto
