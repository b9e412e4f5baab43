"""``ranker features build --engine ray``: the feature build on Ray Data, equal to the Polars engine.

:func:`build` takes the arguments of :func:`features.build.build` (plus ``address``) and writes the
same folder, ``train.parquet  val.parquet  [test.parquet]  transform.json  quarantine.parquet
summary.json``, with the same content hash and the same rows; only the work is spread over a Ray
cluster. Ray is imported inside the functions here only, so ``import features.build`` never
imports it.

How the work is spread (B blocks of raw rows; every per-block step is Polars on ``pl.from_arrow``):

1. read + check: ``ray.data.read_parquet`` -> ``map_batches(batch_format="pyarrow")`` applying
   :func:`features.validate.with_reason` (after an adapter's per-block step, for KuaiRand), kept in
   the cluster's object store (``materialize``; Ray spills it to disk beyond its memory) for the
   passes below, which read it as Ray tasks, one per block;
2. tally: per-block row counts by quarantine reason and the first/last day -> the split rule
   (:func:`features.build.split_rule`) and the quarantine check, merged on the driver;
3. quarantine: the bad rows, written by the cluster (``write_parquet``);
4. fit: per block, the sufficient statistics of the training rows (:class:`features.fitted.FitPartial`:
   value counts, exact sums, extremes) and of every split (row counts, exact label sums, days),
   merged on the driver into the :class:`~features.fitted.FittedTransform`; quantile cut points by
   an exact radix selection (:func:`features.quantiles.select_ranks`, four more rounds, only when a feature has
   ``quantiles``);
5. transform: ``map_batches`` with the fitted transform's own expressions, written by the cluster
   (``write_parquet``, partitioned by split); the driver then joins each split's parts into one
   ``<split>.parquet`` (what ``ranker train`` reads), in block order: a streaming copy, the one
   pass over the data that runs on one machine.

Why the results are equal, not just close:

* counts, minima and maxima do not depend on how rows are blocked; float means and standard
  deviations would (a float sum depends on its order), so both engines compute them from exact
  integer sums (:func:`features.moments.moment_partials`) and round once: the same float64 for any
  blocking, hence the same content hash. Label rates in ``summary.json`` likewise.
* quantile cut points: the values at the ranks Polars' ``quantile(q, "nearest")`` picks
  (:func:`features.quantiles.quantile_ranks`), found exactly by counting 16-bit digits of an
  order-preserving 64-bit key per block (:func:`~features.quantiles.select_ranks`): no sample, no sketch.
* duplicate keys (``validation.unique``) are found within a partition (an input file) by the
  Polars engine, the first row of a key kept; here too: such specs read one Ray block per input
  file, and the build checks it: every block must hold exactly its file's rows, else it stops
  with a ``ValueError``. Specs without the rule (KuaiRand) may cut a file into several blocks.
* the rows keep the Polars engine's order (file order, then row order), so a seeded shuffle in
  training sees the same rows at the same indices: the build runs with ``preserve_order``, each
  written part is named by its task's index and the parts are joined in that order.

The reader is Ray Data's V1 Parquet reader (``DataContext.use_datasource_v2 = False`` during the
build): it makes one read task per file (``override_num_blocks``) and, without a block size limit,
one block of it; Ray 2.60's DataSourceV2 reader groups files by size and deals a file's row
groups out to several tasks, which loses both the whole file and the order.

Inputs (:func:`ray_log`): Parquet files in the spec's raw columns (the synthetic log, a pipeline
lake of any dataset: ``date=YYYY-MM-DD/*.parquet``), or the KuaiRand-Pure folder itself, read
through its adapter (:mod:`features.datasets.kuairand`): the log by ``read_parquet``, each block
joined with the small side tables by the adapter's own :func:`~features.datasets.kuairand.join_sides`.
A CSV log (KuaiRand's ``log_standard_*.csv``, census) is not read: convert it to Parquet, or use
the Polars engine. On a cluster, ``out`` and the inputs must be paths every node sees (a shared
file system), and every node needs this package installed.
"""

