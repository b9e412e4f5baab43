"""A small synchronous client for ``ranking.v1.Ranker``: encode Python values, call, print a table.

Example:
    >>> with RankerClient("127.0.0.1:50051") as client:  # doctest: +SKIP
    ...     client.wait_ready(timeout_s=30)
    ...     resp = client.rank(
    ...         user={"user_id": 7},
    ...         context={"device": "ios", "surface": "home", "hour": 20},
    ...         candidates={"creator_id": [3, 9], "category": ["cat_1", "cat_2"],
    ...                     "tags": [["tag_1"], []], "duration_s": [30.0, 600.0],
    ...                     "item_age_days": [1.0, 40.0]},
    ...         item_ids=[101, 202],
    ...     )
    ...     print(format_ranking(resp))

Pass ``response_format=pb.RESPONSE_FORMAT_COLUMNS`` to get the ranking column-wise (cheaper for
the server to build and for the client to decode); :func:`read_ranking` reads either form into one
:class:`Ranking`.

Shape letters: K returned candidates.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from types import TracebackType
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.ranking.v1 import ranker_pb2 as pb
from protos.ranking.v1 import ranker_pb2_grpc as pb_grpc
from serving import defaults

SERVICE_NAME = defaults.HEALTH_SERVICE  # "ranking.v1.Ranker"

# How a client spreads calls over several replicas (one address each, e.g. the A records of a headless
# Kubernetes Service behind ``dns:///ranker-headless.<namespace>.svc.cluster.local:50051``):
# * round_robin over every resolved address (gRPC's default, pick_first, sends everything to one);
# * client-side health checking: a replica that says NOT_SERVING (the first thing it does on SIGTERM)
#   gets no new call, before its connection even closes;
# * a retry on UNAVAILABLE (Rank is read-only, so safe to repeat): a call that met a replica going
#   away is sent again, to another one, within the call's own deadline;
# * reconnect backoff capped at 1 s, so a restarted replica is back in the rotation within a second.
BALANCED_SERVICE_CONFIG: dict[str, Any] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": SERVICE_NAME},
    "methodConfig": [{
        "name": [{"service": SERVICE_NAME}],
        "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.02s", "maxBackoff": "0.2s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
}


def balanced_channel_options() -> list[tuple[str, Any]]:
    """gRPC channel options for calls spread over several replicas (see ``BALANCED_SERVICE_CONFIG``).

    Example:
        >>> channel = grpc.insecure_channel("ipv4:10.0.0.5:50051,10.0.0.6:50051", balanced_channel_options())
        >>> channel.close()
    """
    return [("grpc.service_config", json.dumps(BALANCED_SERVICE_CONFIG)), ("grpc.enable_retries", 1),
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.dns_min_time_between_resolutions_ms", 1000)]


def _is_int(v: Any) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _is_float(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _is_list(v: Any) -> bool:
    return isinstance(v, list | tuple | np.ndarray)


def encode_value(v: Any, name: str = "value") -> pb.FeatureValue:
    """One user/context value -> ``FeatureValue``; the oneof follows the Python type.

    int -> ``int_value``, float -> ``float_value``, str -> ``string_value``, list of ints (or
    empty) -> ``int_list``, list of str -> ``string_list``.

    Raises:
        TypeError: another type (bool, None, mixed lists ...); the message names ``name``.
    """
    if isinstance(v, str):
        return pb.FeatureValue(string_value=v)
    if _is_int(v):
        return pb.FeatureValue(int_value=int(v))
    if _is_float(v):
        return pb.FeatureValue(float_value=float(v))
    if _is_list(v):
        items = list(v)
        if all(isinstance(x, str) for x in items) and items:
            return pb.FeatureValue(string_list=pb.StringList(values=items))
        if all(_is_int(x) for x in items):
            return pb.FeatureValue(int_list=pb.Int64List(values=[int(x) for x in items]))
    raise TypeError(f"{name}: cannot encode {v!r}; expected int, float, str, list[int] or list[str]")


def encode_column(values: Sequence[Any] | np.ndarray, name: str = "values") -> pb.FeatureColumn:
    """One value per candidate -> ``FeatureColumn``; the oneof follows the element types.

    All ints -> ``ints``; ints and floats -> ``floats``; all str -> ``strings``; lists ->
    ``int_lists`` / ``string_lists`` (flattened with per-candidate lengths; all-empty -> ``int_lists``).

    Raises:
        TypeError: mixed or unsupported element types; the message names ``name``.
    """
    if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind in "iuf":
        if values.dtype.kind == "f":
            return pb.FeatureColumn(floats=pb.DoubleColumn(values=values.astype(np.float64).tolist()))
        return pb.FeatureColumn(ints=pb.Int64Column(values=values.astype(np.int64).tolist()))
    items = list(values)
    if all(isinstance(v, str) for v in items):
        return pb.FeatureColumn(strings=pb.StringColumn(values=items))
    if all(_is_int(v) for v in items):
        return pb.FeatureColumn(ints=pb.Int64Column(values=[int(v) for v in items]))
    if all(_is_float(v) for v in items):
        return pb.FeatureColumn(floats=pb.DoubleColumn(values=[float(v) for v in items]))
    if all(_is_list(v) for v in items):
        flat = [x for v in items for x in v]
        lengths = [len(v) for v in items]
        if flat and all(isinstance(x, str) for x in flat):
            return pb.FeatureColumn(string_lists=pb.StringListColumn(values=flat, lengths=lengths))
        if all(_is_int(x) for x in flat):
            ints = [int(x) for x in flat]
            return pb.FeatureColumn(int_lists=pb.Int64ListColumn(values=ints, lengths=lengths))
    bad = next((v for v in items if type(v) is not type(items[0])), items[0] if items else None)
    raise TypeError(
        f"{name}: cannot encode a column holding {bad!r}; expected all ints, floats, str, lists of ints or lists of str"
    )


def build_request(
    user: Mapping[str, Any],
    context: Mapping[str, Any],
    candidates: Mapping[str, Sequence[Any] | np.ndarray],
    item_ids: Sequence[Any] | np.ndarray,
    objective_weights: Mapping[str, float] | None = None,
    top_k: int = 0,
    request_id: str = "",
    model_version: str = "",
    response_format: pb.ResponseFormat = pb.RESPONSE_FORMAT_CANDIDATES,
) -> pb.RankRequest:
    """Python values -> ``RankRequest`` (see :meth:`RankerClient.rank` for the arguments)."""
    return pb.RankRequest(
        request_id=request_id,
        user={k: encode_value(v, f"user[{k!r}]") for k, v in user.items()},
        context={k: encode_value(v, f"context[{k!r}]") for k, v in context.items()},
        candidates=pb.Candidates(
            item_ids=encode_column(item_ids, "item_ids"),
            features={k: encode_column(v, f"candidates[{k!r}]") for k, v in candidates.items()},
        ),
        objective_weights=dict(objective_weights or {}),
        top_k=top_k,
        model_version=model_version,
        response_format=response_format,
    )


class RankerClient:
    """A blocking client over one insecure channel; use it as a context manager.

    Args:
        target: ``host:port`` of the server (e.g. ``"127.0.0.1:50051"``), or any gRPC target
            (``dns:///ranker-headless.default.svc.cluster.local:50051``, ``ipv4:10.0.0.5:50051,10.0.0.6:50051``).
        balanced: spread calls over every address the target resolves to, with health checks and
            retries (:func:`balanced_channel_options`); False: gRPC's defaults (one connection).
    """

    def __init__(self, target: str, balanced: bool = False) -> None:
        self.target = target
        self._channel = grpc.insecure_channel(target, balanced_channel_options() if balanced else None)
        self._ranker = pb_grpc.RankerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> RankerClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def rank(
        self,
        user: Mapping[str, Any],
        context: Mapping[str, Any],
        candidates: Mapping[str, Sequence[Any] | np.ndarray],
        item_ids: Sequence[Any] | np.ndarray,
        objective_weights: Mapping[str, float] | None = None,
        top_k: int = 0,
        request_id: str = "",
        timeout_s: float = 5.0,
        model_version: str = "",
        response_format: pb.ResponseFormat = pb.RESPONSE_FORMAT_CANDIDATES,
    ) -> pb.RankResponse:
        """Rank candidates for one user in one context.

        Args:
            user, context: raw feature name -> value (sent once).
            candidates: raw feature name -> one value per item id (column-wise), the item key excluded.
            item_ids: the candidates' ids (ints or str, as the spec's item key).
            objective_weights: task -> weight overrides of the combined score (>= 0).
            top_k: candidates to return, best first; 0 returns all.
            request_id: echoed back in the response.
            timeout_s: deadline of the call, seconds.
            model_version: optional pin; a mismatch fails with FAILED_PRECONDITION.
            response_format: the form of the ranking (``pb.RESPONSE_FORMAT_CANDIDATES``, v1's list
                of ``ScoredCandidate``; ``..._COLUMNS``, ``resp.ranked`` only; ``..._BOTH``); read
                any of them with :func:`read_ranking`.

        Raises:
            grpc.RpcError: a non-OK status (INVALID_ARGUMENT names the field in ``details()``).
            TypeError: a value that cannot be encoded.
        """
        req = build_request(
            user, context, candidates, item_ids, objective_weights, top_k, request_id, model_version, response_format
        )
        resp: pb.RankResponse = self._ranker.Rank(req, timeout=timeout_s)
        return resp

    def health(self, service: str = SERVICE_NAME, timeout_s: float = 1.0) -> int:
        """The health status of ``service`` (a ``HealthCheckResponse.ServingStatus`` value)."""
        req = health_pb2.HealthCheckRequest(service=service)
        return int(self._health.Check(req, timeout=timeout_s).status)

    def wait_ready(self, timeout_s: float = 30.0, poll_s: float = 0.1) -> None:
        """Poll the health service until ``ranking.v1.Ranker`` is SERVING.

        Raises:
            TimeoutError: not SERVING within ``timeout_s`` seconds (the last status or error is named).
        """
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                status = self.health(timeout_s=max(0.05, min(1.0, deadline - time.monotonic())))
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
            time.sleep(poll_s)
        raise TimeoutError(f"{self.target}: {SERVICE_NAME} not SERVING after {timeout_s}s (last: {last})")


@dataclass(frozen=True)
class Ranking:
    """A response's ranking, best first, whichever form it came in (see :func:`read_ranking`).

    Attributes:
        item_ids: (K,) the candidates' ids as the response gives them.
        index: (K,) int64, each candidate's position in the request's ``item_ids``.
        score: (K,) float64, the combined score (non-increasing).
        objective_scores: task -> (K,) float64, each objective's score.
    """

    item_ids: list[str]
    index: np.ndarray
    score: np.ndarray
    objective_scores: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.item_ids)


def read_ranking(resp: pb.RankResponse) -> Ranking:
    """The ranking of ``resp`` column-wise, from ``resp.ranked`` when set, else from ``resp.candidates``.

    Both forms hold the same values (``RESPONSE_FORMAT_BOTH`` fills both), so the cheaper one is read.

    Example:
        >>> r = pb.RankResponse()
        >>> _ = r.candidates.add(item_id="42", index=1, score=1.5, objective_scores={"click": 0.25})
        >>> c = pb.RankResponse(ranked=pb.RankedColumns(item_ids=["42"], index=[1], score=[1.5],
        ...                     objective_scores={"click": pb.DoubleColumn(values=[0.25])}))
        >>> read_ranking(r).item_ids == read_ranking(c).item_ids == ["42"]
        True
        >>> float(read_ranking(c).objective_scores["click"][0])
        0.25
    """
    if resp.HasField("ranked"):
        cols = resp.ranked
        return Ranking(
            item_ids=list(cols.item_ids),
            index=np.array(cols.index, dtype=np.int64),
            score=np.array(cols.score, dtype=np.float64),
            objective_scores={t: np.array(c.values, dtype=np.float64) for t, c in cols.objective_scores.items()},
        )
    cands = resp.candidates
    tasks = sorted({t for c in cands for t in c.objective_scores})
    return Ranking(
        item_ids=[c.item_id for c in cands],
        index=np.array([c.index for c in cands], dtype=np.int64),
        score=np.array([c.score for c in cands], dtype=np.float64),
        objective_scores={t: np.array([c.objective_scores[t] for c in cands], dtype=np.float64) for t in tasks},
    )


def format_ranking(resp: pb.RankResponse, limit: int = 10) -> str:
    """A fixed-width table of the first ``limit`` candidates: rank, item_id, score, one column per objective.

    Reads either form of the response (:func:`read_ranking`).

    Example:
        >>> r = pb.RankResponse(model_name="ranker", model_version="3")
        >>> _ = r.candidates.add(item_id="42", index=1, score=1.5, objective_scores={"click": 0.25})
        >>> print(format_ranking(r))
        ranker v3, 1 candidates
        rank  item_id      score      click
           1  42          1.5000     0.2500
    """
    ranking = read_ranking(resp)
    shown = ranking.item_ids[:limit]
    objectives = sorted(ranking.objective_scores)
    id_w = max([7, *(len(i) for i in shown)])
    obj_w = [max(9, len(t)) for t in objectives]
    head = f"{'rank':>4}  {'item_id':<{id_w}}  {'score':>9}" + "".join(
        f"  {t:>{w}}" for t, w in zip(objectives, obj_w, strict=True)
    )
    timing = f", {resp.server_time_us / 1000:.1f} ms on the server" if resp.server_time_us else ""
    lines = [f"{resp.model_name} v{resp.model_version}, {len(ranking)} candidates{timing}", head]
    for j, item_id in enumerate(shown):
        row = f"{j + 1:>4}  {item_id:<{id_w}}  {ranking.score[j]:>9.4f}" + "".join(
            f"  {ranking.objective_scores[t][j]:>{w}.4f}" for t, w in zip(objectives, obj_w, strict=True)
        )
        lines.append(row)
    return "\n".join(lines)
