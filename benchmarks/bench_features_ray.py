"""Feature build: the Polars engine against the Ray Data engine (local Ray, 2 CPUs), side by side in one run.

Cases: the KuaiRand-Pure subset (../shared/data, through its adapter in both engines) and synthetic
logs of the given sizes (made by ``benchmarks/bench_features.py``'s generator: 14 daily Parquet
partitions, 200k users, 500k items). Each (case, engine) runs in a fresh child process; the parent
samples the **PSS of the child's whole process tree** every 0.5 s (``/proc/<pid>/smaps_rollup``:
the driver and, for Ray, its GCS, raylet with the shared-memory object store, agents and workers;
shared pages counted once, proportionally) and reports the peak. Both engines run the whole
``ranker features build`` path (validate + quarantine + split + fit + transform + write), the Ray
engine on a Ray started in the child (``ray.init`` timed apart), and the outputs are compared:
same ``transform.json`` hash, same rows in the same order.

The Ray overhead breakdown: start-up (``ray.init``; the workers' first task, which imports Polars
and this package), each stage's wall time against the time spent inside its tasks (their sum / CPUs:
what the 2 workers could at best overlap; the rest is scheduling, moving blocks and results
through the object store, and the driver's merges), and Ray Data's own block serialization time
of the check pass.

    nice .venv/bin/python benchmarks/bench_features_ray.py [--sizes 10000000] [--cpus 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KUAIRAND = ROOT.parent / "shared" / "data" / "kuairand_pure_subset"
GENERATOR = ROOT / "benchmarks" / "bench_features.py"
STAGES = ("read_check", "tally", "quarantine", "fit", "quantiles", "transform_write", "join")


def child(case: str, engine: str, work: Path, cpus: int) -> dict[str, Any]:
    """Runs in the child: one build with one engine; seconds, rows and the transform hash come back."""
    import polars as pl

    from features.build import build
    from features.datasets import scan_parts
    from features.spec import load_spec

    path = KUAIRAND if case == "kuairand" else work / "log"
    spec = load_spec("kuairand" if case == "kuairand" else "synthetic")
    out = work / f"out_{engine}"
    result: dict[str, Any] = {}
    if engine == "polars":
        t = time.perf_counter()
        summary = build(scan_parts(spec.name, path), spec, out)
        result["build_s"] = time.perf_counter() - t
    else:
        import logging

        import ray

        from features.ray_data import build as ray_build
        from features.ray_data import ray_log

        t = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        result["init_s"] = time.perf_counter() - t
        t = time.perf_counter()
        ray.get([_warm.remote() for _ in range(cpus)])
        result["warm_s"] = time.perf_counter() - t
        timings: dict[str, float] = {}
        t = time.perf_counter()
        summary = ray_build(ray_log(spec.name, path), spec, out, timings=timings)
        result["build_s"] = time.perf_counter() - t
        result["timings"] = timings
        ray.shutdown()
    result["rows"] = summary.rows_in
    result["hash"] = summary.transform_hash
    result["driver_maxrss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    del pl
    return result


def _warm_body() -> int:
    """A worker's first task: the imports every block function needs."""
    import features.ray_data  # noqa: F401  # imports Polars, pyarrow and the build

    return os.getpid()


def _remote_warm() -> Any:
    import ray

    return ray.remote(_warm_body)


_warm: Any = None


