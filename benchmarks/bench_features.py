"""Feature pipeline throughput and peak memory, one run, each case in a fresh process.

Cases: the KuaiRand-Pure subset (from ../shared/data) and synthetic logs of 1M, 10M and 50M rows
(a scaling curve). Each case runs ``features.build.build`` (validate + quarantine + split + fit +
transform + write) in a child process; the parent reads the child's peak RSS. Fit and transform
are also timed separately inside the child.

    .venv/bin/python benchmarks/bench_features.py [--sizes 1000000,10000000,50000000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def child(case: str, rows: int, work: Path) -> dict[str, float]:
    """Runs in the child process: prepare input (not timed), then time fit, transform and build."""
    import polars as pl

    from features.build import build
    from features.datasets import scan_dataset
    from features.fitted import FittedTransform
    from features.spec import load_spec
    from features.synthetic import config_with, write_log

    if case == "generate":
        days = 14
        write_log(config_with(days=days, users=200_000, items=500_000, requests_per_day=rows // (20 * days)),
                  work / "log")
        return {"rows": rows}

    source: Path | pl.LazyFrame
    if case == "kuairand":
        lf = source = scan_dataset("kuairand", SHARED / "kuairand_pure_subset")
        spec = load_spec("kuairand")
    else:
        lf, source = scan_dataset("synthetic", work / "log"), work / "log"  # the build reads it by partition
        spec = load_spec("synthetic")
    n = int(lf.select(pl.len()).collect(engine="streaming").item())

    t = time.perf_counter()
    fitted = FittedTransform.fit(lf, spec)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    fitted.transform(lf).sink_parquet(work / "transformed.parquet")
    transform_s = time.perf_counter() - t
    t = time.perf_counter()
    build(source, spec, work / "out")
    build_s = time.perf_counter() - t
    result = {"rows": n, "fit_s": fit_s, "transform_s": transform_s, "build_s": build_s}
    if case == "kuairand":  # the same transform once the side tables are joined and tokenised (in memory)
        joined = lf.collect().lazy()
        t = time.perf_counter()
        fitted.transform(joined).sink_parquet(work / "transformed.parquet")
        result["transform_joined_s"] = time.perf_counter() - t
    return result


def run_case(case: str, rows: int, work: Path) -> dict[str, float]:
    """Run one case in a fresh process; its own peak RSS (ru_maxrss, KiB on Linux) comes back."""
    if case == "synthetic" and not (work / "log").exists():
        subprocess.run([sys.executable, __file__, "--child", "generate", "--rows", str(rows), "--work", str(work)],
                       check=True, capture_output=True)
    cmd = [sys.executable, __file__, "--child", case, "--rows", str(rows), "--work", str(work)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000000,10000000,50000000")
    ap.add_argument("--keep", type=Path, default=None, help="keep generated logs here between runs")
    ap.add_argument("--child", default=None)
    ap.add_argument("--rows", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    if args.child:
        result = child(args.child, args.rows, args.work)
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(result))
        return
    base = args.keep or Path(tempfile.mkdtemp(prefix="featbench-"))
    cases = [("kuairand", 0)] + [("synthetic", int(s)) for s in args.sizes.split(",") if s]
    print(f"machine: {os.cpu_count()} cores; polars threads default; work dir {base}")
    print(f"{'case':<22} {'rows':>11} {'fit rows/s':>12} {'transform rows/s':>17} {'build rows/s':>13} {'peak RSS':>9}")
    for case, rows in cases:
        work = base / f"{case}_{rows}"
        work.mkdir(parents=True, exist_ok=True)
        r = run_case(case, rows, work)
        n = r["rows"]
        label = case if case == "kuairand" else f"synthetic {n / 1e6:.0f}M"
        print(f"{label:<22} {n:>11,} {n / r['fit_s']:>12,.0f} {n / r['transform_s']:>17,.0f} "
              f"{n / r['build_s']:>13,.0f} {r['peak_rss_gib']:>7.2f} GiB", flush=True)
        if "transform_joined_s" in r:
            print(f"{'  (joined, in memory)':<22} {n:>11,} {'':>12} {n / r['transform_joined_s']:>17,.0f}", flush=True)


if __name__ == "__main__":
    main()
