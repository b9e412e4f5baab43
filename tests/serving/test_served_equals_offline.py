"""Served equals offline on real KuaiRand: a real gRPC server scores the holdout as offline evaluation does.

The KuaiRand-Pure log (``shared/data/kuairand_pure_subset``, CI has it) is built with the spec, a
small MMoE is trained for a few Lightning steps and exported as the inference artifact, and
:func:`~serving.server.start_server` loads that artifact on 127.0.0.1 exactly as production does
(dynamic batcher on). The holdout rows of the first users of the test split are grouped into
requests by (user, date, hour, tab) and sent as a client would: the raw log values (the adapter's
columns, before the fitted transform), user and context once, candidates column-wise, half of the
requests asking for ``RESPONSE_FORMAT_COLUMNS`` and half for ``RESPONSE_FORMAT_CANDIDATES``.

Offline, the same rows of the built ``test.parquet`` (proven equal to the reference Polars
transform of the raw rows sent) go through :func:`ranking.evaluate.split_table` and
:func:`ranking.evaluate.evaluate` with the training network. Proved:

* every holdout row is scored exactly once, mapped back by the candidate's ``index`` (duplicate
  video ids within a request are told apart that way) and checked against its item id;
* per row, every task's served probability is within 1e-5 of the offline one (and the combined
  score within 1e-5 of :func:`ranking.scores.combined_score`);
* per task, :func:`ranking.metrics.auc` of the served scores equals the offline AUC within 1e-6.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import polars as pl
import pytest
import torch

from features.build import build
from features.datasets.kuairand import scan
from features.fitted import FittedTransform
from features.spec import FeatureSpec, load_spec
from protos.ranking.v1 import ranker_pb2 as pb
from protos.ranking.v1 import ranker_pb2_grpc as pb_grpc
from ranking.artifact import export_artifact
from ranking.config import ModelConfig
from ranking.evaluate import evaluate, split_table
from ranking.metrics import auc
from ranking.scores import combined_score, task_scores
from ranking.train import FitConfig, OptimConfig, fit, load_features
from serving.client import build_request, read_ranking

from .conftest import BackgroundServer

REQUEST_KEY = ("user_id", "date", "hour", "tab")  # the spec has no request key: one user, one context
USERS = 700  # first users of the test split whose holdout rows are served (about 3,800 rows in 3,200 requests)
TRAIN_STEPS = 40
IN_FLIGHT = 16  # concurrent RPCs, so the batcher really batches across requests
SCORE_TOL = 1e-5
AUC_TOL = 1e-6
FORMATS = (pb.RESPONSE_FORMAT_COLUMNS, pb.RESPONSE_FORMAT_CANDIDATES)


@dataclass(frozen=True)
class Trained:
    features: Path  # built features folder of the whole log
    fitted: FittedTransform
    config: ModelConfig
    model: torch.nn.Module  # the training network, eval mode
    artifact: Path


@dataclass(frozen=True)
class Holdout:
    raw: pl.DataFrame  # (N rows) raw adapter rows, log order; "row" = position in the test split
    requests: list[np.ndarray]  # per request, the positions (into ``raw``) of its candidates, in order


@dataclass(frozen=True)
class Offline:
    probs: dict[str, np.ndarray]  # task -> (N,) probabilities, row order of the holdout
    labels: dict[str, np.ndarray]  # task -> (N,) 0/1 labels of the feature table
    combined: np.ndarray  # (N,) combined serving score
    metrics: dict[str, float]  # evaluate() keys, "holdout/<task>/auc"


@dataclass(frozen=True)
class Served:
    probs: dict[str, np.ndarray]  # task -> (N,) served objective scores, holdout row order
    combined: np.ndarray  # (N,) served combined score
    seen: np.ndarray  # (N,) int, times each row came back
    form: np.ndarray  # (N,) the response format each row was asked for
    id_mismatches: int  # returned item ids that differ from the request's id at the returned index
    shape_errors: list[str]  # responses in a form other than the one asked for, or with the wrong size


@pytest.fixture(scope="module")
def data(kuairand_data: Path) -> Path:
    return kuairand_data


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return load_spec("kuairand")


@pytest.fixture(scope="module")
def trained(data: Path, spec: FeatureSpec, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """Build the whole log, train a small MMoE for a few steps, export the artifact."""
    root = tmp_path_factory.mktemp("served_equals_offline")
    build(scan(data), spec, root / "features")
    fitted = load_features(root / "features")
    config = ModelConfig.from_fitted(fitted, bottom_dims=(64,), expert_dims=(32,), tower_dims=(16,), num_experts=2)
    trained = fit(root / "features", config, FitConfig(epochs=1, limit_train_batches=TRAIN_STEPS, validate=False,
                                                       final_eval=False, optim=OptimConfig(lr=5e-3), accelerator="cpu"))
    model = trained.model.eval()
    artifact = export_artifact(model, config, fitted, root / "artifact", {"model_name": "ranker", "model_version": "1"})
    return Trained(root / "features", fitted, config, model, artifact)


@pytest.fixture(scope="module")
def holdout(data: Path, spec: FeatureSpec) -> Holdout:
    """The test split's raw rows of its first ``USERS`` users, grouped into requests."""
    assert spec.split.val_end is not None
    test = scan(data).filter(pl.col("date") > spec.split.val_end).collect().with_row_index("row")
    users = test["user_id"].unique(maintain_order=True).head(USERS).implode()
    raw = test.filter(pl.col("user_id").is_in(users))
    groups = raw.with_row_index("pos").group_by(REQUEST_KEY, maintain_order=True).agg("pos")["pos"].to_list()
    return Holdout(raw, [np.asarray(g, dtype=np.int64) for g in groups])


