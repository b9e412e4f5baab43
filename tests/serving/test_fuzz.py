"""Fuzzing the real server over a loopback channel: thousands of malformed and odd requests.

Requests come from hypothesis strategies (built from scratch, or well formed with random values),
from edits of a valid logged request (missing, unknown and random feature names, wrong value kinds,
columns of other lengths, NaN/inf, no or too many candidates, unknown objectives, negative/NaN
weights, huge ``top_k``, random ``model_version``, unicode and very long strings) and from random
bytes that happen to parse as a ``RankRequest``. Every answer must be a status the API promises
(OK, INVALID_ARGUMENT, FAILED_PRECONDITION, RESOURCE_EXHAUSTED; never INTERNAL or UNKNOWN), an
INVALID_ARGUMENT must name the field, the server must stay SERVING, and afterwards a fixed set of
valid requests must get byte-identical responses to those it got before (``server_time_us`` aside).

Runs are derandomized and keep no example database, so CI sends the same requests every time.
"""

from __future__ import annotations

import collections
import functools
import operator
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import text_format
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.fitted import FittedTransform
from protos.ranking.v1 import ranker_pb2 as pb
from protos.ranking.v1 import ranker_pb2_grpc as pb_grpc
from serving.client import build_request
from serving.holder import synthetic_request

Code = grpc.StatusCode
ACCEPTABLE = {Code.OK, Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED}
# An INVALID_ARGUMENT names the field: a request field path first (decoding), or the quoted feature
# or objective (errors raised past decoding, by the transform or the objective weights).
NAMES_A_FIELD = re.compile(
    r"^(?:request_id|user|context|candidates|objective_weights|top_k|model_version|response_format)\b"
    r"|\bobjective (?:weight for )?'|\b(?:feature|column) '"
)
CALL_TIMEOUT_S = 10.0
MIN_REQUESTS = 2000  # fuzz requests sent by the whole file
SENT: collections.Counter[str] = collections.Counter()  # fuzz test -> requests sent
FUZZ_TESTS = ("test_edited_requests", "test_generated_requests", "test_well_formed_random_values", "test_random_bytes")

# Huge finite weights overflow the float32 objective scores in the server (see
# test_huge_finite_weights_give_finite_scores); numpy warns in the server thread, not in a test.
pytestmark = pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


# ------------------------------------------------------------------------------- the probe
@dataclass(frozen=True)
class Names:
    """What the loaded model's spec expects, for strategies that need it."""

    user: tuple[str, ...]
    context: tuple[str, ...]
    item: tuple[str, ...]  # candidate features, the item key excluded
    item_key: str
    floats: tuple[str, ...]  # candidate features of raw type "float"
    tasks: tuple[str, ...]
    raw_types: dict[str, str]
    minimums: dict[str, float]  # raw column -> the spec's valid_min (smaller values are INVALID_ARGUMENT)
    n: int  # candidates in the base request
    max_candidates: int  # the server's setting


