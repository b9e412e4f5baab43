"""Bad input through the real ``ranker`` CLI (and ``make mlflow-ui``): one ``error:`` line, first, no traceback.

Each case runs the installed entry point in a subprocess, in a scratch working folder with its own
MLflow store, and must end with a non-zero exit code, an ``error:`` line as the first line on stderr
and as the only one, no ``Traceback`` anywhere, and a line that names the bad field, file or value.
The cases run once, in parallel threads, when the first of them is checked.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest
import yaml

from features.spec import load_spec
from pipelines.requests import request_from_log

RANKER = str(Path(sys.executable).with_name("ranker"))
REPO = Path(__file__).resolve().parents[2]
THREADS = 4


@dataclass(frozen=True)
class Case:
    """One bad input: the command line (``{name}`` fills in a fixture path), what its error line must name."""

    id: str
    args: tuple[str, ...]
    names: tuple[str, ...]  # every one must appear in the error line
    env: dict[str, str] = field(default_factory=dict)
    code: int | None = None  # None: any non-zero code
    absent: str | None = None  # a path the command must not create
    make: bool = False  # args go to `make` in the repository, not to ranker


def case(id: str, *args: str, names: str | tuple[str, ...], **kw: object) -> Case:
    return Case(id, args, (names,) if isinstance(names, str) else names, **kw)  # type: ignore[arg-type]


PIPELINE = ("pipeline", "run", "--config")
CASES = [
    # ---- the command line itself
    case("unknown-command", "bogus", names="'bogus'", code=2),
    case("unknown-option", "train", "--bogus", names="--bogus", code=2),
    case("option-not-an-int", "data", "synth", "--out", "{root}/x", "--users", "abc", names="--users", code=2),
    case("missing-required-option", "features", "build", "--input", "{log}", names="--out", code=2),
    case("float-option-not-a-number", "rank", "--timeout-s", "soon", names="--timeout-s", code=2),
    # ---- data synth
    case("synth-out-is-a-file", "data", "synth", "--out", "{file}", names="{file}"),
    case("synth-out-under-a-file", "data", "synth", "--out", "{file}/log", "--days", "1", "--users", "5",
         "--items", "20", "--requests-per-day", "2", "--slate-size", "2", names=("Not a directory", "{file}")),
    case("synth-correlation", "data", "synth", "--out", "{root}/s", "--correlation", "2", names="correlation"),
    case("synth-days", "data", "synth", "--out", "{root}/s", "--days", "0", names="days must be >= 1, got 0"),
    case("synth-slate-over-items", "data", "synth", "--out", "{root}/s", "--items", "5", "--slate-size", "10",
         names="slate_size (10)"),
    case("synth-position-bias", "data", "synth", "--out", "{root}/s", "--position-bias", "-1",
         names="position_bias"),
    # ---- features build
    case("build-input-missing", "features", "build", "--input", "{root}/nowhere", "--out", "{root}/f",
         names="{root}/nowhere"),
    case("build-unknown-dataset", "features", "build", "--input", "{log}", "--out", "{root}/f",
         "--dataset", "imdb", names="'imdb'"),
    case("build-spec-missing", "features", "build", "--input", "{log}", "--out", "{root}/f",
         "--spec", "{root}/nospec.yaml", names="{root}/nospec.yaml"),
    case("build-spec-broken-yaml", "features", "build", "--input", "{log}", "--out", "{root}/f",
         "--spec", "{broken_yaml}", names=("{broken_yaml}", "line 2")),
    case("build-spec-bad-field", "features", "build", "--input", "{log}", "--out", "{root}/f",
         "--spec", "{bad_spec}", names=("{bad_spec}", "Field required")),
    case("build-folder-wrong-columns", "features", "build", "--input", "{wrong_dir}", "--out", "{root}/f",
         names=("{wrong_dir}", '"ts"')),
    case("build-file-wrong-columns", "features", "build", "--input", "{wrong_file}", "--out", "{root}/f",
         names=("{wrong_file}", '"ts"')),
    case("build-input-not-parquet", "features", "build", "--input", "{not_parquet}", "--out", "{root}/f",
         names="{not_parquet}"),
    case("build-out-is-a-file", "features", "build", "--input", "{log}", "--out", "{file}", names="{file}"),
    case("build-train-end-not-a-date", "features", "build", "--input", "{log}", "--out", "{root}/f",
         "--train-end", "soon", names=("--train-end", "'soon'")),
    case("build-kuairand-empty-folder", "features", "build", "--input", "{empty}", "--out", "{root}/f",
         "--dataset", "kuairand", names="{empty}"),
    # ---- train
    case("train-features-missing", "train", "--features", "{root}/nowhere", names="{root}/nowhere"),
    case("train-features-not-a-folder-of-features", "train", "--features", "{log}", names="{log}"),
    case("train-transform-corrupt", "train", "--features", "{bad_features}", names="transform.json"),
    case("train-config-missing", "train", "--features", "{features}", "--config", "{root}/no.yaml",
         names="{root}/no.yaml"),
    case("train-config-broken-yaml", "train", "--features", "{features}", "--config", "{broken_yaml}",
         names=("{broken_yaml}", "line 2")),
    case("train-config-not-a-mapping", "train", "--features", "{features}", "--config", "{list_yaml}",
         names=("{list_yaml}", "mapping")),
    case("train-set-wrong-type", "train", "--features", "{features}", "--set", "num_experts=four",
         names=("num_experts", "int", "'four'")),
    # local inputs are checked before the store is opened and the training stack imported (seconds)
    case("train-set-before-the-store", "train", "--features", "{features}", "--set", "num_experts=four",
         "--tracking-uri", "http://127.0.0.1:9", names=("num_experts", "'four'")),
    case("train-transform-before-the-store", "train", "--features", "{bad_features}", "--tracking-uri",
         "http://127.0.0.1:9", names="transform.json"),
    case("train-out-is-a-file", "train", "--features", "{features}", "--out", "{file}", names="{file}"),
    case("train-file-store", "train", "--features", "{features}", "--tracking-uri", "file:///{root}/mlruns",
         names="file:///{root}/mlruns"),
    case("train-server-unreachable", "train", "--features", "{features}", "--tracking-uri", "http://127.0.0.1:9",
         names="http://127.0.0.1:9"),
    case("train-store-driver-missing", "train", "--features", "{features}", "--tracking-uri",
         "postgresql://u@127.0.0.1:9/db", names=("postgresql://u@127.0.0.1:9/db", "psycopg")),
    case("train-promote-and-alias", "train", "--features", "{features}", "--promote", "--alias", "staging",
         names="'staging'"),
    case("train-epochs-not-an-int", "train", "--features", "{features}", "--epochs", "two", names="--epochs",
         code=2),
    # ---- serve: everything is checked before anything is bound
    case("serve-model-folder-missing", "serve", "--model", "{root}/nomodel", "--port", "0",
         names="{root}/nomodel"),
    case("serve-truncated-weights", "serve", "--model", "{truncated}", "--port", "0",
         names=("{truncated}/weights.pt", "truncated")),
    case("serve-typo-sqlite-store", "serve", "--model", "models:/ranker@champion", "--port", "0",
         "--tracking-uri", "sqlite:///{root}/typo/mlflow.db", names="sqlite:///{root}/typo/mlflow.db",
         absent="{root}/typo"),
    case("serve-no-such-registered-model", "serve", "--model", "models:/ranker@champion", "--port", "0",
         "--tracking-uri", "{store}", names=("models:/ranker@champion", "ranker")),
    case("serve-server-unreachable", "serve", "--model", "models:/ranker@champion", "--port", "0",
         "--tracking-uri", "http://127.0.0.1:9", names="http://127.0.0.1:9"),
    case("serve-port-taken", "serve", "--model", "{model}", "--port", "{busy}", names=("--port", "{busy}")),
    case("serve-metrics-port-taken", "serve", "--model", "{model}", "--port", "0", "--metrics-port", "{busy}",
         names=("--metrics-port", "{busy}")),
    case("serve-port-out-of-range", "serve", "--model", "{model}", "--port", "70000", names=("--port", "70000")),
    case("serve-metrics-port-is-port", "serve", "--model", "{model}", "--port", "{free}", "--metrics-port",
         "{free}", names="--metrics-port {free}"),
    case("serve-host-not-local", "serve", "--model", "{model}", "--host", "192.0.2.1", names="192.0.2.1"),
    case("serve-log-format", "serve", "--model", "{model}", "--log-format", "xml", names="'xml'"),
    case("serve-workers", "serve", "--model", "{model}", "--workers", "0", names="--workers"),
    case("serve-torch-threads", "serve", "--model", "{model}", "--torch-threads", "0", names="--torch-threads"),
    case("serve-queue-wait", "serve", "--model", "{model}", "--max-queue-wait-ms", "-1",
         names="--max-queue-wait-ms"),
    # ---- rank
    case("rank-no-source", "rank", names=("--log", "--request")),
    case("rank-two-sources", "rank", "--log", "{log}", "--request", "{request}", names=("--log", "--request")),
    case("rank-request-missing", "rank", "--request", "{root}/req.json", names="{root}/req.json"),
    case("rank-request-not-json", "rank", "--request", "{broken_yaml}", names=("{broken_yaml}", "JSON")),
    case("rank-request-a-list", "rank", "--request", "{list_json}", names=("{list_json}", "object")),
    case("rank-request-lacks-fields", "rank", "--request", "{partial_json}", names=("{partial_json}", "item_ids")),
    case("rank-log-missing", "rank", "--log", "{root}/nolog", names="{root}/nolog"),
    case("rank-log-wrong-columns", "rank", "--log", "{wrong_dir}", names=("{wrong_dir}", "request_id")),
    case("rank-unknown-dataset", "rank", "--log", "{log}", "--dataset", "imdb", names="'imdb'"),
    case("rank-index-out-of-range", "rank", "--log", "{log}", "--index", "999999", names="--index 999999"),
    case("rank-weight-not-a-number", "rank", "--request", "{request}", "--weight", "click=lots",
         names="'click=lots'"),
    case("rank-server-down", "rank", "--request", "{request}", "--target", "127.0.0.1:9", "--timeout-s", "2",
         names=("127.0.0.1:9", "UNAVAILABLE")),
    # ---- pipeline run / schedule / show
    case("pipeline-unknown-bundled", *PIPELINE, "nosuch", names="'nosuch'"),
    case("pipeline-config-missing", *PIPELINE, "{root}/none.yaml", names="{root}/none.yaml"),
    case("pipeline-config-broken-yaml", *PIPELINE, "{broken_yaml}", names=("{broken_yaml}", "YAML")),
    case("pipeline-unknown-field", *PIPELINE, "{pipe_unknown}", names=("{pipe_unknown}", "colour")),
    case("pipeline-lacks-source", *PIPELINE, "{pipe_no_source}", names=("{pipe_no_source}", "'source'")),
    case("pipeline-bad-window", *PIPELINE, "{pipe_bad_window}", names="windows.holdout_days"),
    case("pipeline-unset-variable", *PIPELINE, "{pipe_unset}", names="RANKER_TEST_UNSET"),
    case("pipeline-as-of-not-a-date", *PIPELINE, "{pipe}", "--as-of", "yesterday", names=("--as-of", "'yesterday'")),
    case("pipeline-workdir-is-a-file", *PIPELINE, "{pipe}", "--workdir", "{file}", names="{file}"),
    case("pipeline-train-wrong-type", *PIPELINE, "{pipe_wrong_type}", names=("train.epochs", "int", "'many'")),
    case("pipeline-file-store", *PIPELINE, "{pipe}", "--tracking-uri", "file:///{root}/mlruns",
         names="file:///{root}/mlruns"),
    case("schedule-bad-cron", "pipeline", "schedule", "--config", "{pipe}", "--cron", "every night",
         names=("--cron", "'every night'")),
    case("schedule-bad-timezone", "pipeline", "schedule", "--config", "{pipe}", "--cron", "0 3 * * *",
         "--timezone", "Mars/Olympus", names="'Mars/Olympus'"),
    case("schedule-config-missing", "pipeline", "schedule", "--config", "{root}/none.yaml", "--cron", "0 3 * * *",
         names="{root}/none.yaml"),
    case("schedule-misfire-grace", "pipeline", "schedule", "--config", "{pipe}", "--cron", "0 3 * * *",
         "--misfire-grace-s", "0", names="--misfire-grace-s"),
    case("show-broken-yaml", "pipeline", "show", "--config", "{broken_yaml}", names="{broken_yaml}"),
    case("show-unset-variable", "pipeline", "show", "--config", "{pipe_unset}", names="RANKER_TEST_UNSET"),
    case("show-unknown-bundled", "pipeline", "show", "--config", "nosuch", names="'nosuch'"),
    # ---- demo
    case("demo-workdir-is-a-file", "demo", "--workdir", "{file}", names="{file}"),
    case("demo-server-unreachable", "demo", "--workdir", "{root}/demo", "--tracking-uri", "http://127.0.0.1:9",
         names="http://127.0.0.1:9", absent="{root}/demo"),
    # ---- make mlflow-ui
    case("mlflow-ui-port-taken", names=("MLFLOW_UI_PORT", "{busy}"), make=True,
         env={"MLFLOW_UI_PORT": "{busy}", "MLFLOW_TRACKING_URI": "{store}"}),
    case("mlflow-ui-no-store", names="{root}/nostore", make=True, absent="{root}/nostore",
         env={"MLFLOW_TRACKING_URI": "sqlite:///{root}/nostore/mlflow.db"}),
    case("mlflow-ui-port-not-a-number", names=("MLFLOW_UI_PORT", "'web'"), make=True,
         env={"MLFLOW_UI_PORT": "web", "MLFLOW_TRACKING_URI": "{store}"}),
    case("mlflow-ui-remote-store", names="http://127.0.0.1:9", make=True,
         env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}),
]


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float
    created: bool  # whether the case's `absent` path exists afterwards


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def _pipeline_yaml(root: Path, name: str, **changes: object) -> str:
    body: dict[str, object] = {
        "name": name, "source": {"dataset": "synthetic", "path": str(root / name / "landing")},
        "workdir": str(root / name / "work"), "tracking_uri": f"sqlite:///{root / 'store' / 'mlflow.db'}",
        "train": {"epochs": 1},
    }
    body.update(changes)
    return _write(root / f"{name}.yaml", yaml.safe_dump(body))


def _paths(root: Path, small_log: Path, small_features: Path) -> dict[str, str]:
    """Every file the cases name, made once: good inputs, broken copies of them, an empty store."""
    from mlflow import MlflowClient

    from ranking.artifact import build_model, export_artifact
    from ranking.config import ModelConfig
    from ranking.train.data import load_features

    fitted = load_features(small_features)
    config = ModelConfig.from_fitted(fitted, bottom_dims=(8,), expert_dims=(8,), tower_dims=(4,))
    model = export_artifact(build_model(config), config, fitted, root / "model", {"model_name": "ranker"})
    truncated = shutil.copytree(model, root / "truncated")
    (truncated / "weights.pt").write_bytes((model / "weights.pt").read_bytes()[:300])
    bad_features = shutil.copytree(small_features, root / "bad_features")
    (bad_features / "transform.json").write_text('{"format_version": ')
    store = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    (root / "store").mkdir()
    MlflowClient(tracking_uri=store, registry_uri=store).search_experiments(max_results=1)  # an empty store
    wrong = pl.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    (root / "wrong" / "date=2026-01-01").mkdir(parents=True)
    wrong.write_parquet(root / "wrong" / "date=2026-01-01" / "part.parquet")
    wrong.write_parquet(root / "wrong.parquet")
    (root / "empty").mkdir()
    req = request_from_log(small_log, load_spec("synthetic"))
    request = {"request_id": req.request_id, "user": req.user, "context": req.context,
               "candidates": req.candidates, "item_ids": req.item_ids}
    return {
        "root": str(root), "log": str(small_log), "features": str(small_features), "model": str(model),
        "truncated": str(truncated), "bad_features": str(bad_features),
        "store": store, "wrong_dir": str(root / "wrong"), "wrong_file": str(root / "wrong.parquet"),
        "empty": str(root / "empty"), "file": _write(root / "a-file", "not a folder\n"),
        "not_parquet": _write(root / "log.parquet", "not parquet\n"),
        "broken_yaml": _write(root / "broken.yaml", "name: x\n  bad: [\n"),
        "list_yaml": _write(root / "list.yaml", "- epochs\n- 2\n"),
        "bad_spec": _write(root / "bad_spec.yaml", "name: x\n"),
        "request": _write(root / "request.json", json.dumps(request, default=str)),
        "list_json": _write(root / "list.json", "[1, 2]"),
        "partial_json": _write(root / "partial.json", json.dumps({"user": {}, "context": {}, "candidates": {}})),
        "pipe": _pipeline_yaml(root, "good"),
        "pipe_unknown": _pipeline_yaml(root, "unknown", colour="blue"),
        "pipe_no_source": _write(root / "no_source.yaml", "name: x\nworkdir: w\n"),
        "pipe_bad_window": _pipeline_yaml(root, "window", windows={"holdout_days": 0}),
        "pipe_unset": _pipeline_yaml(root, "unset", workdir="${RANKER_TEST_UNSET}/w"),
        "pipe_wrong_type": _pipeline_yaml(root, "wrongtype", train={"epochs": "many"}),
    }


@dataclass(frozen=True)
class Table:
    paths: dict[str, str]
    outcomes: dict[str, Outcome]


def _run(c: Case, paths: dict[str, str], env: dict[str, str], cwd: Path) -> Outcome:
    def fill(text: str) -> str:
        return text.format(**paths)

    if c.make:  # -o: never reinstall the virtualenv from a test, whatever changed since `make setup`
        cmd = ["make", "-s", "--no-print-directory", "-o", ".venv/.installed", "mlflow-ui"]
    else:
        cmd = [RANKER, *(fill(a) for a in c.args)]
    cwd.mkdir(parents=True)
    start = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO if c.make else cwd, env={**env, **{k: fill(v) for k, v in c.env.items()}},
                       capture_output=True, text=True, timeout=240)
    created = c.absent is not None and Path(fill(c.absent)).exists()
    return Outcome(r.returncode, r.stdout, r.stderr, time.monotonic() - start, created)


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    """A port this process listens on for the whole module."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory, small_log: Path, small_features: Path,
          busy_port: int) -> Table:
    """Every case, run once through the real CLI (in threads: most of the time is each process's imports)."""
    from pipelines.ui import free_port

    root = tmp_path_factory.mktemp("bad-inputs")
    paths = {**_paths(root, small_log, small_features), "busy": str(busy_port), "free": str(free_port())}
    env = {k: v for k, v in os.environ.items() if k not in ("RANKER_DEBUG", "MLFLOW_UI_PORT")}
    env["MLFLOW_TRACKING_URI"] = paths["store"]
    with ThreadPoolExecutor(THREADS) as pool:
        futures = {c.id: pool.submit(_run, c, paths, env, root / "cwd" / c.id) for c in CASES}
        return Table(paths, {k: f.result() for k, f in futures.items()})


