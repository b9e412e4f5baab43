"""``ranker score --engine ray``: batch scoring on Ray Data, the same scores as the Polars engine.

The driver resolves the model once (a ``models:/`` URI is looked up and downloaded here, so every
actor scores the same version even if the alias moves meanwhile) and puts the artifact's files in
Ray's object store; each of ``workers`` actors writes them to its own temporary folder, loads the
model once and scores the blocks it is given with :class:`pipelines.score.BatchScorer`, the unit
of work of the Polars engine (the same checks, transform, network and combined score). Blocks keep
the input's row order (Ray Data's ``preserve_order``), so the output parts read back in the order
of the log.

The log must be Parquet in the spec's raw columns (a file or a date-partitioned folder, the layout
``ranker data synth`` and the pipeline's lake write): adapters that join several source files
(KuaiRand, census) need the Polars engine, or their rows written as such a log first.

Output layout as :mod:`pipelines.score` (``part-*.parquet``, ``quarantine.parquet``,
``summary.json``). Ray is an optional dependency (``pip install -e .[ray]``), imported inside the
functions only (:func:`features.ray_session.import_ray`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.build import log_files
from features.datasets import ADAPTERS, PARTS
from features.ray_session import import_ray
from features.validate import REASON
from pipelines.errors import reading
from pipelines.score import DEFAULT_BATCH_ROWS, BatchScorer, ScoreSummary, ScoringModel, clear_outputs, open_model
from ranking.inference import InferenceModel


def connect(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Join the Ray cluster at ``address`` (else ``RAY_ADDRESS``, else start a local one); the ``ray`` module.

    A Ray already initialised in this process (a test's, a notebook's) is used as it is.
    """
    ray = import_ray()
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        local = {"num_cpus": num_cpus} if address is None else {}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False, **local)
    return ray


class _ScoreBlocks:
    """A Ray actor: loads the artifact once from its files, then scores block after block."""

    def __init__(self, files: Any, weights: dict[str, float] | None) -> None:
        ray = import_ray()
        if isinstance(files, ray.ObjectRef):  # the artifact, put in the object store once by the driver
            files = ray.get(files)
        import torch

        torch.set_num_threads(1)  # one actor per CPU: a forward pass of its own threads would oversubscribe them
        self.folder = Path(tempfile.mkdtemp(prefix="ranker-score-"))
        for name, data in files.items():
            (self.folder / name).parent.mkdir(parents=True, exist_ok=True)
            (self.folder / name).write_bytes(data)
        self.scorer = BatchScorer(InferenceModel(self.folder), weights)

    def __call__(self, block: pa.Table) -> pa.Table:
        """Raw rows -> the same rows with ``quarantine_reason`` and the score columns (null where rejected)."""
        raw = pl.from_arrow(block)
        assert isinstance(raw, pl.DataFrame)
        return self.scorer.score_all(raw).to_arrow()


def _only(table: pa.Table, bad: bool, keep: list[str]) -> pa.Table:
    valid = pc.is_valid(table[REASON])
    rows = table.filter(valid if bad else pc.invert(valid))
    return rows.select([c for c in keep if c in rows.column_names])


def _reason_counts(table: pa.Table) -> pa.Table:
    """A block's quarantined rows counted by reason (summed on the driver: no shuffle for a few reasons)."""
    counts = pc.value_counts(table[REASON]) if table.num_rows else pa.array([], pa.struct(
        [("values", pa.string()), ("counts", pa.int64())]))
    return pa.table({REASON: counts.field("values"), "rows": counts.field("counts")})


def score_log_ray(model: str | ScoringModel, source: str | Path, out: str | Path, tracking_uri: str | None = None,
                  weights: Mapping[str, float] | None = None, batch_rows: int = DEFAULT_BATCH_ROWS,
                  address: str | None = None, workers: int | None = None) -> ScoreSummary:
    """Score every row of the raw Parquet log ``source`` on Ray Data; see the module docstring.

    ``model``: a URI, or :func:`pipelines.score.open_model`'s (then its own weights apply); closed here.

    Raises:
        ValueError: Ray is not installed, the model cannot be loaded, the log is not Parquet in the
            spec's raw columns, a bad weight or a bad count.
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    ray = import_ray()
    start = time.perf_counter()
    out = Path(out)
    opened = model if isinstance(model, ScoringModel) else open_model(model, tracking_uri, weights)
    try:
        scorer = opened.scorer
        spec = scorer.spec
        if spec.name in ADAPTERS and spec.name not in PARTS:
            raise ValueError(f"the ray engine reads Parquet logs in the spec's raw columns; the {spec.name!r} "
                             "dataset's own files need --engine polars (or write its rows as such a log first)")
        with reading("input", source):
            files = [str(f) for f in log_files(source)]
        folder = scorer.model.path
        artifact = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    finally:
        opened.close()
    connect(address)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # output parts in the log's order
    ctx.enable_progress_bars = False  # one summary line at the end, not a bar and a plan per stage
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    n = workers or max(1, int(cpus) - 1)
    # The actors hold their CPUs for the whole run; Ray Data's own tasks that feed them (listing and
    # reading the files, one CPU each) need some too, else the actors wait for blocks that no task
    # can be scheduled to make. One CPU of the cluster is left to those tasks.
    per_actor = min(1.0, max(0.1, (cpus - 1.0) / n))
    with reading("input", source):
        ds = ray.data.read_parquet(files)
        checked = ds.map_batches(_ScoreBlocks, fn_constructor_args=(ray.put(artifact), scorer.weights),
                                 batch_format="pyarrow", batch_size=batch_rows, concurrency=n,
                                 num_cpus=per_actor).materialize()
    keep_scored = [*scorer.keep, *scorer.columns]
    raw_columns = [c for c in checked.schema().names if c not in scorer.columns]
    clear_outputs(out)
    staged = out / "_ray"
    shutil.rmtree(staged, ignore_errors=True)
    try:
        checked.map_batches(_only, fn_args=(False, keep_scored), batch_format="pyarrow").write_parquet(
            str(staged / "scored"))
        bad = checked.map_batches(_only, fn_args=(True, raw_columns), batch_format="pyarrow")
        counts: dict[str, int] = {}
        for row in bad.map_batches(_reason_counts, batch_format="pyarrow").take_all():  # one small table per block
            counts[str(row[REASON])] = counts.get(str(row[REASON]), 0) + int(row["rows"])
        if counts:
            bad.write_parquet(str(staged / "quarantine"))
        rows_in = checked.count()
        parts = []
        for i, f in enumerate(sorted((staged / "scored").glob("*.parquet"))):  # Ray names them in block order
            target = out / f"part-{i:05d}.parquet"
            f.rename(target)
            parts.append(target.name)
        _merge(sorted((staged / "quarantine").glob("*.parquet")), out / "quarantine.parquet")
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    quarantined = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    summary = ScoreSummary(opened.uri, opened.name, opened.version, "ray", rows_in, rows_in - sum(counts.values()),
                           quarantined, parts, scorer.columns, time.perf_counter() - start,
                           {"batch_rows": batch_rows, "workers": n, "ray_address": address or
                            os.environ.get("RAY_ADDRESS") or "local"})
    summary.save(out)
    return summary


def _merge(files: list[Path], target: Path) -> None:
    """Several Parquet files -> one, a file at a time (the quarantine: one file, as the Polars engine writes)."""
    writer = None
    try:
        for f in files:
            table = pq.read_table(f)
            if writer is None:
                writer = pq.ParquetWriter(target, table.schema)
            writer.write_table(table.cast(writer.schema))
    finally:
        if writer is not None:
            writer.close()