class Probe:
    """Sends requests on one synchronous channel and checks every answer against the contract."""

    def __init__(self, channel: grpc.Channel, names: Names) -> None:
        self.names = names
        self._ranker = pb_grpc.RankerStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)

    def call(self, req: pb.RankRequest) -> tuple[grpc.StatusCode, str, pb.RankResponse | None]:
        try:
            return Code.OK, "", self._ranker.Rank(req, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as e:
            return e.code(), e.details() or "", None

    def check(self, req: pb.RankRequest, test: str) -> tuple[grpc.StatusCode, pb.RankResponse | None]:
        """One request; fails naming the status, the details and the request."""
        code, details, resp = self.call(req)
        SENT[test] += 1
        assert code in ACCEPTABLE, f"{code.name}: {details[:500]!r}\nrequest:\n{show(req)}"
        if code == Code.INVALID_ARGUMENT:
            assert NAMES_A_FIELD.search(details), f"details name no field: {details[:500]!r}\nrequest:\n{show(req)}"
        if resp is not None:
            problem = answer_problem(req, resp, self.names)
            assert problem is None, f"{problem}\nrequest:\n{show(req)}"
        return code, resp

    def serving(self) -> bool:
        req = health_pb2.HealthCheckRequest(service="ranking.v1.Ranker")
        return bool(self._health.Check(req, timeout=5).status == health_pb2.HealthCheckResponse.SERVING)


def answer_problem(req: pb.RankRequest, resp: pb.RankResponse, names: Names) -> str | None:
    """What is wrong with an OK answer, or ``None``.

    Checked: the request it accepted (exactly the spec's features, 1 to ``max_candidates`` ids), its
    size under ``top_k``, indices, ids and objective scores (finite, every task). Not the combined
    score: finite weights above float32's range make it inf or NaN
    (test_huge_finite_weights_give_finite_scores).
    """
    kind = req.candidates.item_ids.WhichOneof("kind")
    ids = [str(i) for i in getattr(req.candidates.item_ids, kind).values] if kind else []
    n = len(ids)
    given = (set(req.user), set(req.context), set(req.candidates.features))
    if given != (set(names.user), set(names.context), set(names.item)):
        return f"accepted features {given}; the spec has {names}"
    if not 1 <= n <= names.max_candidates:
        return f"accepted {n} candidates (1 to {names.max_candidates} allowed)"
    if resp.request_id != req.request_id:
        return "request_id not echoed"
    if len(resp.candidates) != min(req.top_k or n, n):
        return f"{len(resp.candidates)} candidates returned for {n} sent, top_k={req.top_k}"
    idx = [c.index for c in resp.candidates]
    if len(set(idx)) != len(idx) or not all(0 <= i < n for i in idx):
        return f"indices {idx} are not distinct positions of {n} item ids"
    if [c.item_id for c in resp.candidates] != [ids[i] for i in idx]:
        return "item_id does not match the item id at index"
    tasks = {t for c in resp.candidates for t in c.objective_scores}
    for c in resp.candidates:
        if set(c.objective_scores) != tasks or not all(np.isfinite(v) for v in c.objective_scores.values()):
            return f"objective scores of item {c.item_id!r}: {dict(c.objective_scores)}"
    return None


def show(req: pb.RankRequest, limit: int = 3000) -> str:
    text = text_format.MessageToString(req, as_utf8=True)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def normalised(resp: pb.RankResponse) -> bytes:
    """The response without its timing, serialized deterministically."""
    copy = pb.RankResponse()
    copy.CopyFrom(resp)
    copy.server_time_us = 0
    return copy.SerializeToString(deterministic=True)


@pytest.fixture(scope="module")
def names(fitted: FittedTransform, raw_request: Any, server: Any) -> Names:
    spec = fitted.spec
    assert spec.keys.item is not None, "the served spec names its item key"
    item = tuple(c for c in spec.features_from("item") if c != spec.keys.item)
    return Names(
        user=tuple(spec.features_from("user")),
        context=tuple(spec.features_from("context")),
        item=item,
        item_key=spec.keys.item,
        floats=tuple(c for c in item if fitted.raw_types[c] == "float"),
        tasks=tuple(t.name for t in spec.tasks),
        raw_types=dict(fitted.raw_types),
        minimums={d.raw: d.valid_min for d in spec.dense if d.valid_min is not None},
        n=len(raw_request.item_ids),
        max_candidates=server.rs.options.max_candidates,
    )


@pytest.fixture(scope="module")
def base(raw_request: Any) -> pb.RankRequest:
    return raw_request.to_proto(request_id="base")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def golden_requests(raw_request: Any, fitted: FittedTransform, names: Names) -> list[pb.RankRequest]:
    """Valid requests whose answers must not change: top_k, weights, pins, unicode, 1 and 7 candidates."""
    user, context, cands = synthetic_request(fitted, 7)
    ids = cands.pop(names.item_key)
    one = {k: v[:1] for k, v in raw_request.candidates.items()}
    return [
        raw_request.to_proto(request_id="golden-0"),
        raw_request.to_proto(top_k=3, objective_weights={"like": 3.0, "dismiss": 0.0}),
        raw_request.to_proto(objective_weights={"click": 0.0, "like": 0.0, "dismiss": 0.0, "watch_time": 1.0}),
        raw_request.to_proto(request_id="ключ-🔑-" + "x" * 300, model_version="1", top_k=4_000_000_000),
        build_request(raw_request.user, raw_request.context, one, raw_request.item_ids[:1]),
        build_request(user, context, cands, ids, request_id="synthetic"),
    ]


@pytest.fixture(scope="module")
def probe(server: Any, names: Names) -> Iterator[Probe]:
    with grpc.insecure_channel(server.target) as channel:
        yield Probe(channel, names)


@pytest.fixture(scope="module")
def golden(probe: Probe, golden_requests: list[pb.RankRequest]) -> list[bytes]:
    """Answers to the golden requests before any fuzzing (every fuzz test asks for this first)."""
    answers = []
    for req in golden_requests:
        code, details, resp = probe.call(req)
        assert code == Code.OK and resp is not None, f"golden request failed: {code.name} {details}"
        answers.append(normalised(resp))
    return answers


@pytest.fixture(scope="module")
def fuzzer(probe: Probe, golden: list[bytes]) -> Probe:
    """The probe, once the golden answers are recorded."""
    return probe


# ------------------------------------------------------------------------------- values
# Strategies are built once and reused: hypothesis analyses every new strategy object, which costs
# more than drawing from it.
INT64 = st.integers(-(2**63), 2**63 - 1)
UINT32 = st.integers(0, 2**32 - 1)
ANY_FLOAT = st.floats()  # NaN, +-inf, -0.0, subnormals and extremes included
# Long strings beyond 16 KiB come back as RESOURCE_EXHAUSTED once echoed in an error (see
# test_long_unknown_name_is_invalid_argument), slowly: one string in eight is long.
LONG_TEXT = st.builds(operator.mul, st.text(min_size=1, max_size=3), st.integers(1_000, 20_000))
SHORT_TEXT = st.text(max_size=12)
ODD_TEXT = st.sampled_from(["", "\x00", "é", "🙂", " ", "\u202e", "a\nb"])
TEXT = st.one_of(SHORT_TEXT, SHORT_TEXT, SHORT_TEXT, SHORT_TEXT, SHORT_TEXT, ODD_TEXT, ODD_TEXT, LONG_TEXT)
VALUE_KINDS = st.sampled_from(["int_value", "float_value", "string_value", "int_list", "string_list", None])
COLUMN_KINDS = st.sampled_from(["ints", "floats", "strings", "int_lists", "string_lists", None])
FEW: dict[str, st.SearchStrategy[list[Any]]] = {  # a few values, cycled to a column's length
    "ints": st.lists(INT64, min_size=1, max_size=3),
    "floats": st.lists(ANY_FLOAT, min_size=1, max_size=3),
    "strings": st.lists(TEXT, min_size=1, max_size=3),
    "lengths": st.lists(st.one_of(st.integers(0, 3), UINT32), min_size=1, max_size=3),
}
INT64_LISTS = st.lists(INT64, max_size=5)
TEXT_LISTS = st.lists(TEXT, max_size=5)
UP_TO_64 = st.integers(0, 64)
NUDGE = st.sampled_from([0, 0, 0, -1, 1])  # off by one now and then


def any_name(known: tuple[str, ...]) -> st.SearchStrategy[str]:
    """Mostly the names the spec knows, else any text (unicode, empty, very long)."""
    return st.one_of(st.sampled_from(known), st.sampled_from(known), TEXT)


@st.composite
def _any_value(draw: st.DrawFn) -> pb.FeatureValue:
    kind = draw(VALUE_KINDS)
    if kind == "int_value":
        return pb.FeatureValue(int_value=draw(INT64))
    if kind == "float_value":
        return pb.FeatureValue(float_value=draw(ANY_FLOAT))
    if kind == "string_value":
        return pb.FeatureValue(string_value=draw(TEXT))
    if kind == "int_list":
        return pb.FeatureValue(int_list=pb.Int64List(values=draw(INT64_LISTS)))
    if kind == "string_list":
        return pb.FeatureValue(string_list=pb.StringList(values=draw(TEXT_LISTS)))
    return pb.FeatureValue()


ANY_VALUE = _any_value()  # a user/context value of any kind, or none set


def _cycled(values: list[Any], m: int, empty: Any) -> list[Any]:
    return [values[i % len(values)] for i in range(m)] if values else [empty] * m


@functools.cache
def any_column(n: int) -> st.SearchStrategy[pb.FeatureColumn]:
    """A candidate column of any kind, mostly ``n`` entries long, sometimes shorter, longer or empty.

    A few values are drawn and cycled to the column's length: as searching, and much cheaper to draw.
    """
    sizes = st.one_of(st.sampled_from([n, n, n, max(0, n - 1), n + 1, 0, 1]), st.integers(0, 3 * n))

    @st.composite
    def column(draw: st.DrawFn) -> pb.FeatureColumn:
        size = draw(sizes)
        kind = draw(COLUMN_KINDS)
        if kind == "ints":
            return pb.FeatureColumn(ints=pb.Int64Column(values=_cycled(draw(FEW["ints"]), size, 0)))
        if kind == "floats":
            return pb.FeatureColumn(floats=pb.DoubleColumn(values=_cycled(draw(FEW["floats"]), size, 0.0)))
        if kind == "strings":
            return pb.FeatureColumn(strings=pb.StringColumn(values=_cycled(draw(FEW["strings"]), size, "")))
        if kind is None:
            return pb.FeatureColumn()
        lengths = _cycled(draw(FEW["lengths"]), size, 0)
        total = sum(lengths)
        count = max(0, (total if total < 64 else draw(UP_TO_64)) + draw(NUDGE))
        if kind == "int_lists":
            ints = _cycled(draw(FEW["ints"]), count, 0)
            return pb.FeatureColumn(int_lists=pb.Int64ListColumn(values=ints, lengths=lengths))
        strings = _cycled(draw(FEW["strings"]), count, "")
        return pb.FeatureColumn(string_lists=pb.StringListColumn(values=strings, lengths=lengths))

    return column()


# ------------------------------------------------------------------------------- edits
def _map(req: pb.RankRequest, source: str) -> Any:
    return {"user": req.user, "context": req.context, "features": req.candidates.features}[source]


def _resize_column(col: pb.FeatureColumn, m: int) -> None:
    """Cycle a column's entries to ``m`` candidates, keeping its kind."""
    kind = col.WhichOneof("kind")
    if kind is None:
        return
    part = getattr(col, kind)
    if kind in ("int_lists", "string_lists"):
        flat, lengths = list(part.values), list(part.lengths)
        ends = np.cumsum(lengths).tolist()
        lists = _cycled([flat[e - ln : e] for e, ln in zip(ends, lengths, strict=True)], m, [])
        del part.values[:], part.lengths[:]
        part.values.extend([x for v in lists for x in v])
        part.lengths.extend([len(v) for v in lists])
        return
    values = _cycled(list(part.values), m, "" if kind == "strings" else 0)
    del part.values[:]
    part.values.extend(values)


def _resize(req: pb.RankRequest, m: int) -> None:
    _resize_column(req.candidates.item_ids, m)
    for col in req.candidates.features.values():
        _resize_column(col, m)


def _poison(req: pb.RankRequest, name: str, index: int, value: float) -> None:
    col = req.candidates.features[name]
    if col.WhichOneof("kind") == "ints":
        as_floats = [float(v) for v in col.ints.values]
        col.floats.values.extend(as_floats)  # switches the oneof
    if col.WhichOneof("kind") == "floats" and col.floats.values:
        col.floats.values[index % len(col.floats.values)] = value


def _candidate_column(req: pb.RankRequest, name: str | None) -> pb.FeatureColumn:
    """A candidate feature's column; ``None`` is ``item_ids``."""
    return req.candidates.item_ids if name is None else req.candidates.features[name]


def _length(col: pb.FeatureColumn) -> int:
    kind = col.WhichOneof("kind")
    if kind is None:
        return 0
    part = getattr(col, kind)
    return len(part.lengths) if kind in ("int_lists", "string_lists") else len(part.values)


def _relength(req: pb.RankRequest, name: str | None, m: int) -> None:
    """One column (not the others) cycled to ``m`` entries."""
    _resize_column(_candidate_column(req, name), m)


def _rekind(req: pb.RankRequest, name: str | None, kind: str | None) -> None:
    """One column replaced by a column of another kind with the same number of entries."""
    n = _length(_candidate_column(req, name))
    ones = [1] * n
    column = {
        "ints": lambda: pb.FeatureColumn(ints=pb.Int64Column(values=[7] * n)),
        "floats": lambda: pb.FeatureColumn(floats=pb.DoubleColumn(values=[7.5] * n)),
        "strings": lambda: pb.FeatureColumn(strings=pb.StringColumn(values=["7"] * n)),
        "int_lists": lambda: pb.FeatureColumn(int_lists=pb.Int64ListColumn(values=[7] * n, lengths=ones)),
        "string_lists": lambda: pb.FeatureColumn(string_lists=pb.StringListColumn(values=["7"] * n, lengths=ones)),
        None: pb.FeatureColumn,
    }[kind]()
    _candidate_column(req, name).CopyFrom(column)


def _jag(req: pb.RankRequest, name: str, index: int, grow: int, extra_values: int) -> None:
    """A jagged column made inconsistent: one length changed and/or values added or removed."""
    col = req.candidates.features[name]
    kind = col.WhichOneof("kind")
    if kind not in ("int_lists", "string_lists"):
        return
    part = getattr(col, kind)
    if part.lengths:
        i = index % len(part.lengths)
        part.lengths[i] = (part.lengths[i] + grow) % 2**32  # uint32 wraps, as on the wire
    if extra_values > 0:
        part.values.extend([7 if kind == "int_lists" else "7"] * extra_values)
    elif extra_values < 0:
        del part.values[extra_values:]


def _retype(req: pb.RankRequest, source: str, name: str, kind: str | None) -> None:
    """A user/context value replaced by a plain value of the given kind."""
    value = {
        "int_value": lambda: pb.FeatureValue(int_value=7),
        "float_value": lambda: pb.FeatureValue(float_value=7.5),
        "string_value": lambda: pb.FeatureValue(string_value="7"),
        "int_list": lambda: pb.FeatureValue(int_list=pb.Int64List(values=[7])),
        "string_list": lambda: pb.FeatureValue(string_list=pb.StringList(values=["7"])),
        None: pb.FeatureValue,
    }[kind]()
    _map(req, source)[name].CopyFrom(value)


EDITS: dict[str, Callable[..., None]] = {
    "drop": lambda req, source, name: _map(req, source).pop(name, None),
    "put_value": lambda req, source, name, value: _map(req, source)[name].CopyFrom(value),
    "put_column": lambda req, name, col: req.candidates.features[name].CopyFrom(col),
    "set_item_ids": lambda req, col: req.candidates.item_ids.CopyFrom(col),
    "resize": _resize,
    "relength": _relength,
    "rekind": _rekind,
    "jag": _jag,
    "retype": _retype,
    "poison": _poison,
    "weight": lambda req, name, w: operator.setitem(req.objective_weights, name, w),
    "top_k": lambda req, k: setattr(req, "top_k", k),
    "model_version": lambda req, v: setattr(req, "model_version", v),
    "request_id": lambda req, v: setattr(req, "request_id", v),
    "clear": lambda req, field: req.ClearField(field),
    "clear_item_ids": lambda req: req.candidates.ClearField("item_ids"),
}


@dataclass(frozen=True)
class Edit:
    """One change to a request; its repr is what hypothesis prints for a failing example."""

    what: str
    args: tuple[Any, ...]

    def __call__(self, req: pb.RankRequest) -> None:
        EDITS[self.what](req, *self.args)

    def __repr__(self) -> str:
        shown = ", ".join(
            text_format.MessageToString(a, as_one_line=True, as_utf8=True)[:500]
            if hasattr(a, "DESCRIPTOR")
            else repr(a)[:200]
            for a in self.args
        )
        return f"{self.what}({shown})"


def edits(s: Names) -> st.SearchStrategy[Edit]:
    def edit(what: str, *args: st.SearchStrategy[Any]) -> st.SearchStrategy[Edit]:
        return st.tuples(*args).map(lambda a: Edit(what, a))

    counts = st.one_of(
        st.sampled_from([0, 1, 2, s.max_candidates, s.max_candidates + 1, 5 * s.max_candidates]),
        st.integers(0, 3 * s.n),
    )
    columns = st.sampled_from([None, *s.item])  # None: item_ids
    near = st.sampled_from([0, 1, s.n - 1, s.n + 1, 2 * s.n])
    lists = [c for c in s.item if s.raw_types[c].startswith("list")]
    small = st.integers(-2, 2)
    jagged = [edit("jag", st.sampled_from(lists), st.integers(0, s.n), small, small)] if lists else []
    return st.one_of(
        # near-valid: one thing wrong, the rest of the request intact
        edit("relength", columns, near),
        edit("rekind", columns, COLUMN_KINDS),
        *jagged,
        edit("retype", st.just("user"), st.sampled_from(s.user), VALUE_KINDS),
        edit("retype", st.just("context"), st.sampled_from(s.context), VALUE_KINDS),
        # anything
        edit("drop", st.just("user"), any_name(s.user)),
        edit("drop", st.just("context"), any_name(s.context)),
        edit("drop", st.just("features"), any_name(s.item)),
        edit("put_value", st.sampled_from(["user", "context"]), any_name(s.user + s.context), ANY_VALUE),
        edit("put_column", any_name((*s.item, s.item_key)), any_column(s.n)),
        edit("set_item_ids", any_column(s.n)),
        edit("resize", counts),
        edit("poison", st.sampled_from(s.floats), st.integers(0, 10 * s.n), st.sampled_from([np.nan, np.inf, -np.inf])),
        edit("weight", any_name(s.tasks), ANY_FLOAT),
        edit("top_k", st.one_of(st.sampled_from([0, 1, s.n, s.n + 1, 2**32 - 1]), UINT32)),
        edit("model_version", st.one_of(st.sampled_from(["", "1", "01", "1 ", "2"]), TEXT)),
        edit("request_id", TEXT),
        edit("clear", st.sampled_from(["candidates", "user", "context", "objective_weights"])),
        edit("clear_item_ids"),
    )


def generated_requests(s: Names) -> st.SearchStrategy[pb.RankRequest]:
    """Requests built from scratch: any maps of (mostly known) names to values of any kind."""
    feature_names = any_name((*s.item, s.item_key))
    users = st.dictionaries(any_name(s.user + s.context), ANY_VALUE, max_size=3)
    contexts = st.dictionaries(any_name(s.context + s.user), ANY_VALUE, max_size=5)
    weights = st.dictionaries(any_name(s.tasks), ANY_FLOAT, max_size=5)
    features = {n: st.dictionaries(feature_names, any_column(n), max_size=len(s.item) + 1) for n in range(13)}
    versions = st.sampled_from(["", "", "1", "2"])

    @st.composite
    def request(draw: st.DrawFn) -> pb.RankRequest:
        n = draw(st.sampled_from(range(13)))
        return pb.RankRequest(
            request_id=draw(TEXT),
            user=draw(users),
            context=draw(contexts),
            candidates=pb.Candidates(item_ids=draw(any_column(n)), features=draw(features[n])),
            objective_weights=draw(weights),
            top_k=draw(UINT32),
            model_version=draw(versions),
        )

    return request()


def well_formed_requests(s: Names) -> st.SearchStrategy[pb.RankRequest]:
    """Every feature present with the right kind and random values; valid weights, any top_k.

    Values: any int64, any finite float at or above the spec's ``valid_min``, any unicode, lists of
    them; ids mostly never seen.
    """
    raw = {
        "int": INT64,
        "float": st.floats(allow_nan=False, allow_infinity=False),
        "str": TEXT,
        "list[int]": st.lists(INT64, max_size=6),
        "list[str]": st.lists(st.text(max_size=12), max_size=6),
    }
    item_kind = s.raw_types.get(s.item_key, "int")
    def values(c: str) -> st.SearchStrategy[Any]:
        if c in s.minimums:
            return st.floats(min_value=s.minimums[c], allow_nan=False, allow_infinity=False)
        return raw[s.raw_types[c]]

    columns = {c: {n: st.lists(values(c), min_size=n, max_size=n) for n in range(1, 21)} for c in s.item}
    ids = {n: st.lists(raw[item_kind], min_size=n, max_size=n) for n in range(1, 21)}
    weights = st.dictionaries(st.sampled_from(s.tasks), st.floats(0, 1e6))
    top_ks = st.one_of(st.just(0), st.integers(1, 40), UINT32)
    versions = st.sampled_from(["", "1"])

    @st.composite
    def request(draw: st.DrawFn) -> pb.RankRequest:
        n = draw(st.sampled_from(range(1, 21)))
        return build_request(
            user={c: draw(values(c)) for c in s.user},
            context={c: draw(values(c)) for c in s.context},
            candidates={c: draw(columns[c][n]) for c in s.item},
            item_ids=draw(ids[n]),
            objective_weights=draw(weights),
            top_k=draw(top_ks),
            request_id=draw(TEXT),
            model_version=draw(versions),
        )

    return request()


# ------------------------------------------------------------------------------- the tests
def test_edited_requests(fuzzer: Probe, base: pb.RankRequest, names: Names) -> None:
    @fuzz_settings(1000)
    @given(st.lists(edits(names), min_size=1, max_size=4))
    def run(changes: list[Edit]) -> None:
        req = pb.RankRequest()
        req.CopyFrom(base)
        for change in changes:
            change(req)
        fuzzer.check(req, "test_edited_requests")

    run()
    assert fuzzer.serving()


def test_generated_requests(fuzzer: Probe, names: Names) -> None:
    @fuzz_settings(550)
    @given(generated_requests(names))
    def run(req: pb.RankRequest) -> None:
        fuzzer.check(req, "test_generated_requests")

    run()
    assert fuzzer.serving()


def test_well_formed_random_values(fuzzer: Probe, names: Names) -> None:
    """Right names and kinds with any values (unseen ids, extreme floats, unicode) always rank."""

    @fuzz_settings(150)
    @given(well_formed_requests(names))
    def run(req: pb.RankRequest) -> None:
        code, resp = fuzzer.check(req, "test_well_formed_random_values")  # size, ids, objective scores
        assert code == Code.OK and resp is not None
        assert set(resp.candidates[0].objective_scores) == set(names.tasks)
        scores = np.array([c.score for c in resp.candidates])
        assert np.all(np.isfinite(scores)) and np.all(np.diff(scores) <= 0), scores

    run()
    assert fuzzer.serving()


def test_random_bytes(fuzzer: Probe, base: pb.RankRequest, names: Names) -> None:
    """Random bytes and damaged valid requests, sent when they parse as a ``RankRequest``.

    Flipped bytes keep most requests parseable (and turn fields into unknown ones); appending a second
    message merges it (repeated fields grow, map keys are overwritten); the rest rarely parses.
    """
    valid = base.SerializeToString()
    extra = generated_requests(names)
    hows = st.sampled_from(["flip", "flip", "flip", "append", "append", "cut", "random"])
    positions = st.integers(0, len(valid) - 1)
    bytes_in, edits_per_blob, randoms = st.binary(min_size=1, max_size=8), st.integers(1, 3), st.binary(max_size=300)

    @st.composite
    def blobs(draw: st.DrawFn) -> bytes:
        how = draw(hows)
        if how == "random":
            return draw(randoms)
        if how == "append":
            return valid + draw(extra).SerializeToString()
        blob = bytearray(valid)
        for _ in range(draw(edits_per_blob)):
            at = min(draw(positions), len(blob) - 1)
            if how == "flip":
                blob[at] = draw(bytes_in)[0]
            elif draw(st.booleans()):
                blob[at:at] = draw(bytes_in)
            else:
                del blob[at : at + len(draw(bytes_in))]
        return bytes(blob)

    @fuzz_settings(900)
    @given(blobs())
    def run(blob: bytes) -> None:
        try:
            req = pb.RankRequest.FromString(blob)
        except DecodeError:
            return  # not a RankRequest: see test_unparseable_bytes_answer_a_promised_status
        fuzzer.check(req, "test_random_bytes")

    run()
    assert fuzzer.serving()


def test_oversized_request_is_resource_exhausted(fuzzer: Probe, base: pb.RankRequest, server: Any) -> None:
    limit = server.rs.options.max_message_bytes
    req = pb.RankRequest()
    req.CopyFrom(base)
    req.request_id = "x" * (limit + 1)
    code, details, _ = fuzzer.call(req)
    assert code == Code.RESOURCE_EXHAUSTED, f"{code.name}: {details}"
    assert "larger than max" in details  # the server's limit, not the client's on the echoed response


def test_long_unknown_name_is_invalid_argument(fuzzer: Probe, base: pb.RankRequest) -> None:
    req = pb.RankRequest()
    req.CopyFrom(base)
    req.user["x" * 20_000].int_value = 1
    code, details, _ = fuzzer.call(req)
    assert code == Code.INVALID_ARGUMENT, f"{code.name}: {details}"
    assert details.startswith("user['xxx")


def test_unparseable_bytes_answer_a_promised_status(server: Any, fuzzer: Probe) -> None:
    with grpc.insecure_channel(server.target) as channel:
        rank = channel.unary_unary("/ranking.v1.Ranker/Rank")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as err:
            rank(b"\x0a\x02\xc3\x28", timeout=CALL_TIMEOUT_S)  # request_id: invalid UTF-8
    assert err.value.code() in ACCEPTABLE, f"{err.value.code().name}: {err.value.details()}"


def test_huge_finite_weights_give_finite_scores(fuzzer: Probe, base: pb.RankRequest) -> None:
    req = pb.RankRequest()
    req.CopyFrom(base)
    req.objective_weights.update({"click": 1e39, "dismiss": 1e39})
    code, details, resp = fuzzer.call(req)
    assert code == Code.OK and resp is not None, f"{code.name}: {details}"
    scores = [c.score for c in resp.candidates]
    assert np.all(np.isfinite(scores)), scores


def test_server_answers_as_before_after_fuzzing(
    fuzzer: Probe, golden_requests: list[pb.RankRequest], golden: list[bytes]
) -> None:
    assert fuzzer.serving()
    for req, before in zip(golden_requests, golden, strict=True):
        code, details, resp = fuzzer.call(req)
        assert code == Code.OK and resp is not None, f"{code.name}: {details}"
        assert normalised(resp) == before, f"answer changed after fuzzing for request_id={req.request_id[:40]!r}"
    if set(FUZZ_TESTS) <= set(SENT):  # the whole file ran
        assert sum(SENT.values()) >= MIN_REQUESTS, dict(SENT)