from __future__ import annotations

import contextlib
import functools
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa

from features.build import (
    SPLIT,
    SPLITS,
    BuildSummary,
    SplitTally,
    check_counts,
    check_fitted,
    check_split_names,
    day_expr,
    log_files,
    split_rule,
    write_summary,
)
from features.fitted import FitPartial, FittedTransform, label_col, label_expressions, raw_input_types
from features.moments import Moments, merge_moments, moment_partials
from features.quantiles import cut_points, digit_counts, quantile_ranks, select_ranks
from features.ray_session import Clock, data_context, import_ray, session, user_errors
from features.spec import FeatureSpec
from features.validate import REASON, CheckCounts, with_reason

if TYPE_CHECKING:
    from types import ModuleType

PARTS = "_ray_parts"  # cluster-written parts under `out`, removed once joined
_MERGE_EVERY = 16  # fit partials merged on the driver in groups of this many (bounded memory)


# ---------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class RayLog:
    """Raw rows as the Ray engine reads them: Parquet files (absolute paths), and the step, if any,
    that turns each block of their rows into the spec's raw columns (an adapter's per-block part)."""

    files: tuple[str, ...]
    prepare: Callable[[pl.DataFrame], pl.DataFrame] | None = None


@dataclass(frozen=True)
class _KuaiRandRows:
    """KuaiRand's adapter, one block at a time: log columns as Int64, joined with the side tables."""

    user: pl.DataFrame
    video: pl.DataFrame

    def __call__(self, block: pl.DataFrame) -> pl.DataFrame:
        from features.datasets import kuairand

        return kuairand.join_sides(kuairand.log_columns(block.lazy()), self.user.lazy(), self.video.lazy()).collect()


def ray_log(dataset: str, path: str | Path) -> RayLog:
    """The input of ``ranker features build --engine ray --dataset NAME --input PATH``.

    The KuaiRand-Pure folder (``user_features_pure.csv`` beside a Parquet ``log_standard_*``) goes
    through the KuaiRand adapter; any other path is Parquet in the spec's raw columns.

    Raises:
        ValueError: an unknown dataset, a path without Parquet files, or a KuaiRand log in CSV.
    """
    from features.datasets import ADAPTERS, kuairand

    if dataset not in ADAPTERS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(ADAPTERS)}")
    root = Path(path)
    if dataset == "kuairand" and any((root / f).is_file() for f in (kuairand.USER_FILE, kuairand.USER_FILE + ".gz")):
        logs = kuairand.log_files(root)
        csv = [f.name for f in logs if f.suffix != ".parquet"]
        if csv:
            raise ValueError(f"--engine ray reads KuaiRand's standard log as Parquet, and {csv} is CSV: "
                             "convert it to Parquet, or use --engine polars")
        import pyarrow.parquet as pq

        for f in logs:
            kuairand.require_log_columns(f, pq.read_schema(f).names)
        user, video = pl.collect_all(kuairand.side_tables(root))
        return RayLog(tuple(str(f.resolve()) for f in logs), _KuaiRandRows(user, video))
    try:
        files = log_files(root)
    except ValueError as e:
        raise ValueError(f"{e}: --engine ray reads Parquet (a synthetic log, a pipeline lake, or the KuaiRand-Pure "
                         f"folder); dataset {dataset!r} from its own files needs --engine polars") from None
    return RayLog(tuple(str(f.resolve()) for f in files))


