"""Scoring with an exported artifact: raw request features in, per-objective scores out.

This is what serving wraps; it never touches Lightning.

Two paths score the same rows. The serving path (:meth:`InferenceModel.score_requests`) runs the
serving plan (``features.plan``: the fitted transform compiled to numpy at load time) and the fused
network (``ranking.fused``: request-side features once per request, tables as plain tensors). The
reference path (:meth:`InferenceModel.reference_score_requests`, :meth:`InferenceModel.score_frame`)
is the Polars transform and the training network, as offline evaluation runs them; parity tests
keep the two equal.

Objective scores: the probability for binary tasks, the prediction on the task's label scale
(e.g. log1p seconds of watch time) for regression tasks. The combined score is the YouTube form,
a weighted sum ``sum_t w_t * sign_t * score_t`` with ``sign_t = -1`` for tasks where lower is better
(e.g. dismiss).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

import features.plan as plan_module
import ranking.fused as fused_module
from features.plan import ServingPlan
from ranking.artifact import load_artifact, resolve_artifact
from ranking.batch import FeatureTable
from ranking.fused import FusedScorer
from ranking.mmoe import MMoE
from ranking.scores import combined_score, serving_weights, task_scores

log = logging.getLogger("ranking")
COMPILE_CACHE = "~/.cache/mmoe-ranker/compiled"  # compiled serving networks, one file per artifact and code


class InferenceModel:
    """A loaded artifact ready to score candidates.

    Example:
        >>> model = InferenceModel.load("artifact/")  # doctest: +SKIP
        >>> scores = model.score_request(user, context, candidates)  # doctest: +SKIP
        >>> combined = model.combine(scores)  # doctest: +SKIP
    """

    def __init__(self, path: str | Path, compile: bool = False, experts_k: int = 0) -> None:
        """Load the artifact at ``path``; ``compile=True`` compiles the serving network (see :meth:`compile`).

        ``experts_k`` > 0 serves that many experts per row (``ranker serve --experts-k``, see
        ``RankingModel.set_top_k``); 0 takes the artifact's ``gate.serving_k`` (0 there: as trained).
        """
        self.path = resolve_artifact(path)  # an MLflow Model folder holds the artifact one level down
        self.model, self.config, self.fitted, self.metadata = load_artifact(self.path)
        self.experts_k = experts_k or self.config.gate.serving_k
        if self.experts_k:
            try:
                self.model.set_top_k(self.experts_k)
            except ValueError as e:
                raise ValueError(f"experts_k {self.experts_k} does not fit {str(self.path)!r}: {e}") from None
        self.tasks = [t.name for t in self.config.tasks]
        self.default_weights: dict[str, float] = serving_weights(self.config.tasks)
        self.plan = ServingPlan.from_fitted(self.fitted)  # lookup tables, cut points, formulas: once
        self.scorer = FusedScorer(self.model, self.plan)  # weights rearranged for serving: once
        self.compiled = False
        if compile:
            self.compile()

    @classmethod
    def load(cls, path: str | Path, compile: bool = False, experts_k: int = 0) -> InferenceModel:
        return cls(path, compile, experts_k)

    def compile(self, cache_dir: str | Path | None = None) -> bool:
        """Compile the serving network ahead of time (AOTInductor); eager stays the fallback.

        The compiled kernels keep the torch thread count set when this is called (set it first; the
        server sets ``--torch-threads`` before loading). The package is cached in ``cache_dir``
        (default: ``$RANKER_COMPILE_CACHE``, else ``~/.cache/mmoe-ranker/compiled``) under a name made
        of the artifact's files, the serving network's code, the torch version and that thread count,
        so processes serving the same artifact (``--workers``)
        and later restarts compile once: one compiles under a file lock, the others wait and load it.
        The compiled network is kept only if it runs and matches eager to 1e-5 on requests made from
        the model's own vocabularies (one and several requests and candidates, empty lists); else
        this logs why and stays eager.

        Returns:
            whether the compiled network is now in use.
        """
        shapes = ((1, 1), (3, 2), (5, 3))
        probes = [self.plan.encode([_probe(self.fitted, n)] * r) for n, r in shapes] + [self._empty_lists_probe()]
        try:
            folder = Path(cache_dir or os.environ.get("RANKER_COMPILE_CACHE") or COMPILE_CACHE).expanduser()
            folder.mkdir(parents=True, exist_ok=True)
            package = folder / f"{self._compile_key()}.pt2"
            example = self.plan.encode([_probe(self.fitted, 3)] * 2)
            with open(folder / f"{package.stem}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                self.scorer.compile(example, package)
            got = [self.scorer.score(batch) for batch in probes]
            self.scorer.uncompile()
            want = [self.scorer.score(batch) for batch in probes]
            for g, w, batch in zip(got, want, probes, strict=True):
                if g.shape != w.shape or not torch.allclose(g, w, atol=1e-5, rtol=0):
                    raise ValueError(f"compiled scores differ from eager on {batch.sizes.tolist()} candidates")
            self.scorer.compile(example, package)
        except Exception as e:  # no C++ compiler, an unsupported op, a mismatch: eager it is
            self.scorer.uncompile()
            log.warning("compiling %s failed, serving eager: %s: %s", self.path, type(e).__name__, e)
            self.compiled = False
            return False
        log.info("compiled %s (%s)", self.path, package.name)
        self.compiled = True
        return True

    def _compile_key(self) -> str:
        """What a compiled package depends on: the artifact's files, the serving code, torch, the machine."""
        h = hashlib.sha256()
        for f in sorted(p for p in self.path.rglob("*") if p.is_file()):
            h.update(f.relative_to(self.path).as_posix().encode())
            h.update(f.read_bytes())
        for module in (fused_module, plan_module):
            h.update(Path(module.__file__ or "").read_bytes())
        # Inductor's CPU kernels fix their OpenMP thread count at compile time: a package compiled with
        # 2 threads run by 2 workers on 2 cores would oversubscribe them, so the count is part of the name
        h.update(f"{torch.__version__} {platform.machine()} {platform.python_version()} "
                 f"threads={torch.get_num_threads()} experts_k={self.experts_k}".encode())
        return h.hexdigest()[:32]

    def _empty_lists_probe(self) -> Any:
        user, context, candidates = _probe(self.fitted, 2)
        lists = [c for c in candidates if self.fitted.raw_types[c].startswith("list")]
        return self.plan.encode([(user, context, {**candidates, **{c: [[], []] for c in lists}})])

    @property
    def spec(self) -> Any:
        return self.fitted.spec

    @torch.inference_mode()
    def score_frame(self, frame: pl.DataFrame, sizes: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Model-ready rows (from the fitted transform) -> task -> (N,) scores.

        ``sizes``: the rows' requests, as consecutive counts; expert choice then groups the rows by
        request, as serving does (without: the frame is one group, as a training batch).
        """
        batch = FeatureTable(frame.drop("position", strict=False), self.config).all()
        if sizes is not None and isinstance(self.model, MMoE):
            groups = torch.from_numpy(np.repeat(np.arange(len(sizes)), sizes))
            out = self.model(batch.sparse, batch.dense, None, groups=groups)
        else:
            out = self.model(batch.sparse, batch.dense, None)
        return {t: s.float().numpy() for t, s in task_scores(out.logits, self.config.tasks).items()}

    def score_request(
        self, user: dict[str, Any], context: dict[str, Any], candidates: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        """Raw features of one request (user/context once, candidates column-wise) -> scores."""
        return self.score_requests([(user, context, candidates)])[0]

    def score_requests(
        self, requests: Sequence[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]
    ) -> list[dict[str, np.ndarray]]:
        """Several requests in one forward pass: what the serving dynamic batcher runs.

        The serving plan encodes the requests together (user and context features once per
        request), the fused network scores them in one forward pass, and the scores are split
        back. Scoring is row-wise, so request ``i`` gets the scores ``score_request(*requests[i])``
        gives, up to float rounding of the larger matmuls, and those of
        :meth:`reference_score_requests` to 1e-5.

        Args:
            requests: ``(user, context, candidates)`` per request, as :meth:`score_request` takes them.

        Returns:
            one dict task -> (C_i,) scores per request, in the order given.

        Raises:
            ValueError: any request the transform rejects fails the whole call; score the requests
                one by one to find it.

        Example:
            >>> per_request = model.score_requests([(user, ctx, cands_a), (user, ctx, cands_b)])  # doctest: +SKIP
            >>> per_request[1]["click"].shape  # doctest: +SKIP
            (7,)
        """
        if not requests:
            return []
        batch = self.plan.encode(requests)  # numpy arrays, request-side features (R,)
        scores = self.scorer.score(batch).numpy()  # (T, sum C_i)
        return _split(self.tasks, scores, batch.sizes)

    def reference_score_requests(
        self, requests: Sequence[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]
    ) -> list[dict[str, np.ndarray]]:
        """:meth:`score_requests` the reference way: the Polars transform and the training network."""
        if not requests:
            return []
        frame = self.fitted.transform_requests(list(requests))  # (sum C_i) rows, one Polars query
        sizes = np.array([len(next(iter(cands.values()), ())) for _, _, cands in requests])  # C_i
        scores = self.score_frame(frame, sizes)  # task -> (sum C_i,)
        return _split(self.tasks, np.stack([scores[t] for t in self.tasks]), sizes)

    def combine(self, scores: dict[str, np.ndarray], weights: dict[str, float] | None = None) -> np.ndarray:
        """The combined score (``ranking.scores.combined_score``) of task scores; ``weights`` override
        the serving weights per task.

        Raises:
            ValueError: unknown objective name or a negative / non-finite weight.
        """
        return combined_score(scores, self.config.tasks, weights)


def _split(tasks: list[str], scores: np.ndarray, sizes: np.ndarray) -> list[dict[str, np.ndarray]]:
    """(T, N) scores -> one dict task -> (C_i,) per request (views, no copies)."""
    bounds = np.cumsum(sizes)  # (R,) where each request ends
    starts = bounds - sizes
    spans = zip(starts.tolist(), bounds.tolist(), strict=True)
    return [{t: scores[j, a:b] for j, t in enumerate(tasks)} for a, b in spans]


def _probe(fitted: Any, n: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A request of ``n`` candidates from the transform's own vocabularies (first values), dense 1.0."""
    spec = fitted.spec
    vocab = {f.raw: fitted.vocabs[f.name].values for f in spec.sparse if f.name in fitted.vocabs and not f.cross}
    empty = {"int": 0, "float": 1.0, "str": ""}

    def value(col: str, i: int) -> Any:
        kind = fitted.raw_types[col]
        pool = vocab.get(col) or [empty[kind.removeprefix("list[").removesuffix("]")]]
        v = pool[i % len(pool)]
        return [v] if kind.startswith("list") else v

    user = {c: value(c, 0) for c in spec.features_from("user")}
    context = {c: value(c, 0) for c in spec.features_from("context")}
    candidates = {c: [value(c, i) for i in range(n)] for c in spec.features_from("item")}
    return user, context, candidates
