"""Publish a new champion, then a broken one, while a server is under load: count failed requests.

One run, on loopback: a small synthetic log and a default-size (untrained) model are registered as
``ranker`` v1 with alias ``champion`` in a fresh sqlite MLflow store; ``ranker serve --model
models:/ranker@champion --reload-interval-s 0.5`` runs in its own process; 8 client threads send
Rank calls back to back. At 5 s a new version (different weights) becomes champion, at 12 s a broken
one (corrupted weights file). The script prints every status code seen, which model version
answered in each second, and whether the server logged the rejection.

    .venv/bin/python benchmarks/publish_under_load.py [--seconds 20] [--threads 8]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch
from mlflow import MlflowClient

from features.build import build
from features.fitted import FittedTransform
from features.spec import load_spec
from features.synthetic import SynthConfig, write_log
from pipelines.requests import request_from_log
from pipelines.tracking import ensure_experiment, register_artifact
from protos.ranking.v1 import ranker_pb2_grpc as pb_grpc
from ranking.artifact import build_model, export_artifact
from ranking.config import ModelConfig
from serving.client import build_request


def publish(client: MlflowClient, uri: str, run_id: str, folder: Path, name: str) -> str:
    """Log ``folder`` under the run as ``name`` and make it the champion; returns the version."""
    client.log_artifacts(run_id, str(folder), name)
    return str(register_artifact(uri, run_id, name, "ranker", "champion").version)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="ranker serve --workers (server processes)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="publish-"))
    write_log(SynthConfig(days=2, requests_per_day=200), work / "log")
    build(work / "log", load_spec("synthetic"), work / "feat")
    fitted = FittedTransform.load(work / "feat" / "transform.json")
    cfg = ModelConfig.from_fitted(fitted)
    good = export_artifact(build_model(cfg), cfg, fitted, work / "v1", {"model_name": "ranker"})
    torch.manual_seed(1)
    newer = export_artifact(build_model(cfg), cfg, fitted, work / "v2", {"model_name": "ranker"})
    broken = shutil.copytree(good, work / "v3")
    (broken / "weights.pt").write_bytes(b"not a weights file")

    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = client.create_run(ensure_experiment(uri, "publish-under-load")).info.run_id
    publish(client, uri, run_id, good, "v1")

    ready, log = work / "port", work / "server.log"
    cmd = [sys.executable, "-m", "pipelines", "serve", "--model", "models:/ranker@champion", "--tracking-uri", uri,
           "--port", "0", "--ready-file", str(ready), "--reload-interval-s", "0.5", "--log-format", "text",
           "--workers", str(args.workers)]
    with log.open("w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        while not (ready.is_file() and ready.read_text().strip()):
            if server.poll() is not None:
                raise SystemExit(f"server exited early; see {log}")
            time.sleep(0.1)
        target = f"127.0.0.1:{ready.read_text().strip()}"
        raw = request_from_log(work / "log", load_spec("synthetic"), 0)
        req = build_request(raw.user, raw.context, raw.candidates, raw.item_ids)
        codes: collections.Counter[str] = collections.Counter()
        seen: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        start, stop = time.monotonic(), threading.Event()

        def load() -> None:
            with grpc.insecure_channel(target) as ch:
                stub = pb_grpc.RankerStub(ch)
                while not stop.is_set():
                    try:
                        resp = stub.Rank(req, timeout=10)
                        codes["OK"] += 1
                        seen[int(time.monotonic() - start)][resp.model_version] += 1
                    except grpc.RpcError as e:
                        codes[e.code().name] += 1

        threads = [threading.Thread(target=load) for _ in range(args.threads)]
        for t in threads:
            t.start()
        time.sleep(5)
        v2 = publish(client, uri, run_id, newer, "v2")
        print(f"{time.monotonic() - start:5.1f}s published v{v2} (good) as champion")
        time.sleep(7)
        v3 = publish(client, uri, run_id, broken, "v3")
        print(f"{time.monotonic() - start:5.1f}s published v{v3} (broken weights) as champion")
        time.sleep(max(args.seconds - 12, 3))
        stop.set()
        for t in threads:
            t.join()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"requests by status: {dict(codes)}")
    print("versions answering, per second: " + ", ".join(
        f"{s}s {'/'.join(f'v{v}x{n}' for v, n in sorted(c.items()))}" for s, c in sorted(seen.items())))
    rejected = [line.strip()[:240] for line in log.read_text().splitlines() if "load failed" in line]
    print("server log, failed loads:", *(rejected[:3] or ["(nothing)"]), sep="\n  ")
    failed = sum(n for c, n in codes.items() if c != "OK")
    print(f"failed requests: {failed} of {sum(codes.values())}")


if __name__ == "__main__":
    main()