@pytest.fixture(scope="module")
def offline(trained: Trained, holdout: Holdout, tmp_path_factory: pytest.TempPathFactory) -> Offline:
    """The project's offline evaluation of the holdout rows of the built ``test.parquet``."""
    built = pl.read_parquet(trained.features / "test.parquet")[holdout.raw["row"].to_numpy()]
    reference = trained.fitted.transform(holdout.raw.drop("row").lazy()).collect()
    assert built.equals(reference), "built test rows differ from the reference transform of the raw rows sent"
    folder = tmp_path_factory.mktemp("holdout_features")
    built.write_parquet(folder / "holdout.parquet")
    table = split_table(folder, "holdout", trained.config, trained.fitted)
    keep: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    metrics = evaluate(trained.model, table, trained.config, "holdout", keep=keep)
    with torch.inference_mode():
        b = table.batch(torch.arange(len(table)))
        logits = trained.model(b.sparse, b.dense, None).logits
    return Offline(
        probs={t: torch.cat([p for p, _, _ in parts]).double().numpy() for t, parts in keep.items()},
        labels={t: torch.cat([y for _, y, _ in parts]).numpy() for t, parts in keep.items()},
        combined=combined_score(task_scores(logits, trained.config.tasks), trained.config.tasks).numpy(),
        metrics=metrics,
    )


def _fill(spec: FeatureSpec, column: str) -> float:
    """What a client sends for a missing dense value: the API has no null, so the spec's ``fill_null``."""
    fill = next((d.fill_null for d in spec.dense if d.raw == column), None)
    if fill is None:
        raise ValueError(f"raw column {column!r} holds a null and the spec gives it no fill_null")
    return fill


def _value(spec: FeatureSpec, column: str, value: Any) -> Any:
    return _fill(spec, column) if value is None else value


def _request(spec: FeatureSpec, rows: pl.DataFrame, i: int) -> pb.RankRequest:
    """One request from its raw rows: user and context from the first row, candidates column-wise."""
    first = rows.row(0, named=True)
    item_key = spec.keys.item
    assert item_key is not None
    candidates: dict[str, Any] = {}
    for c in spec.features_from("item"):
        if c == item_key:
            continue
        col = rows[c]
        if col.dtype.is_float():
            col = col.fill_null(_fill(spec, c)) if col.null_count() else col
            candidates[c] = col.to_numpy().astype(np.float64)
        else:
            candidates[c] = col.to_list()
    return build_request(
        user={c: _value(spec, c, first[c]) for c in spec.features_from("user")},
        context={c: _value(spec, c, first[c]) for c in spec.features_from("context")},
        candidates=candidates,
        item_ids=rows[item_key].to_list(),
        request_id=f"r{i}",
        response_format=FORMATS[i % 2],
    )


@pytest.fixture(scope="module")
def server(trained: Trained) -> Iterator[BackgroundServer]:
    bg = BackgroundServer(trained.artifact)
    yield bg
    bg.close()