# ---------------------------------------------------------------------------------------- build
def build(
    source: str | Path | Sequence[str | Path] | RayLog,
    spec: FeatureSpec,
    out: str | Path,
    train_end: date | None = None,
    checked: CheckCounts | None = None,
    address: str | None = None,
    *,
    timings: dict[str, float] | None = None,
) -> BuildSummary:
    """:func:`features.build.build` on Ray Data: the same outputs, computed per block by the cluster.

    Args:
        source: a Parquet file, a folder of them, a list of files, or a :func:`ray_log` input.
        checked: as in :func:`features.build.build`: the rows already passed the check; nothing is
            quarantined and the summary reports these counts.
        address: the Ray cluster to run on (``ray.init(address=...)``); ``None`` follows Ray:
            ``RAY_ADDRESS`` if set, else a local Ray started (and stopped) for this build. An
            already initialised Ray session is used as it is.
        timings: if given, filled with seconds per stage (``ray_init``, ``read_check``, ``tally``,
            ``quarantine``, ``fit``, ``quantiles``, ``transform_write``, ``join``), the seconds the
            aggregation stages' tasks spent in their block functions (``<stage>_task_s``, summed)
            and the check pass's in-task totals from Ray Data (``check_udf_s``,
            ``check_serialize_s``, ``check_task_s``), for the benchmark.

    Raises:
        ValueError: Ray Data is not installed, the cluster cannot be reached, or any of the errors
            of :func:`features.build.build`.
    """
    ray = import_ray()
    log = source if isinstance(source, RayLog) else RayLog(tuple(str(Path(f).resolve()) for f in _paths(source)))
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(timings)
    whole_files = bool(spec.validation.unique) and checked is None
    parts = out / PARTS
    shutil.rmtree(parts, ignore_errors=True)
    try:
        with contextlib.ExitStack() as stack:
            with clock("ray_init"):
                stack.enter_context(session(ray, address))
            stack.enter_context(data_context(ray, whole_files))
            stack.enter_context(user_errors(ray))
            return _Build(ray, log, spec, out, train_end, checked, whole_files, clock).run()
    finally:
        shutil.rmtree(parts, ignore_errors=True)


