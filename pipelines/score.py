"""Batch scoring: a raw impression log in, every row's objective scores and combined score out.

What ``ranker score`` runs, for backfills, offline evaluation and precomputed scores. The model is
loaded once (a registered ``models:/`` URI or an artifact folder, as ``ranker serve`` loads it); the
log is read as a stream of batches of at most ``batch_rows`` rows, so memory stays bounded by one
batch whatever the log's size. Each batch is checked by the model's own spec (the quarantine rules
of ``features.validate``, as the feature build applies them, less duplicate detection: a scoring job
scores every impression it is given), transformed by the model's fitted transform and scored by
its network; the scores are the ones ``ranker serve`` answers for the same rows (a parity test
holds them to 1e-5).

Output, under ``out``::

    part-00000.parquet ...   one per input part: the rows' keys, their raw labels (where the log
                             has them), the spec's passthrough columns, ``score_<task>`` per
                             objective and ``score`` (the combined score, the serving weights or
                             ``weights``), in the input's row order
    quarantine.parquet       rows the spec rejects, with ``quarantine_reason`` (only if any)
    summary.json             the model, rows in / scored / quarantined by reason, seconds, rows/s

Requests: an expert-choice model routes the candidates of a request together; the rows of a
request are the consecutive rows of a batch with the same request key, as a logged slate is
stored. Row-wise models (every other routing) do not depend on the grouping.

Two engines: ``polars`` (here, one process) and ``ray`` (:mod:`pipelines.score_ray`, Ray Data
across a cluster, the same :class:`BatchScorer` per block).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from features.build import log_files
from features.datasets import ADAPTERS, PARTS, scan_parts
from features.spec import FeatureSpec
from features.validate import REASON, CheckCounts, with_reason
from pipelines.errors import reading
from ranking.inference import InferenceModel

log = logging.getLogger("pipelines.score")
SCORE_PREFIX = "score_"  # score_<task>: one objective's score
COMBINED = "score"  # the combined score
DEFAULT_BATCH_ROWS = 65_536


def score_columns(tasks: list[str]) -> list[str]:
    """The columns a scored row gains: ``score_<task>`` per objective, then ``score``.

    Example:
        >>> score_columns(["click", "like"])
        ['score_click', 'score_like', 'score']
    """
    return [f"{SCORE_PREFIX}{t}" for t in tasks] + [COMBINED]


def _without_duplicate_check(spec: FeatureSpec) -> FeatureSpec:
    return spec.model_copy(update={"validation": spec.validation.model_copy(update={"unique": ()})})


class BatchScorer:
    """Raw rows -> scored rows with one loaded model: the unit of work of both engines.

    Args:
        model: the loaded artifact.
        weights: task -> weight of the combined score (``InferenceModel.combine``); None: the
            serving weights.

    Raises:
        ValueError: a weight names no task, or is negative / not finite.
    """

    def __init__(self, model: InferenceModel, weights: Mapping[str, float] | None = None) -> None:
        self.model = model
        self.weights = dict(weights) if weights else None
        self.spec = model.fitted.spec
        self.rules_spec = _without_duplicate_check(self.spec)
        self.columns = score_columns(model.tasks)
        probe = {t: np.zeros(1, dtype=np.float32) for t in model.tasks}
        model.combine(probe, self.weights)  # bad weights fail here, before any row is read
        labels = [t.label for t in self.spec.tasks]
        self.keep = list(dict.fromkeys([*self.spec.keys.present(), *labels, *self.spec.passthrough]))

    def checked(self, raw: pl.DataFrame) -> pl.DataFrame:
        """``raw`` with ``quarantine_reason``: null for a row to score, else the spec's rule it breaks."""
        return with_reason(raw.lazy(), self.rules_spec).collect()

    def check(self, raw: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
        """(rows to score, rows the spec rejects with their ``quarantine_reason``)."""
        checked = self.checked(raw)
        bad = checked[REASON].is_not_null()
        return checked.filter(~bad).drop(REASON), checked.filter(bad)

    def score(self, rows: pl.DataFrame) -> pl.DataFrame:
        """Checked raw rows -> their keys, labels and passthrough columns plus the score columns.

        Raises:
            ValueError: the rows lack a column the model reads, or already have a score column.
        """
        clash = [c for c in self.columns if c in rows.columns]
        if clash:
            raise ValueError(f"input already has column(s) {clash}, which scoring writes")
        keep = [c for c in self.keep if c in rows.columns]
        if rows.height == 0:
            return rows.select(keep).with_columns(pl.lit(None, pl.Float32).alias(c) for c in self.columns)
        frame = rows.lazy().select(self.model.fitted.expressions_without_position()).collect()  # model inputs
        request = self.spec.keys.request
        sizes = None  # (R,) rows per request: runs of one request key
        if request is not None and request in rows.columns:
            sizes = rows[request].rle().struct.field("len").to_numpy()
        scores = self.model.score_frame(frame, sizes)  # task -> (N,)
        combined = self.model.combine(scores, self.weights).astype(np.float32)
        cols = [pl.Series(f"{SCORE_PREFIX}{t}", scores[t]) for t in self.model.tasks]
        return rows.select(keep).with_columns([*cols, pl.Series(COMBINED, combined)])

    def score_all(self, raw: pl.DataFrame) -> pl.DataFrame:
        """Raw rows -> the same rows, in order, with ``quarantine_reason`` and the score columns, which
        are null where the spec rejects the row (the Ray engine's blocks, the pyfunc model's answer)."""
        checked = self.checked(raw)
        good = checked[REASON].is_null()
        scored = self.score(checked.filter(good).drop(REASON))
        where = np.flatnonzero(good.to_numpy())  # (N_good,) positions of the scored rows
        cols = []
        for c in self.columns:
            full = pl.Series(c, [None] * checked.height, dtype=pl.Float32)
            cols.append(full.scatter(where, scored[c]) if where.size else full)
        return checked.with_columns(cols)

    def __call__(self, raw: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
        """One batch: (scored rows, quarantined rows)."""
        good, bad = self.check(raw)
        return self.score(good), bad


@dataclass(frozen=True)
class ScoreSummary:
    """What a scoring run did; printed by ``ranker score`` and saved as ``summary.json``."""

    model: str  # the URI given
    model_name: str
    model_version: str
    engine: str
    rows_in: int
    rows_scored: int
    quarantined: dict[str, int]  # reason -> rows
    files: list[str]  # output Parquet files, relative to the output folder
    columns: list[str]  # the score columns
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rows_in / max(self.seconds, 1e-9)

    def save(self, out: Path) -> Path:
        path = out / "summary.json"
        path.write_text(json.dumps({**asdict(self), "rows_per_s": self.rows_per_s}, indent=2))
        return path

    def line(self, out: Path) -> str:
        bad = sum(self.quarantined.values())
        detail = "; ".join(f"{r}: {n}" for r, n in self.quarantined.items())
        return (f"scored {self.rows_scored} of {self.rows_in} rows with {self.model_name or self.model} "
                f"version {self.model_version} in {self.seconds:.1f} s ({self.rows_per_s:,.0f} rows/s, "
                f"{self.engine}) -> {out}; quarantined: {bad}" + (f" ({detail})" if bad else ""))


def input_parts(spec: FeatureSpec, path: str | Path) -> list[pl.LazyFrame]:
    """The log as parts: a dataset adapter's (the model's spec names it, e.g. KuaiRand's files), else
    one per Parquet file of a raw log in the spec's own columns (a file or a date-partitioned folder)."""
    if spec.name in ADAPTERS and spec.name not in PARTS:
        return scan_parts(spec.name, path)
    return [pl.scan_parquet(f) for f in log_files(path)]


def _batches(part: pl.LazyFrame, batch_rows: int) -> Iterator[pl.DataFrame]:
    """The part's rows in order, at most ``batch_rows`` at a time (a streaming query: bounded memory)."""
    for batch in part.collect_batches(chunk_size=batch_rows, maintain_order=True):
        for start in range(0, batch.height, batch_rows):  # chunk_size is a lower bound of a chunk
            yield batch.slice(start, batch_rows)


class _Sink:
    """A Parquet file written one batch (row group) at a time; opened by its first batch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, frame: pl.DataFrame) -> None:
        if frame.height == 0 and self.writer is not None:
            return
        table = frame.to_arrow()
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table.cast(self.writer.schema) if table.schema != self.writer.schema else table)
        self.rows += frame.height

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class ScoringModel:
    """A model opened for a scoring run: its :class:`BatchScorer` and where it came from; close it after."""

    uri: str
    name: str
    version: str
    scorer: BatchScorer
    holder: Any  # serving.holder.ModelHolder: owns the downloaded files

    def close(self) -> None:
        self.holder.close()


def open_model(uri: str, tracking_uri: str | None = None, weights: Mapping[str, float] | None = None) -> ScoringModel:
    """Load an artifact folder or ``models:/`` URI (as ``ranker serve`` does) and check ``weights`` against it.

    Raises:
        ValueError: the URI does not resolve to an inference artifact, or a weight is bad (named).
    """
    from serving.holder import ModelHolder  # the one place that resolves and downloads a model URI

    holder = ModelHolder(uri, tracking_uri)
    try:
        with reading("model", uri):
            loaded = holder.load()
        return ScoringModel(uri, loaded.name, loaded.version, BatchScorer(loaded.model, weights), holder)
    except BaseException:
        holder.close()
        raise


def clear_outputs(out: Path) -> None:
    """Create ``out`` and remove an earlier run's output files, which would mix with this run's."""
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("part-*.parquet"), out / "quarantine.parquet"]:
        old.unlink(missing_ok=True)


def score_log(model: str | ScoringModel, source: str | Path, out: str | Path, tracking_uri: str | None = None,
              weights: Mapping[str, float] | None = None, batch_rows: int = DEFAULT_BATCH_ROWS) -> ScoreSummary:
    """Score every row of the raw log ``source`` with ``model`` (a URI, or :func:`open_model`'s) on Polars.

    ``tracking_uri`` and ``weights`` apply to a URI; an opened model has its own. It is closed here.

    Raises:
        ValueError: the model cannot be loaded, the log is missing or lacks columns the model reads,
            a bad weight or ``batch_rows`` < 1.
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    start = time.perf_counter()
    out = Path(out)
    opened = model if isinstance(model, ScoringModel) else open_model(model, tracking_uri, weights)
    try:
        scorer = opened.scorer
        with reading("input", source):
            parts = input_parts(scorer.spec, source)
        clear_outputs(out)
        quarantine = _Sink(out / "quarantine.parquet")
        counts = CheckCounts(0, {})
        files = []
        try:
            for i, part in enumerate(parts):
                sink = _Sink(out / f"part-{i:05d}.parquet")
                try:
                    with reading("input", source):
                        for raw in _batches(part, batch_rows):
                            scored, bad = scorer(raw)
                            sink.write(scored)
                            if bad.height:
                                quarantine.write(bad)
                            counts = counts + CheckCounts.of(bad.group_by(REASON).len()) + CheckCounts(
                                scored.height, {})
                finally:
                    sink.close()
                if sink.writer is not None:
                    files.append(sink.path.name)
        finally:
            quarantine.close()
    finally:
        opened.close()
    summary = ScoreSummary(opened.uri, opened.name, opened.version, "polars", counts.rows, counts.rows - counts.bad,
                           counts.quarantined, files, scorer.columns, time.perf_counter() - start,
                           {"batch_rows": batch_rows})
    summary.save(out)
    log.info(summary.line(out))
    return summary


def read_scores(out: str | Path) -> pl.DataFrame:
    """Every scored row of a ``ranker score`` output folder, in order (parts in name order)."""
    files = sorted(Path(out).glob("part-*.parquet"))
    if not files:
        raise ValueError(f"no scored parts (part-*.parquet) in {str(out)!r}")
    return pl.concat([pl.read_parquet(f) for f in files], how="vertical")


__all__ = ["COMBINED", "SCORE_PREFIX", "BatchScorer", "ScoreSummary", "ScoringModel", "open_model", "read_scores",
           "score_columns", "score_log"]