@pytest.fixture(scope="module")
def served(server: BackgroundServer, trained: Trained, holdout: Holdout) -> Served:
    """Every request over a real channel, ``IN_FLIGHT`` at a time; scores mapped back to holdout rows."""
    spec = trained.fitted.spec
    assert spec.keys.item is not None
    tasks = [t.name for t in trained.config.tasks]
    n = holdout.raw.height
    probs = {t: np.full(n, np.nan) for t in tasks}
    combined = np.full(n, np.nan)
    seen = np.zeros(n, dtype=np.int64)
    form = np.full(n, -1, dtype=np.int64)
    mismatches = 0
    errors: list[str] = []
    item_ids = holdout.raw[spec.keys.item].to_list()
    requests = [_request(spec, holdout.raw[pos], i) for i, pos in enumerate(holdout.requests)]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RankerStub(channel)
        for start in range(0, len(requests), IN_FLIGHT):
            wave = range(start, min(start + IN_FLIGHT, len(requests)))
            futures = [stub.Rank.future(requests[i], timeout=60.0) for i in wave]
            for i, fut in zip(wave, futures, strict=True):
                resp, pos, asked = fut.result(), holdout.requests[i], requests[i].response_format
                in_columns, in_candidates = resp.HasField("ranked"), len(resp.candidates) > 0
                if (in_columns, in_candidates) != (asked == pb.RESPONSE_FORMAT_COLUMNS,
                                                   asked == pb.RESPONSE_FORMAT_CANDIDATES):  # fmt: skip
                    errors.append(f"request {i}: asked {asked}, got ranked={in_columns} candidates={in_candidates}")
                ranking = read_ranking(resp)
                if len(ranking) != len(pos) or sorted(ranking.index.tolist()) != list(range(len(pos))):
                    errors.append(f"request {i}: {len(ranking)} candidates back, indices {ranking.index.tolist()}")
                    continue
                rows = pos[ranking.index]  # (K,) holdout positions, best first
                mismatches += sum(got != str(item_ids[r]) for got, r in zip(ranking.item_ids, rows, strict=True))
                for t in tasks:
                    probs[t][rows] = ranking.objective_scores[t]
                combined[rows] = ranking.score
                seen[rows] += 1
                form[rows] = asked
    return Served(probs, combined, seen, form, mismatches, errors)


def test_every_holdout_row_comes_back_once_in_both_response_forms(
    spec: FeatureSpec, holdout: Holdout, served: Served
) -> None:
    sizes = np.array([len(p) for p in holdout.requests])
    items = holdout.raw[spec.keys.item or ""]
    duplicated = sum(items[pos].n_unique() < len(pos) for pos in holdout.requests)
    assert served.shape_errors == []
    assert served.id_mismatches == 0
    assert (served.seen == 1).all(), f"{int((served.seen != 1).sum())} rows not scored exactly once"
    assert holdout.raw.height >= 3000 and len(holdout.requests) >= 300
    assert (sizes > 1).sum() >= 300 and duplicated > 0  # multi-candidate slates, some with a repeated video
    for f in FORMATS:
        assert (served.form == f).sum() >= holdout.raw.height // 3, pb.ResponseFormat.Name(f)


def test_every_row_every_task_within_1e_5_of_offline(offline: Offline, served: Served) -> None:
    for task, want in offline.probs.items():
        got = served.probs[task]
        assert np.isfinite(got).all(), task
        assert want.std() > 100 * SCORE_TOL, f"{task}: scores nearly constant ({want.std():.3g}), a weak test"
        worst = float(np.abs(got - want).max())
        assert worst <= SCORE_TOL, f"{task}: served differs from offline by {worst:.3g} at most"
    worst = float(np.abs(served.combined - offline.combined).max())
    assert worst <= SCORE_TOL, f"combined score differs by {worst:.3g} at most"


def test_auc_from_served_scores_equals_offline_auc(holdout: Holdout, offline: Offline, served: Served) -> None:
    for task, labels in offline.labels.items():
        raw_labels = holdout.raw[task].to_numpy()  # the log's labels, as the served side knows them
        np.testing.assert_array_equal(labels, raw_labels.astype(np.float32), err_msg=task)
        want = offline.metrics[f"holdout/{task}/auc"]
        got = auc(raw_labels, served.probs[task])
        assert np.isfinite(want), task
        assert abs(got - want) <= AUC_TOL, f"{task}: served AUC {got!r} vs offline {want!r}"
    assert offline.metrics["holdout/is_click/auc"] > 0.6  # the artifact holds a trained model, not a fresh one