def _paths(source: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(source, str | Path):
        return log_files(source)
    if not source:
        raise ValueError("no input files given")
    return [Path(f) for f in source]


class _Build:
    """One build's passes over the cluster (see the module docstring); state shared by the stages."""

    def __init__(self, ray: ModuleType, log: RayLog, spec: FeatureSpec, out: Path, train_end: date | None,
                 checked: CheckCounts | None, whole_files: bool, clock: Clock) -> None:
        self.ray, self.log, self.spec, self.out = ray, log, spec, out
        self.train_end, self.checked, self.whole_files, self.clock = train_end, checked, whole_files, clock
        self.check = checked is None
        self.spec_ref = ray.put(spec)

    def run(self) -> BuildSummary:
        """The five stages of the module docstring, each a pass over the blocks, then the summary."""
        rows, blocks = self._read_checked()
        schema, counts, split, blocks = self._tally(blocks)
        with self.clock("quarantine"):
            if self.check:
                self._write_quarantine(rows, schema, counts)
                check_counts(counts, self.spec)
            else:
                (self.out / "quarantine.parquet").unlink(missing_ok=True)
        good = pl.Schema({c: t for c, t in schema.items() if c != REASON})
        fitted, splits = self._fit(blocks, good, split)
        fitted.save(self.out / "transform.json")
        self._write_splits(rows, fitted, split, good)
        return write_summary(self.out, self.spec, fitted, splits, self.checked if self.checked is not None else counts)

    # ---- passes
    def _read_checked(self) -> tuple[Any, list[Any]]:
        """Stage 1: every raw row with its quarantine reason, blocks in file order, kept by the cluster
        (a materialized dataset, and its blocks' object references).

        One read task per file; without duplicate detection its rows may be cut into more blocks
        (a few per CPU when the files are fewer than that), in order, for the later passes.
        """
        with self.clock("read_check"):
            n = len(self.log.files)
            blocks = n if self.whole_files else max(n, 2 * int(self.ray.cluster_resources().get("CPU", 1)))
            ds = self.ray.data.read_parquet(list(self.log.files), partitioning=None, override_num_blocks=blocks)
            check = functools.partial(_check_block, spec=self.spec, prepare=self.log.prepare, check=self.check)
            self._cpus_back()  # after read_parquet's own sampling tasks
            rows = ds.map_batches(check, batch_format="pyarrow", batch_size=None, zero_copy_batch=True).materialize()
            self._cpus_back()
            refs: list[Any] = rows.to_arrow_refs()
        self.clock.ray_stats(rows)
        return rows, refs

    def _tally(self, blocks: list[Any]) -> tuple[pl.Schema, CheckCounts, pl.Expr, list[Any]]:
        """Stage 2: the rows' schema, their counts by quarantine reason, the split rule, and the
        blocks that hold rows (an empty file's block has no columns; the later passes skip it)."""
        with self.clock("tally"):
            tallies = [t for _, t in sorted(self._per_block(blocks, _tally_block, self.spec_ref, self.check))]
            if self.whole_files:
                _check_one_block_per_file(self.log.files, [t.rows for t in tallies])
            days = [d for t in tallies for d in t.days if d is not None]
            split = split_rule(self.spec, self.train_end, lambda: (min(days, default=None), max(days, default=None)))
            schema = next((t.schema for t in tallies if t.schema is not None), None)
            if schema is None:
                raise ValueError("input has no rows")
            counts = self.checked if self.checked is not None else CheckCounts.of(
                pl.concat([t.reasons for t in tallies]).group_by(REASON).agg(pl.col("len").sum()))
        return schema, counts, split, [b for b, t in zip(blocks, tallies, strict=True) if t.rows]

    def _fit(self, blocks: list[Any], schema: pl.Schema, split: pl.Expr
             ) -> tuple[FittedTransform, dict[str, SplitTally]]:
        """Stage 4: the fitted transform and every split's tally (passes over the blocks, merged exactly)."""
        with self.clock("fit"):
            raw_types = raw_input_types(schema, self.spec)
            quantiled = {f.name: f.raw for f in self.spec.sparse if f.quantiles}
            fit, splits, nonnull = self._fit_statistics(blocks, split, quantiled)
        with self.clock("quantiles"):
            chosen = self._select_quantiles(blocks, split, quantiled, nonnull)
        fitted = FittedTransform.from_partial(fit, self.spec, raw_types, {q: cut_points(v) for q, v in chosen.items()})
        check_fitted(fitted)
        return fitted, splits

    def _write_quarantine(self, rows: Any, schema: pl.Schema, counts: CheckCounts) -> None:
        """Stage 3: the bad rows, as the Polars engine writes them (raw columns plus the reason)."""
        target = self.out / PARTS / "quarantine"
        if counts.bad:
            self._cpus_back()
            rows.map_batches(_bad_rows, batch_format="pyarrow", batch_size=None, zero_copy_batch=True).write_parquet(
                str(target), filename_provider=_part_names())
        _join_parts(target, self.out / "quarantine.parquet", pl.DataFrame(schema=schema))

    def _fit_statistics(self, blocks: list[Any], split: pl.Expr, quantiled: dict[str, str]
                        ) -> tuple[FitPartial, dict[str, SplitTally], dict[str, int]]:
        """The training rows' fit statistics, every split's tally and the quantile columns' non-null
        counts: one pass, partials merged on the driver as they arrive (a group at a time)."""
        firsts: dict[int, object] = {}
        pending: list[FitPartial] = []
        merged: list[FitPartial] = []
        labels, sizes, days, nonnull = [], [], [], []
        for i, part in self._per_block(blocks, _fit_block, self.spec_ref, split, self.check, list(quantiled.values())):
            if part.first_unknown is not None:
                firsts[i] = part.first_unknown
            pending.append(part.fit)
            if len(pending) >= _MERGE_EVERY:
                merged, pending = [FitPartial.merge(merged + pending)], []
            labels.append(part.labels)
            sizes.append(part.sizes)
            days.append(part.days)
            nonnull.append(part.nonnull)
        check_split_names(firsts[min(firsts)] if firsts else None, self.spec)
        fit = FitPartial.merge(merged + pending)
        label_sums = merge_moments(labels)
        size = pl.concat(sizes).group_by(SPLIT).agg(pl.col("n").sum())
        day = pl.concat(days).group_by(SPLIT).agg(pl.col("lo").min(), pl.col("hi").max())
        tallies = {}
        for name in SPLITS:
            n = size.filter(pl.col(SPLIT) == name)["n"].sum()
            found = Moments.of(label_sums.filter(pl.col(SPLIT) == name).drop(SPLIT))
            span = day.filter(pl.col(SPLIT) == name)
            tallies[name] = SplitTally(
                int(n), {t.name: found.get(label_col(t.name), Moments.EMPTY) for t in self.spec.tasks},
                None if day_expr(self.spec) is None else
                ((span["lo"].item(), span["hi"].item()) if span.height else (None, None)))
        counts = {q: sum(p[i] for p in nonnull) for i, q in enumerate(quantiled)}
        return fit, tallies, counts

    def _select_quantiles(self, blocks: list[Any], split: pl.Expr, quantiled: dict[str, str],
                          nonnull: dict[str, int]) -> dict[str, list[float]]:
        """Each quantile feature's training values at Polars' ranks (:func:`select_ranks` over the blocks)."""
        features = {f.name: f for f in self.spec.sparse if f.quantiles}
        ranks = {q: quantile_ranks(nonnull[q], features[q].quantiles or 2) if nonnull[q] else [] for q in quantiled}

        def count(prefixes: dict[str, list[int]], round_: int) -> dict[str, pl.DataFrame]:
            asks = {q: (quantiled[q], p) for q, p in prefixes.items()}
            found = [c for _, c in self._per_block(blocks, _digit_block, split, self.check, asks, round_)]
            return {q: pl.concat([c[q] for c in found]) for q in prefixes}

        return select_ranks(ranks, count)

    def _write_splits(self, rows: Any, fitted: FittedTransform, split: pl.Expr, schema: pl.Schema) -> None:
        """Stage 5: model-ready rows of every split, written by the cluster under ``__split=<name>/``,
        then joined into ``<split>.parquet`` in block order."""
        with self.clock("transform_write"):
            transform = functools.partial(_transform_block, fitted=self.ray.put(fitted), key=fitted.content_hash,
                                          split=split, check=self.check)
            self._cpus_back()
            ready = rows.map_batches(transform, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
            ready.write_parquet(str(self.out / PARTS / "splits"), partition_cols=[SPLIT],
                                filename_provider=_part_names())
        with self.clock("join"):
            empty = fitted.transform(pl.DataFrame(schema=schema).lazy()).collect()
            for name in SPLITS:
                _join_parts(self.out / PARTS / "splits" / f"{SPLIT}={name}", self.out / f"{name}.parquet", empty)

    # ---- plumbing
    def _cpus_back(self, wait_s: float = 2.0) -> None:
        """Wait (briefly) until the cluster has credited back the CPUs of the tasks that just ended.

        Ray returns a task's result before its CPU shows as available again (and a new local Ray
        reports its CPUs a moment after ``ray.init``); a Dataset that starts in that moment warns
        that the cluster has no free CPU, which would mean a hang. After the wait, the warning is real.
        """
        deadline = time.monotonic() + wait_s
        while not self.ray.available_resources().get("CPU") and time.monotonic() < deadline:
            time.sleep(0.01)

    def _per_block(self, blocks: list[Any], fn: Callable[..., Any], *args: Any) -> Iterator[tuple[int, Any]]:
        """``fn(block, *args)`` as one Ray task per block, a few per CPU in flight; (index, result) as they end."""
        ray = self.ray
        remote = _remote(ray)
        shared = [a if isinstance(a, ray.ObjectRef) else ray.put(a) for a in args]
        window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        todo = list(enumerate(blocks))[::-1]
        running: dict[Any, int] = {}
        while todo or running:
            while todo and len(running) < window:
                i, block = todo.pop()
                running[remote.remote(fn, block, *shared)] = i
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                seconds, result = ray.get(ref)
                self.clock.in_task(seconds)
                yield running.pop(ref), result


# ---------------------------------------------------------------------------------------- per block
def _frame(block: pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(block)
    assert isinstance(frame, pl.DataFrame)  # a Table always converts to a frame
    return frame


def _apply(fn: Callable[..., Any], block: pa.Table, *args: Any) -> tuple[float, Any]:
    """What a Ray task runs: ``fn`` on the Polars view of one block (zero-copy from the object store),
    and the seconds it took (the benchmark's in-task time)."""
    start = time.perf_counter()
    result = fn(_frame(block), *args)
    return time.perf_counter() - start, result


def _check_block(block: pa.Table, spec: FeatureSpec, prepare: Callable[[pl.DataFrame], pl.DataFrame] | None,
                 check: bool) -> pa.Table:
    """Raw rows -> the adapter's columns (``prepare``), then ``quarantine_reason`` (unless checked).

    An empty file's block (no rows, and from Ray's reader no columns either) passes as it is; the
    later passes skip it.
    """
    if block.num_rows == 0:
        return block
    rows = _frame(block)
    if prepare is not None:
        rows = prepare(rows)
    if check:
        rows = with_reason(rows.lazy(), spec).collect()
    return rows.to_arrow()


def _bad_rows(block: pa.Table) -> pa.Table:
    if block.num_rows == 0:
        return block
    return _frame(block).filter(pl.col(REASON).is_not_null()).to_arrow()


def _good(rows: pl.DataFrame, check: bool) -> pl.DataFrame:
    return rows.filter(pl.col(REASON).is_null()).drop(REASON) if check else rows


@dataclass(frozen=True)
class _Tally:
    rows: int
    reasons: pl.DataFrame  # (quarantine_reason, len)
    days: tuple[date | None, date | None]
    schema: pl.Schema | None  # None: an empty block (an empty file)


def _tally_block(rows: pl.DataFrame, spec: FeatureSpec, check: bool) -> _Tally:
    """Rows by quarantine reason and the first and last day (every row, as the Polars engine's split rule)."""
    if rows.height == 0:
        return _Tally(0, pl.DataFrame(schema={REASON: pl.String, "len": pl.Int64}), (None, None), None)
    day = day_expr(spec)
    lo, hi = rows.select(day.min().alias("lo"), day.max().alias("hi")).row(0) if day is not None else (None, None)
    reasons = (rows.group_by(REASON).agg(pl.len().cast(pl.Int64).alias("len")) if check
               else pl.DataFrame(schema={REASON: pl.String, "len": pl.Int64}))
    return _Tally(rows.height, reasons, (lo, hi), rows.schema)


@dataclass(frozen=True)
class _BlockFit:
    fit: FitPartial  # training rows
    first_unknown: object  # the block's first split name outside train / val / test, or None
    sizes: pl.DataFrame  # (__split, n)
    labels: pl.DataFrame  # moment_partials of the model-ready labels by __split
    days: pl.DataFrame  # (__split, lo, hi)
    nonnull: list[int]  # non-null training values of each quantile feature's column


def _fit_block(rows: pl.DataFrame, spec: FeatureSpec, split: pl.Expr, check: bool, quantiled: list[str]) -> _BlockFit:
    """One block's share of the fit (training rows) and of every split's tally (all good rows)."""
    good = _good(rows, check).with_columns(split.alias(SPLIT))
    unknown = good.filter(~pl.col(SPLIT).is_in(SPLITS))[SPLIT].drop_nulls()
    train = good.filter(pl.col(SPLIT) == "train")
    labels = {label_col(t.name): e for t, e in zip(spec.tasks, label_expressions(spec), strict=True)}
    day = day_expr(spec)
    span = [day.min().alias("lo"), day.max().alias("hi")] if day is not None else [pl.lit(None).alias("lo"),
                                                                                 pl.lit(None).alias("hi")]
    return _BlockFit(
        fit=FitPartial.of(train.lazy(), spec),
        first_unknown=unknown[0] if unknown.len() else None,
        sizes=good.group_by(SPLIT).agg(pl.len().cast(pl.Int64).alias("n")),
        labels=moment_partials(good.lazy(), labels, by=(SPLIT,)).collect(),
        days=good.group_by(SPLIT).agg(span),
        nonnull=[int(train.select(pl.col(c).cast(pl.Float64).is_not_null().sum()).item()) for c in quantiled],
    )


def _digit_block(rows: pl.DataFrame, split: pl.Expr, check: bool, asks: dict[str, tuple[str, list[int]]],
                 round_: int) -> dict[str, pl.DataFrame]:
    train = _good(rows, check).filter(split == "train")
    return {q: digit_counts(train, column, prefixes, round_) for q, (column, prefixes) in asks.items()}


_COMPILED: dict[str, tuple[FittedTransform, list[pl.Expr]]] = {}  # per worker: the last transform's plan


def _transform_block(block: pa.Table, fitted: Any, key: str, split: pl.Expr, check: bool) -> pa.Table:
    """Good rows -> model-ready rows plus their split (the partition column of the write).

    The fitted transform travels as an object reference and its expressions (one ``pl.Enum`` per
    vocabulary) are built once per worker process, not once per block.
    """
    import ray

    if block.num_rows == 0:
        return block
    rows = _good(_frame(block), check)
    plan = f"{key} {rows.columns}"  # the select depends on the transform and the columns present
    if plan not in _COMPILED:
        transform: FittedTransform = ray.get(fitted)
        _COMPILED.clear()
        _COMPILED[plan] = (transform, transform.transform_exprs(rows.columns))
    exprs = _COMPILED[plan][1]
    ready = rows.lazy().select([*exprs, split.alias(SPLIT)]).filter(pl.col(SPLIT).is_in(SPLITS)).collect()
    return ready.to_arrow()


# ---------------------------------------------------------------------------------------- driver helpers
def _part_names() -> Any:
    """Part files named by their write task's index: joined in that (block) order."""
    from ray.data.datasource import FilenameProvider

    class _Parts(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:08d}-{write_uuid}"

    return _Parts()


def _join_parts(folder: Path, target: Path, empty: pl.DataFrame) -> None:
    """The parts under ``folder`` (in task order) as one Parquet file; ``empty``'s schema when there are none."""
    def order(f: Path) -> tuple[int, int]:
        m = re.match(r"part-(\d+)-.*?-(\d+)\.parquet$", f.name)
        return (int(m.group(1)), int(m.group(2))) if m else (-1, 0)

    files = sorted(folder.glob("*.parquet"), key=order) if folder.is_dir() else []
    target.unlink(missing_ok=True)
    if files:
        pl.scan_parquet(files, hive_partitioning=False).sink_parquet(target)
    else:
        empty.write_parquet(target)


def _check_one_block_per_file(files: tuple[str, ...], rows: list[int]) -> None:
    """Duplicate detection ran per block: fail unless block i held exactly file i's rows."""
    import pyarrow.parquet as pq

    expected = [pq.read_metadata(f).num_rows for f in files]
    if rows != expected:
        raise ValueError(
            f"Ray read {len(rows)} block(s) of {sum(rows)} rows for {len(files)} input file(s) of "
            f"{sum(expected)} rows, not one block per file: duplicate keys (validation.unique) are found "
            "within a file, so this build needs whole files per block; use --engine polars")


_REMOTE: dict[str, Any] = {}


def _remote(ray: ModuleType) -> Any:
    if "apply" not in _REMOTE:
        _REMOTE["apply"] = ray.remote(_apply)
    return _REMOTE["apply"]