def _tree(root: int) -> list[int]:
    """``root`` and all its descendants (from every process's parent id)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _pss_gib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue  # ended between the listing and the read
    return total / 2**20  # kB -> GiB


def run_case(case: str, engine: str, work: Path, cpus: int) -> dict[str, Any]:
    """One (case, engine) in a fresh process, with the peak PSS of its process tree sampled meanwhile."""
    cmd = [sys.executable, __file__, "--child", case, "--engine", engine, "--work", str(work), "--cpus", str(cpus)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _pss_gib(_tree(proc.pid)))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{case}/{engine} failed:\n{err[-3000:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["peak_pss_gib"] = peak[0]
    return result


def same_outputs(work: Path) -> bool:
    """Every output of the two engines equal, row for row and in order."""
    import polars as pl

    a, b = work / "out_polars", work / "out_ray"
    if json.loads((a / "transform.json").read_text()) != json.loads((b / "transform.json").read_text()):
        return False
    for name in ("train", "val", "test", "quarantine"):
        if (a / f"{name}.parquet").is_file() != (b / f"{name}.parquet").is_file():
            return False
        if (a / f"{name}.parquet").is_file() and not pl.read_parquet(a / f"{name}.parquet").equals(
                pl.read_parquet(b / f"{name}.parquet")):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000000", help="synthetic log sizes (rows), comma-separated")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--keep", type=Path, default=None, help="keep generated logs here between runs")
    ap.add_argument("--child", default=None)
    ap.add_argument("--engine", default="polars")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    if args.child:
        global _warm
        if args.engine == "ray":
            _warm = _remote_warm()
        print(json.dumps(child(args.child, args.engine, args.work, args.cpus)))
        return
    base = args.keep or Path(tempfile.mkdtemp(prefix="featray-"))
    cases = [("kuairand", 0)] + [("synthetic", int(s)) for s in args.sizes.split(",") if s]
    import platform

    import polars as pl
    import ray

    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {os.cpu_count()} cores, {platform.machine()}; "
          f"local Ray {ray.__version__} with {args.cpus} CPUs; polars {pl.__version__}; work dir {base}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    for case, rows in cases:
        work = base / f"{case}_{rows}"
        work.mkdir(parents=True, exist_ok=True)
        if case == "synthetic" and not (work / "log").exists():
            subprocess.run([sys.executable, str(GENERATOR), "--child", "generate", "--rows", str(rows),
                            "--work", str(work)], check=True, capture_output=True)
        pair = {engine: run_case(case, engine, work, args.cpus) for engine in ("polars", "ray")}
        equal = pair["polars"]["hash"] == pair["ray"]["hash"] and same_outputs(work)
        results.append((case, pair, equal))
        print(json.dumps({"case": case, "rows": pair["polars"]["rows"], "equal": equal, **pair}), flush=True)

    print()
    print(f"{'case':<14} {'engine':<7} {'rows':>11} {'build s':>8} {'rows/s':>11} {'+start-up s':>11} "
          f"{'rows/s incl.':>12} {'peak PSS':>9}  same hash & rows")
    for case, pair, equal in results:
        for engine, r in pair.items():
            n = r["rows"]
            start = r.get("init_s", 0.0) + r.get("warm_s", 0.0)
            label = case if case == "kuairand" else f"synthetic {n / 1e6:.0f}M"
            print(f"{label:<14} {engine:<7} {n:>11,} {r['build_s']:>8.1f} {n / r['build_s']:>11,.0f} {start:>11.1f} "
                  f"{n / (r['build_s'] + start):>12,.0f} {r['peak_pss_gib']:>6.2f} GiB  {'yes' if equal else 'NO'}")
    print()
    print("Ray overhead: stage wall s (in-task s summed over tasks; wall - in-task/CPUs = scheduling, "
          "object-store traffic, driver merges)")
    for case, pair, _ in results:
        r = pair["ray"]
        t = r["timings"]
        parts = [f"init {r['init_s']:.1f}", f"warm-up {r['warm_s']:.1f}"]
        for stage in STAGES:
            inside = t.get(f"{stage}_task_s", t.get("check_task_s") if stage == "read_check" else None)
            parts.append(f"{stage} {t.get(stage, 0.0):.2f}" + (f" ({inside:.2f})" if inside is not None else ""))
        known = sum(t.get(s, 0.0) for s in STAGES)
        parts.append(f"other {r['build_s'] - known:.2f}")
        parts.append(f"check: udf {t.get('check_udf_s', 0.0):.2f}, "
                     f"block serialization {t.get('check_serialize_s', 0.0):.2f}")
        print(f"{case}: " + "; ".join(parts))
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (1 min), {os.getloadavg()[1]:.2f} (5 min)")


if __name__ == "__main__":
    main()