def test_the_table_covers_every_command_and_make_mlflow_ui() -> None:
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    commands = {" ".join(c.args[:2]) if c.args and c.args[0] in ("data", "features", "pipeline") else
                (c.args[0] if c.args else "make mlflow-ui") for c in CASES}
    assert commands >= {"data synth", "features build", "train", "serve", "rank", "pipeline run",
                        "pipeline schedule", "pipeline show", "demo", "make mlflow-ui"}, commands


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input_ends_in_one_error_line(c: Case, table: Table) -> None:
    got = table.outcomes[c.id]
    shown = f"exit {got.code} in {got.seconds:.1f}s\nstderr:\n{got.stderr}\nstdout:\n{got.stdout}"
    assert got.code != 0, shown
    if c.code is not None:
        assert got.code == c.code, shown
    lines = [ln for ln in got.stderr.splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error: "), shown  # before any log line
    assert [ln for ln in lines if ln.startswith("error:")] == [lines[0]], shown
    assert "Traceback" not in got.stderr + got.stdout, shown
    for name in c.names:
        assert name.format(**table.paths) in lines[0], shown
    assert not got.created, f"{c.absent} was created\n{shown}"


def test_debug_brings_the_traceback_back(tmp_path: Path) -> None:
    for cmd, extra in (([RANKER, "--debug"], {}), ([RANKER], {"RANKER_DEBUG": "1"})):
        r = subprocess.run([*cmd, "features", "build", "--input", str(tmp_path / "nowhere"), "--out", "o"],
                           cwd=tmp_path, env={**os.environ, **extra}, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0
        assert "Traceback (most recent call last)" in r.stderr and "input not found" in r.stderr, r.stderr


def test_sigint_exits_130_and_says_how_to_resume(tmp_path: Path) -> None:
    """Ctrl-C once the pipeline holds its lock: exit code 130 and the command that resumes the run."""
    root = tmp_path / "pipelines"
    env = {k: v for k, v in os.environ.items() if k != "RANKER_DEBUG"}
    env.update(RANKER_PIPELINE_ROOT=str(root), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.Popen([RANKER, "pipeline", "run", "--config", "synthetic"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr or []), daemon=True)
    reader.start()
    owner = root / "synthetic" / "pipeline.lock.owner"  # written once the run holds its lock
    deadline = time.monotonic() + 120
    while not owner.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "".join(stderr)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=120)
    reader.join(timeout=10)
    text = "".join(stderr)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert code == 130, text
    assert [ln for ln in lines if ln.startswith("error:")] == [lines[-1]], text
    assert lines[-1] == ("error: interrupted; rerun `ranker pipeline run --config synthetic` to resume at the "
                         "first unfinished step"), text
    assert "Traceback" not in text


# ---- the mapping itself, in-process: one line per exception family, naming what was read
def _explained(error: BaseException, what: str | None = None, subject: object = None) -> tuple[str, int]:
    from pipelines.errors import explain, reading

    try:
        if what is None:
            raise error
        with reading(what, subject):
            raise error
    except BaseException as e:  # the point is to explain any of them
        return explain(e)


def test_the_line_names_what_was_read_once() -> None:
    assert _explained(FileNotFoundError(2, "No such file or directory", "s.yaml"), "spec file", "s.yaml") == (
        "spec file 's.yaml': No such file or directory", 2)
    line, code = _explained(ValueError("spec file not found: 's.yaml'"), "spec file", "s.yaml")
    assert (line, code) == ("spec file not found: 's.yaml'", 2)  # the message names it already
    line, code = _explained(json.JSONDecodeError("Expecting value", "", 0), "request", "r.json")
    assert (line, code) == ("request 'r.json': not valid JSON: Expecting value: line 1 column 1 (char 0)", 2)


def test_each_family_is_one_line() -> None:
    import mlflow.exceptions
    import pydantic

    from pipelines.lock import PipelineBusy

    try:
        yaml.safe_load("a: b\n  c: [\n")
    except yaml.YAMLError as e:
        assert _explained(e, "config file", "c.yaml") == (
            "config file 'c.yaml': not valid YAML: line 2, column 4: mapping values are not allowed here", 2)

    class Knobs(pydantic.BaseModel):
        epochs: int

    try:
        Knobs(epochs="two")  # type: ignore[arg-type]
    except pydantic.ValidationError as e:
        line, code = _explained(e)
        assert code == 2 and line.startswith("field 'epochs': Input should be a valid integer") and "'two'" in line

    try:
        pl.DataFrame({"a": [1]}).select("ts")
    except pl.exceptions.ColumnNotFoundError as e:
        line, code = _explained(e, "input", "log.parquet")
        assert code == 2 and line.startswith("input 'log.parquet': ") and '"ts"' in line and "\n" not in line

    busy = PipelineBusy("pipeline lock 'w/pipeline.lock' is held by pid 7 on h since t; one run at a time")
    assert _explained(busy) == (str(busy), 2)
    missing = mlflow.exceptions.MlflowException("Registered Model with name=ranker not found\nmore detail")
    assert _explained(missing, "model", "models:/ranker@champion") == (
        "model 'models:/ranker@champion': Registered Model with name=ranker not found", 2)
    driver = ModuleNotFoundError("No module named 'psycopg'", name="psycopg")
    line, code = _explained(driver, "tracking store", "postgresql://h/db")
    assert code == 2 and line.startswith("tracking store 'postgresql://h/db': a package it needs is not installed")
    assert _explained(IsADirectoryError(21, "Is a directory", "out")) == ("Is a directory: 'out'", 2)
    truncated = RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")
    assert _explained(truncated, "checkpoint", "last.ckpt") == (
        "checkpoint 'last.ckpt': truncated or corrupt file: PytorchStreamReader failed reading zip archive: "
        "failed finding central directory", 2)


def test_an_unexpected_error_is_one_line_that_points_to_debug() -> None:
    line, code = _explained(ZeroDivisionError("division by zero\nsecond line"))
    assert code == 1 and line == "unexpected ZeroDivisionError: division by zero (rerun with --debug for the traceback)"
