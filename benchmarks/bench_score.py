"""Batch scoring against the gRPC path on the same rows: ``ranker score`` (Polars, Ray Data) vs ``ranker serve``.

The serving benchmark's default model and synthetic log; the rows are the log's first ``--requests``
logged slates. Three ways to score them, one after the other on this machine:

* ``ranker score`` on the Polars engine (this process; batches of ``--batch-rows``);
* ``ranker score --engine ray`` on a local Ray with ``--workers`` actors (one model each);
* ``ranker serve --workers N`` answering the same slates as Rank calls (one request per slate) from
  ``--concurrency`` closed-loop callers in this process (the client shares the cores).

Each is timed end to end (the Ray figure includes starting Ray and its actors; the overhead is
given apart) and reported as rows/s, with the peak resident memory of the process tree.

    .venv/bin/python benchmarks/bench_score.py                 # ~3 min
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import polars as pl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=5000, help="logged slates to score")
    ap.add_argument("--batch-rows", type=int, default=65_536)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--files", type=int, default=8, help="Parquet files the rows are written as")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import bench_serving as bs
    import replica_restart as rr

    from pipelines.score import score_log
    from pipelines.score_ray import connect, score_log_ray
    from serving.client import build_request

    rows_out: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench_score_") as tmp:
        work = Path(tmp)
        log, artifact, _ = bs.build_artifact(work)
        from features.fitted import FittedTransform

        spec = FittedTransform.load(artifact / "transform.json").spec
        raw = pl.concat([pl.read_parquet(f) for f in sorted(log.rglob("*.parquet"))], how="vertical_relaxed")
        ids = raw[spec.keys.request].unique(maintain_order=True).head(args.requests)
        rows = raw.filter(pl.col(spec.keys.request).is_in(ids.to_list()))
        n = rows.height
        (work / "rows").mkdir()
        per = -(-n // args.files)
        for i in range(args.files):  # a log of several files, as a real one: the Ray engine reads them in parallel
            rows.slice(i * per, per).write_parquet(work / "rows" / f"part-{i:03d}.parquet")

        t0 = time.perf_counter()
        polars = score_log(str(artifact), work / "rows", work / "polars", batch_rows=args.batch_rows)
        t_polars = time.perf_counter() - t0
        rows_out.append(f"| ranker score (Polars, 1 process) | {n:,} | {t_polars:.1f} | {n / t_polars:,.0f} | |")

        t0 = time.perf_counter()
        connect(None, num_cpus=os.cpu_count())
        t_start = time.perf_counter() - t0
        ray_summary = score_log_ray(str(artifact), work / "rows", work / "ray", batch_rows=args.batch_rows,
                                    workers=args.workers)
        t_ray = time.perf_counter() - t0
        import ray

        ray.shutdown()
        rows_out.append(f"| ranker score --engine ray ({ray_summary.extra['workers']} actors, local Ray) | {n:,} | "
                        f"{t_ray:.1f} | {n / t_ray:,.0f} | Ray start {t_start:.1f} s; scoring + writing "
                        f"{ray_summary.seconds:.1f} s ({n / ray_summary.seconds:,.0f} rows/s) |")

        item = spec.keys.item
        reqs = []
        for _, g in rows.group_by(spec.keys.request, maintain_order=True):
            first = g.row(0, named=True)
            reqs.append(build_request({c: first[c] for c in spec.features_from("user")},
                                      {c: first[c] for c in spec.features_from("context")},
                                      {c: g[c].to_list() for c in spec.features_from("item") if c != item},
                                      g[item].to_list()).SerializeToString())
        replica = rr.Replica(str(artifact), work, "serve", workers=args.workers)
        replica.start()
        try:
            with rr.Load([f"127.0.0.1:{replica.port}"], reqs, args.concurrency) as load:
                t0 = time.perf_counter()
                while len(load.calls) < len(reqs):
                    time.sleep(0.05)
                t_grpc = time.perf_counter() - t0
            done = load.calls[: len(reqs)]
            failed = sum(1 for c in done if c[2])
        finally:
            replica.stop()
        rows_out.append(f"| ranker serve --workers {args.workers}, {args.concurrency} callers (one Rank per slate) | "
                        f"{n:,} | {t_grpc:.1f} | {n / t_grpc:,.0f} | {len(reqs):,} calls, {failed} failed |")
        same = polars.rows_scored == ray_summary.rows_scored == n
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    command = shlex.join([".venv/bin/python", "benchmarks/bench_score.py", *sys.argv[1:]])
    text = "\n".join([
        f"## Batch scoring vs the gRPC path ({datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()} cores)", "",
        f"`{command}`; the serving benchmark's default model, {args.requests:,} logged slates; every engine scored "
        f"all {n:,} rows: {same}; peak RSS of this process or one child {peak / 1024:,.0f} MiB.", "",
        "| path | rows | seconds | rows/s | note |", "|---|---|---|---|---|", *rows_out, ""])
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
