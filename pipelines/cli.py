"""The ``ranker`` command line: thin commands that parse into typed configs and call library code.

One error boundary (:class:`RankerGroup`, with :mod:`pipelines.errors`) wraps every command: a usage
error or an expected failure is one ``error: <what was being read>: <why>`` line on stderr, before
any log line, and exit code 2; an unexpected one is a line that says to rerun with ``--debug``
(exit code 1); Ctrl-C is ``error: interrupted`` (plus how to resume, where a command can) and exit
code 130. ``ranker --debug`` (or ``RANKER_DEBUG=1``) shows tracebacks instead. Commands check
what they can (paths, files, ports, the tracking store) before importing the heavy libraries.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import typer

# typer vendors click (typer._click) and re-exports only some of its exceptions (Exit, Abort, BadParameter).
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
from typer.core import TyperGroup

from features.synthetic_config import SynthConfig
from pipelines import errors, quiet
from pipelines.errors import reading
from pipelines.train_config import TrainConfig
from serving import defaults as serve_defaults

PACKAGE = "mmoe-ranker"


class RankerGroup(TyperGroup):
    """The top-level group: the one place where usage errors and command failures become one line each."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, windows_expand_args: bool = True, **extra: Any) -> Any:
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              windows_expand_args=windows_expand_args, **extra)
            code = rv if isinstance(rv, int) else 0
        except NoArgsIsHelpError as e:  # the help text (rich prints it while the error is made)
            if e.format_message().strip():
                typer.echo(e.format_message(), err=True)
            code = e.exit_code
        except UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "ranker"
            typer.echo(f"error: {where}: {_one_line(e.format_message())} (see {where} --help)", err=True)
            code = e.exit_code
        except ClickException as e:
            typer.echo(f"error: {_one_line(e.format_message())}", err=True)
            code = e.exit_code
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code)

    def invoke(self, ctx: Any) -> Any:
        with errors.boundary(lambda line: typer.echo(line, err=True), typer.Exit,
                             passthrough=(typer.Exit, typer.Abort, ClickException)):
            return super().invoke(ctx)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


# The defaults `--help` shows are the configs' own (both modules are standard library + pydantic only).
TRAIN = TrainConfig(features=Path("."), out=Path("."), tracking_uri="")
SYNTH = SynthConfig()

app = typer.Typer(cls=RankerGroup, help="MMoE multi-task ranker: data, features, training, serving.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Datasets.", no_args_is_help=True)
features_app = typer.Typer(help="Feature pipelines.", no_args_is_help=True)
pipeline_app = typer.Typer(help="Scheduled training: ingest, train, evaluate against the champion, promote.",
                            no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(features_app, name="features")
app.add_typer(pipeline_app, name="pipeline")


def package_version() -> str:
    """The installed version of the package (what ``pip`` installed), or ``unknown`` when it is not installed."""
    import importlib.metadata

    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ranker ({PACKAGE}) {package_version()}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version, help="Print the installed version and exit.")] = False,
    debug: Annotated[bool, typer.Option(
        "--debug", help=f"Show the traceback of a failure instead of one error line (or set {errors.DEBUG_ENV}=1).",
    )] = False,
) -> None:
    """MMoE multi-task ranker: data, features, training, serving."""
    if debug:
        os.environ[errors.DEBUG_ENV] = "1"  # child processes (the demo's pipeline and server) inherit it


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,  # imports (fbgemm_gpu) may already have configured the root logger
    )
    quiet.install()  # before the heavy libraries load (on first use, some after this): their banners drop


def _day(value: str | None, flag: str) -> date | None:
    """``YYYY-MM-DD`` -> date (None stays None); anything else is an error naming the flag."""
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{flag} must be YYYY-MM-DD, got {value!r}") from None


def _out_folder(path: Path, flag: str = "--out") -> Path:
    """An output folder, refused before any work when it names an existing file."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file; give a folder (it is created when missing)")
    return path


def _read_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping (empty file: empty mapping); errors name the file, line and column."""
    import yaml

    with reading(what, path):
        if not path.is_file():
            raise ValueError(f"{what} not found: {str(path)!r}")
        data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{what} {str(path)!r} must hold a mapping of fields, got {type(data).__name__}")
    return data


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Output folder (date=YYYY-MM-DD/ partitions).")],
    days: Annotated[int | None, typer.Option(help="Days of impressions.", show_default=str(SYNTH.days))] = None,
    users: Annotated[int | None, typer.Option(help="Number of users.", show_default=str(SYNTH.users))] = None,
    items: Annotated[int | None, typer.Option(help="Number of items.", show_default=str(SYNTH.items))] = None,
    requests_per_day: Annotated[int | None, typer.Option(
        help="Requests per day.", show_default=str(SYNTH.requests_per_day))] = None,
    slate_size: Annotated[int | None, typer.Option(
        help="Candidates shown per request.", show_default=str(SYNTH.slate_size))] = None,
    correlation: Annotated[float | None, typer.Option(
        help="Engagement/satisfaction correlation, in [-1, 1].", show_default=str(SYNTH.correlation))] = None,
    position_bias: Annotated[float | None, typer.Option(
        help="Exponent of the examination curve (0: no position effect).", show_default=str(SYNTH.position_bias))
    ] = None,
    policy_promotion: Annotated[float | None, typer.Option(
        help="Logging-policy boost for promoted categories (a position confounder).",
        show_default=str(SYNTH.policy_promotion))] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.", show_default=str(SYNTH.seed))] = None,
) -> None:
    """Write a synthetic YouTube-like impression log as date-partitioned Parquet."""
    _out_folder(out)
    from features.synthetic import config_with, write_log

    cfg = config_with(
        days=days, users=users, items=items, requests_per_day=requests_per_day, slate_size=slate_size,
        correlation=correlation, position_bias=position_bias, policy_promotion=policy_promotion, seed=seed,
    )
    with reading("--out folder", out):
        paths = write_log(cfg, out)
    rows = cfg.days * cfg.requests_per_day * cfg.slate_size
    typer.echo(f"wrote {rows} impressions in {len(paths)} daily partitions under {out}")


@features_app.command("build")
def features_build(
    input: Annotated[Path, typer.Option(help="Raw data: a file or folder in the dataset's layout.")],
    out: Annotated[Path, typer.Option(help="Output folder for model-ready data.")],
    dataset: Annotated[str, typer.Option(help="Dataset adapter: synthetic, kuairand or census.")] = "synthetic",
    spec: Annotated[Path | None, typer.Option(
        help="A feature spec YAML file.", show_default="the dataset's own spec")] = None,
    train_end: Annotated[str | None, typer.Option(
        help="Last training day YYYY-MM-DD.", show_default="the spec's split")] = None,
    engine: Annotated[str, typer.Option(
        help="polars: this machine (lazy, streaming); ray: Ray Data on a local Ray or --ray-address, same "
             "outputs (reads Parquet: a synthetic log, a pipeline lake, or the KuaiRand folder).")] = "polars",
    ray_address: Annotated[str | None, typer.Option(
        help="Ray cluster for --engine ray (ray.init address, e.g. auto or head-node:6379).",
        show_default="RAY_ADDRESS, else a local Ray")] = None,
) -> None:
    """Validate, split, fit on the training rows only, write model-ready Parquet and a summary."""
    end = _day(train_end, "--train-end")
    if engine not in ("polars", "ray"):
        raise ValueError(f"--engine must be polars or ray, got {engine!r}")
    if ray_address is not None and engine != "ray":
        raise ValueError(f"--ray-address {ray_address!r} applies to --engine ray only")
    _out_folder(out)
    from features.build import build
    from features.datasets import scan_parts
    from features.spec import load_spec

    scan: Any = scan_parts  # the adapter's parts, checked one at a time (bounded memory)
    run: Any = build
    if engine == "ray":
        from features import ray_data
        from features.ray_session import require_ray

        require_ray()  # a missing install is one line, before any work
        scan, run = ray_data.ray_log, functools.partial(ray_data.build, address=ray_address)  # Parquet, per block
    with reading("input", input):
        source = scan(dataset, input)
    with reading("spec file", spec) if spec else nullcontext():
        feature_spec = load_spec(spec or dataset)
    with reading("input", input):
        summary = run(source, feature_spec, out, end)
    typer.echo(format_summary(summary, out))


def format_summary(summary: Any, out: Path) -> str:
    """One screen: rows per split, label rates per task, vocab sizes, quarantined counts."""
    tasks = list(next(iter(summary.label_rates.values()), {}))
    lines = [f"dataset {summary.dataset}: {summary.rows_in} rows in -> {out}"]
    lines.append(f"{'split':<6} {'rows':>10} {'window':>23}" + "".join(f" {t:>12}" for t in tasks))
    for split, n in summary.rows.items():
        w = summary.windows.get(split)
        window = f"{w['start']}..{w['end']}" if w else "-"
        rates = summary.label_rates[split]
        lines.append(f"{split:<6} {n:>10} {window:>23}" + "".join(f" {rates[t]:>12.4f}" for t in tasks))
    lines.append("vocab sizes: " + ", ".join(f"{k}={v}" for k, v in summary.vocab_sizes.items()))
    bad = sum(summary.quarantined.values())
    detail = "; ".join(f"{r}: {n}" for r, n in summary.quarantined.items())
    lines.append(f"quarantined: {bad}" + (f" ({detail}) -> {out / 'quarantine.parquet'}" if bad else ""))
    lines.append(f"fitted transform {summary.transform_hash} -> {out / 'transform.json'}")
    return "\n".join(lines)


STORE_DEFAULT = "MLFLOW_TRACKING_URI, else sqlite:///.mlflow/mlflow.db"


@app.command("train")
def train_cmd(
    features: Annotated[Path, typer.Option(help="Output of `ranker features build`.")],
    model: Annotated[str | None, typer.Option(
        help="mmoe, ple, omoe, shared_bottom or single_task.", show_default=TRAIN.model)] = None,
    config: Annotated[Path | None, typer.Option(
        help="YAML of training fields (+ model_config: {...}).", show_default="none")] = None,
    recipe: Annotated[bool, typer.Option(
        help="Without --config: start from the dataset's bundled training settings "
             "(pipelines/configs/train/<dataset>.yaml: census, kuairand), printed at the start.")] = True,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Model config override key=value (repeatable; JSON values, checked against the field's type).",
        show_default="none")] = None,
    out: Annotated[Path, typer.Option(help="Folder for checkpoints, artifact, metrics.json.")] = Path("runs/latest"),
    epochs: Annotated[int | None, typer.Option(help="Training epochs.", show_default=str(TRAIN.epochs))] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per batch.", show_default=str(TRAIN.batch_size))] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate.", show_default=str(TRAIN.lr))] = None,
    seed: Annotated[int | None, typer.Option(
        help="Seed for weights, shuffling and dropout.", show_default=str(TRAIN.seed))] = None,
    accelerator: Annotated[str | None, typer.Option(
        help="Lightning accelerator: auto, cpu, gpu.", show_default=TRAIN.accelerator)] = None,
    devices: Annotated[str | None, typer.Option(
        help="Devices per node (e.g. 2, or auto).", show_default=str(TRAIN.devices))] = None,
    num_nodes: Annotated[int | None, typer.Option(
        help="Machines taking part; run the same command on each, under torchrun (--nnodes), srun, or with "
             "MASTER_ADDR, MASTER_PORT and NODE_RANK set. Global rank 0 alone logs, exports and registers.",
        show_default=str(TRAIN.num_nodes))] = None,
    strategy: Annotated[str | None, typer.Option(
        help="Lightning strategy: auto, ddp or torchrec (sharded tables).", show_default=TRAIN.strategy)] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoints/last.ckpt.")] = False,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.", show_default=STORE_DEFAULT)] = None,
    experiment: Annotated[str | None, typer.Option(
        help="MLflow experiment name.", show_default=TRAIN.experiment)] = None,
    register_as: Annotated[str | None, typer.Option(
        help="Registered model name ('' = don't register).", show_default=str(TRAIN.register_as))] = None,
    alias: Annotated[str | None, typer.Option(
        help="Point this alias at the new version (the pipeline's gates move the champion).",
        show_default="none: no alias moves")] = None,
    promote: Annotated[bool, typer.Option(
        help="Make the new version the champion without gates (same as --alias champion; tagged so).")] = False,
) -> None:
    """Train a model, export the inference artifact, log to MLflow and register it.

    Precedence: command-line options > --config file, or else the dataset's bundled recipe > defaults;
    --set overrides model_config.
    """
    if promote and alias not in (None, "", "champion"):
        raise ValueError(f"--promote moves 'champion'; it cannot go with --alias {alias!r}")
    if num_nodes is not None and num_nodes < 1:
        raise ValueError(f"--num-nodes must be >= 1, got {num_nodes}")
    # The local inputs first (paths, config, --set, the transform), then the store, then the training
    # stack (seconds of imports): a bad input is one line at once.
    if not (features / "transform.json").is_file():
        raise ValueError(f"not a features folder (no transform.json): {str(features)!r}")
    _out_folder(out)
    if config is not None:
        _read_mapping(config, "config file")
    from features.fitted import FittedTransform
    from pipelines.train_config import (
        features_dataset,
        load_config_file,
        load_recipe,
        merge_overrides,
        parse_overrides,
        recipe_path,
    )
    from pipelines.train_config import model_overrides as typed_overrides

    FittedTransform.load(features / "transform.json")  # checked here (milliseconds); train reads it again
    with reading("config file", config) if config else nullcontext():
        fields, model_overrides = load_config_file(config) if config else ({}, {})
    dataset = features_dataset(features) if config is None and recipe else None
    bundled = recipe_path(dataset) if dataset else None
    if bundled is not None:
        fields, model_overrides = load_recipe(bundled, model or TRAIN.model)
        shown = {**fields, "model_config": {k: list(v) if isinstance(v, tuple) else v
                                            for k, v in model_overrides.items()}}
        typer.echo(f"training settings: the bundled {dataset} recipe ({bundled.name}; --no-recipe or --config "
                   f"to start from the defaults or a file): {json.dumps(shown)}")
    overrides = typed_overrides(parse_overrides(set_ or []), "--set")
    from pipelines.tracking import check_reachable, default_tracking_uri

    store = tracking_uri or default_tracking_uri()
    # Only global rank 0 opens the store: a launcher's other processes, on any node (a non-zero RANK, LOCAL_RANK,
    # NODE_RANK, GROUP_RANK or SLURM_PROCID: ranking.train.fitting.launched_as_rank_zero, read here without torch).
    if any(os.environ.get(v, "0").strip() not in ("", "0")
           for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")):
        uri = store
    else:
        with reading("tracking store", store):
            uri = check_reachable(store)  # seconds, not MLflow's minutes of retries
    from pipelines.train import train
    given = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "accelerator": accelerator,
             "strategy": strategy, "devices": (int(devices) if devices and devices.isdigit() else devices),
             "num_nodes": num_nodes,
             "model": model, "experiment": experiment, "register_as": register_as, "alias": alias}
    fields.update({k: v for k, v in given.items() if v is not None})
    for key in ("register_as", "alias"):
        if fields.get(key) == "":
            fields[key] = None
    if promote:
        if fields.get("alias") not in (None, "champion"):
            raise ValueError(f"--promote moves 'champion'; it cannot go with --alias {fields['alias']!r}")
        fields["alias"] = "champion"
    if resume:
        fields["resume"] = True
    cfg = TrainConfig(features=features, out=out, tracking_uri=uri,
                      model_overrides=merge_overrides(model_overrides, overrides), **fields)
    _setup_logging()  # after the checks and imports: an error line comes first, and imports log nothing
    last = out / "checkpoints" / "last.ckpt"
    errors.on_interrupt(lambda: f"rerun with --resume to continue from {last}" if last.is_file() else None)
    result = train(cfg)
    if not result.primary:
        return
    shown = {k: round(v, 4) for k, v in sorted(result.metrics.items()) if k.startswith("val/") and "/gate/" not in k}
    typer.echo(json.dumps(shown, indent=1))
    typer.echo(f"run {result.run_id}; best epoch {result.best_epoch}; artifact {result.artifact}; "
               f"registered version {result.model_version}"
               + (f", now {cfg.register_as}@{cfg.alias} (no gates)" if result.model_version and cfg.alias
                  else " (no alias moved; --promote makes it the champion)" if result.model_version else ""))


@app.command("serve")
def serve_cmd(
    model: Annotated[str, typer.Option(help="models:/name@alias, models:/name/version or a folder.")] = (
        "models:/ranker@champion"
    ),
    host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0: every one, as in a container).")] = (
        serve_defaults.HOST),
    port: Annotated[int, typer.Option(help="Port (0 picks a free one).")] = serve_defaults.PORT,
    tracking_uri: Annotated[str | None, typer.Option(
        help="MLflow tracking URI of an existing store (never created here).", show_default=STORE_DEFAULT)] = None,
    max_candidates: Annotated[int, typer.Option(help="Most candidates per request.")] = serve_defaults.MAX_CANDIDATES,
    max_batch_candidates: Annotated[int, typer.Option(help="Most candidates in one batched forward pass.")] = (
        serve_defaults.MAX_BATCH_CANDIDATES),
    max_queue_delay_us: Annotated[int, typer.Option(
        help="Longest a request may wait for a batch to fill (µs); spent only while others are expected.")] = (
        serve_defaults.MAX_QUEUE_DELAY_US),
    max_queue: Annotated[int, typer.Option(help="Most requests waiting; beyond: RESOURCE_EXHAUSTED.")] = (
        serve_defaults.MAX_QUEUE),
    max_queue_wait_ms: Annotated[float, typer.Option(
        help="Refuse (RESOURCE_EXHAUSTED) a request whose expected wait exceeds this (ms); 0 = no budget.")] = (
        serve_defaults.MAX_QUEUE_WAIT_MS),
    batching: Annotated[bool, typer.Option(help="Batch candidates across concurrent requests.")] = True,
    reload_interval_s: Annotated[float, typer.Option(help="Poll the model URI every N s; 0 = off.")] = (
        serve_defaults.RELOAD_INTERVAL_S),
    metrics_port: Annotated[int | None, typer.Option(
        help="Serve Prometheus /metrics on this port of --host (0 picks a free one).", show_default="off")] = None,
    tls_cert: Annotated[Path | None, typer.Option(
        help="PEM certificate chain (with --tls-key).", show_default="none: plaintext")] = None,
    tls_key: Annotated[Path | None, typer.Option(
        help="PEM private key (with --tls-cert).", show_default="none: plaintext")] = None,
    max_message_mb: Annotated[int, typer.Option(help="Largest request or response message (MiB).")] = (
        serve_defaults.MAX_MESSAGE_MB),
    drain_s: Annotated[float, typer.Option(
        help="On SIGTERM: health NOT_SERVING at once, then serve this long while health-checking clients move "
             "away, before refusing new calls (s).")] = serve_defaults.DRAIN_S,
    grace_s: Annotated[float, typer.Option(
        help="After the drain: requests in flight get this long to finish (s).")] = serve_defaults.GRACE_S,
    max_connection_age_s: Annotated[float, typer.Option(
        help="Close client connections older than this with GOAWAY (they reconnect without failing a call, "
             "re-resolving a headless Service onto new replicas); 0 = never.")] = serve_defaults.MAX_CONNECTION_AGE_S,
    log_format: Annotated[str, typer.Option(help="json (one object per line) or text.")] = "json",
    torch_threads: Annotated[int, typer.Option(help="Threads of one forward pass (forwards run one at a time).")] = 1,
    ready_file: Annotated[Path | None, typer.Option(
        help="Write the bound port here when serving.", show_default="none")] = None,
    workers: Annotated[int | None, typer.Option(
        help="Server processes sharing the port (SO_REUSEPORT); 1 = one process, no supervisor.",
        show_default="one per core")] = None,
    compile: Annotated[bool, typer.Option(
        help="compile the network ahead of time at load (AOTInductor; the first load of an artifact takes "
             "15-50 s, later ones reuse $RANKER_COMPILE_CACHE; eager if it fails or disagrees).")] = False,
    experts_k: Annotated[int, typer.Option(
        help="Experts per row at serving (fewer = cheaper; top-k, the shared selection's k, or expert choice's "
             "capacity).", show_default="0: the artifact's gate.serving_k, else as trained")] = 0,
) -> None:
    """Serve the Ranker gRPC API (health checks and reflection included) until SIGINT/SIGTERM.

    Before anything is bound, the ports are checked, the tracking store is opened (an existing one
    only: a mistyped sqlite path is an error, not a new empty store) and the model is fetched,
    loaded and warmed up once.
    """
    import asyncio

    from pipelines.ui import check_bindable, project_store_uri, sqlite_path

    if log_format not in ("json", "text"):
        raise ValueError(f"--log-format must be json or text, got {log_format!r}")
    if not 0 <= max_queue_wait_ms < float("inf"):  # also refuses NaN
        raise ValueError(f"--max-queue-wait-ms must be a finite number >= 0 (0: no budget), got {max_queue_wait_ms}")
    if torch_threads < 1:
        raise ValueError(f"--torch-threads must be >= 1, got {torch_threads}")
    if experts_k < 0:
        raise ValueError(f"--experts-k must be >= 0 (0: the artifact's own), got {experts_k}")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    check_bindable(host, port, "--port")
    if metrics_port is not None:
        if metrics_port == port != 0:
            raise ValueError(f"--metrics-port {metrics_port} is the gRPC --port too; give another")
        check_bindable(host, metrics_port, "--metrics-port")
    local = "://" not in model and ":/" not in model  # what serving.holder reads as a folder
    if local and not Path(model).is_dir():
        raise ValueError(f"model uri {model!r} is neither an MLflow URI nor an existing folder")
    store = tracking_uri or project_store_uri()
    if not local:
        db = sqlite_path(store)
        if db is not None and not db.is_file():
            raise ValueError(f"tracking store {store!r} does not exist (no file {str(db)!r}); ranker serve reads "
                             "an existing store and never creates one")
        from pipelines.tracking import check_reachable

        with reading("tracking store", store):
            store = check_reachable(store)  # the URI to hand on (a database's driver named), also to workers

    from serving.batcher import BatcherConfig
    from serving.holder import ModelHolder
    from serving.server import ServerOptions, serve
    from serving.workers import PoolOptions, WorkerError, default_workers, serve_workers

    options = ServerOptions(
        host=host, port=port, max_candidates=max_candidates, max_message_bytes=max_message_mb * 1024 * 1024,
        tls_cert=str(tls_cert) if tls_cert else None, tls_key=str(tls_key) if tls_key else None,
        batching=BatcherConfig(max_batch_candidates=max_batch_candidates, max_queue_delay_us=max_queue_delay_us,
                               max_queue=max_queue, max_queue_wait_us=round(max_queue_wait_ms * 1000),
                               enabled=batching),
        reload_interval_s=reload_interval_s, metrics_port=metrics_port, compile=compile, experts_k=experts_k,
        max_connection_age_s=max_connection_age_s, drain_s=drain_s, grace_s=grace_s,
    )
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one log line, not a bar
    with reading("model", model), _quiet("serving"):
        check = ModelHolder(model, store, experts_k=experts_k)  # what the server will load, once, before binding
        try:
            check.load()
        finally:
            check.close()
    n_workers = default_workers() if workers is None else workers
    _setup_serve_process(log_format, torch_threads)
    if n_workers > 1:
        try:
            serve_workers(model, tracking_uri=store, ready_file=str(ready_file) if ready_file else None,
                          options=options, pool=PoolOptions(workers=n_workers),
                          setup=functools.partial(_setup_serve_process, log_format, torch_threads))
        except WorkerError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2 if e.user_error else 1) from None
        return
    asyncio.run(serve(model, tracking_uri=store, options=options, ready_file=str(ready_file) if ready_file else None))


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Keep logger ``name``'s records off the terminal (a failed load logs its traceback; the error line says why)."""
    logger = logging.getLogger(name)
    saved = logger.propagate, logger.handlers[:]
    logger.propagate, logger.handlers = False, [logging.NullHandler()]
    try:
        yield
    finally:
        logger.propagate, logger.handlers = saved


def _setup_serve_process(log_format: str, torch_threads: int) -> None:
    """Logging and torch threads of a serving process (``ranker serve`` and each of its workers)."""
    import torch

    from serving.observability import setup_json_logging

    torch.set_num_threads(torch_threads)
    if log_format == "json":
        logging.getLogger().handlers.clear()  # imports (fbgemm_gpu) may have added a plain handler
        setup_json_logging("INFO")
        quiet.install()
    else:
        _setup_logging()


@app.command("rank")
def rank_cmd(
    target: Annotated[str, typer.Option(help="host:port of a running `ranker serve`.")] = (
        f"{serve_defaults.HOST}:{serve_defaults.PORT}"),
    log: Annotated[Path | None, typer.Option(
        help="Take the request from this raw log (or give --request).", show_default="none")] = None,
    request: Annotated[Path | None, typer.Option(
        help="A JSON request {user, context, candidates, item_ids} (or give --log).", show_default="none")] = None,
    index: Annotated[int, typer.Option(help="Which request of --log (time order; -1 = last).")] = -1,
    dataset: Annotated[str, typer.Option(help="Spec that names user/context/item columns of --log.")] = (
        "synthetic"
    ),
    top_k: Annotated[int, typer.Option(help="Candidates to return (0 = all).")] = 10,
    weight: Annotated[list[str] | None, typer.Option(
        help="Objective weight override name=value (repeatable).", show_default="the model's serving weights")] = None,
    timeout_s: Annotated[float, typer.Option(help="Deadline of the call in seconds.")] = 5.0,
) -> None:
    """Send one Rank call and print the ranked list with each objective's score."""
    if (log is None) == (request is None):
        raise ValueError("give exactly one of --log or --request")
    if log is not None and not log.exists():
        raise ValueError(f"--log {str(log)!r}: no such file or folder")
    weights = _weights(weight or [])
    import grpc

    from features.spec import load_spec
    from pipelines.requests import request_from_log
    from serving.client import RankerClient, format_ranking

    if log is not None:
        spec = load_spec(dataset)
        with reading("log", log):
            req = request_from_log(log, spec, index)
    else:
        req = _read_request(request)
    try:
        with RankerClient(target) as client:
            resp = client.rank(req.user, req.context, req.candidates, req.item_ids,
                               objective_weights=weights or None, top_k=top_k,
                               request_id=req.request_id, timeout_s=timeout_s)
    except grpc.RpcError as e:
        typer.echo(f"error: ranker at {target!r}: {e.code().name}: {_one_line(str(e.details()))}", err=True)
        raise typer.Exit(1) from None
    typer.echo(format_ranking(resp, limit=top_k or len(resp.candidates)))


def _weights(given: list[str]) -> dict[str, float]:
    """``--weight name=value`` options -> {name: value} (the model checks the names and values)."""
    weights = {}
    for w in given:
        name, _, value = w.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"--weight expects name=number, got {w!r}") from None
    return weights


@app.command("score")
def score_cmd(
    model: Annotated[str, typer.Option(help="models:/name@alias, models:/name/version or an artifact folder.")],
    input: Annotated[Path, typer.Option(
        help="The raw impression log: a Parquet file or a (date-partitioned) folder, or the dataset's own files "
             "(KuaiRand, census) for a model of that dataset.")],
    out: Annotated[Path, typer.Option(help="Output folder: part-*.parquet, quarantine.parquet, summary.json.")],
    engine: Annotated[str, typer.Option(help="polars (this process) or ray (Ray Data; pip install -e .[ray]).")] = (
        "polars"),
    ray_address: Annotated[str | None, typer.Option(
        help="Ray cluster to join (ray://host:10001, auto); with --engine ray.",
        show_default="RAY_ADDRESS, else a local Ray")] = None,
    workers: Annotated[int | None, typer.Option(
        help="Ray actors scoring in parallel (each loads the model once); with --engine ray.",
        show_default="the cluster's CPUs")] = None,
    tracking_uri: Annotated[str | None, typer.Option(
        help="MLflow tracking URI of an existing store (for models:/ URIs).", show_default=STORE_DEFAULT)] = None,
    weight: Annotated[list[str] | None, typer.Option(
        help="Objective weight of the combined score, name=value (repeatable).",
        show_default="the model's serving weights")] = None,
    batch_rows: Annotated[int, typer.Option(help="Rows scored at a time (memory is bounded by one batch).")] = (
        65_536),
) -> None:
    """Score a raw impression log with a model: each row's objective scores and combined score, as
    ranker serve answers them (backfills, offline evaluation, precomputed scores)."""
    if engine not in ("polars", "ray"):
        raise ValueError(f"--engine must be polars or ray, got {engine!r}")
    if batch_rows < 1:
        raise ValueError(f"--batch-rows must be >= 1, got {batch_rows}")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if engine != "ray" and (ray_address is not None or workers is not None):
        raise ValueError("--ray-address and --workers go with --engine ray")
    if not input.exists():
        raise ValueError(f"--input {str(input)!r}: no such file or folder")
    _out_folder(out)
    weights = _weights(weight or [])
    local = "://" not in model and ":/" not in model
    if local and not Path(model).is_dir():
        raise ValueError(f"model uri {model!r} is neither an MLflow URI nor an existing folder")
    store = None
    if not local:
        from pipelines.tracking import check_reachable, default_tracking_uri

        store = tracking_uri or default_tracking_uri()
        with reading("tracking store", store):
            store = check_reachable(store)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from pipelines.score import open_model, score_log

    with _quiet("serving"):
        opened = open_model(model, store, weights or None)  # a bad weight is refused before any log line
    _setup_logging()
    if engine == "ray":
        from pipelines.score_ray import score_log_ray

        summary = score_log_ray(opened, input, out, batch_rows=batch_rows, address=ray_address, workers=workers)
    else:
        summary = score_log(opened, input, out, batch_rows=batch_rows)
    typer.echo(summary.line(out))


def _read_request(path: Path | None) -> Any:
    from pipelines.requests import RawRequest

    if path is None or not path.is_file():
        raise ValueError(f"request file not found: {str(path)!r}")
    try:
        body = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"request file {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ValueError(f"request file {str(path)!r} must hold a JSON object, got {type(body).__name__}")
    missing = [k for k in ("user", "context", "candidates", "item_ids") if k not in body]
    if missing:
        raise ValueError(f"request file {str(path)!r} lacks field(s) {missing}")
    return RawRequest(str(body.get("request_id", "")), body["user"], body["context"], body["candidates"],
                      body["item_ids"])


def _config_path(config: str) -> Path:
    """``--config``: a YAML path, or a bare name (``synthetic``) for a bundled file."""
    from pipelines.config import bundled_config

    path = Path(config)
    if not path.is_file() and "/" not in config and not config.endswith((".yaml", ".yml")):
        path = bundled_config(config)
    return path


def _pipeline_config(config: str, workdir: Path | None = None, tracking_uri: str | None = None) -> Any:
    """The typed pipeline config (cheap: no training stack imported); its workdir must not be a file."""
    from pipelines.config import load_pipeline_config

    cfg = load_pipeline_config(_config_path(config), workdir=workdir, tracking_uri=tracking_uri)
    _out_folder(cfg.workdir, "workdir")
    return cfg


def _command(*args: str | Path | None) -> str:
    """A ``ranker`` command line to show; flags whose value is None are left out (pairs: flag, value)."""
    words: list[str] = []
    it = iter(args)
    for word in it:
        if isinstance(word, str) and word.startswith("--"):
            value = next(it)
            if value is not None:
                words += [word, str(value)]
        elif word is not None:
            words.append(str(word))
    return "ranker " + shlex.join(words)


@pipeline_app.command("run")
def pipeline_run(
    config: Annotated[str, typer.Option(help="Pipeline YAML, or the name of a bundled one (synthetic, kuairand).")],
    as_of: Annotated[str | None, typer.Option(
        help="Run for this day YYYY-MM-DD.", show_default="the newest day of data")] = None,
    force: Annotated[bool, typer.Option(help="Run again even if this day is already done.")] = False,
    workdir: Annotated[Path | None, typer.Option(
        help="Override the config's workdir.", show_default="the config's")] = None,
    tracking_uri: Annotated[str | None, typer.Option(
        help="Override the config's MLflow URI.", show_default="the config's")] = None,
) -> None:
    """Ingest -> validate -> features -> train -> evaluate vs champion -> register -> promote -> report.

    Re-running a day already done is a no-op (unless --force); an interrupted run resumes where it stopped.
    """
    day = _day(as_of, "--as-of")
    cfg = _pipeline_config(config, workdir, tracking_uri)
    from pipelines.tracking import check_reachable, default_tracking_uri

    store = cfg.tracking_uri or default_tracking_uri()
    with reading("tracking store", store):
        check_reachable(store)  # before the training stack is imported (the pipeline checks it again)
    _setup_logging()
    from pipelines.pipeline import run_pipeline

    again = _command("pipeline", "run", "--config", config, "--as-of", as_of, "--workdir", workdir,
                     "--tracking-uri", tracking_uri)  # never --force: that would start the day over
    errors.on_interrupt(lambda: f"rerun `{again}` to resume at the first unfinished step")
    result = run_pipeline(cfg, as_of=day, force=force)
    typer.echo(result.message)
    if result.status == "done":
        typer.echo(f"report: {result.report}")
        typer.echo(f"MLflow parent run {result.parent_run_id}; version {result.version}; "
                   f"promoted: {'yes' if result.promoted else 'no'}")
        if result.runs_url:
            typer.echo(f"MLflow runs list: {result.runs_url}")


@pipeline_app.command("schedule")
def pipeline_schedule(
    config: Annotated[str, typer.Option(help="Pipeline YAML, or the name of a bundled one.")],
    cron: Annotated[str, typer.Option(help="5-field crontab expression, e.g. '0 3 * * *'.")],
    timezone: Annotated[str, typer.Option(help="Time zone of the cron expression.")] = "UTC",
    misfire_grace_s: Annotated[int, typer.Option(help="Catch up a run missed by at most this many seconds.")] = (
        6 * 3600
    ),
    run_now: Annotated[bool, typer.Option(help="Also run once right away.")] = False,
    jobstore_url: Annotated[str | None, typer.Option(
        help="SQLAlchemy URL of the job store.", show_default="sqlite:///<pipeline workdir>/scheduler.db")] = None,
) -> None:
    """Run the pipeline on a cron schedule until SIGINT/SIGTERM; missed runs are caught up once, never overlapped."""
    path = _config_path(config)
    _pipeline_config(config)  # a bad file fails now, not at the first fire time
    from pipelines.schedule import ScheduleConfig, parse_cron, run_schedule

    parse_cron(cron, timezone)
    _setup_logging()
    with reading("job store", jobstore_url) if jobstore_url else nullcontext():
        run_schedule(ScheduleConfig(config_path=path, cron=cron, jobstore_url=jobstore_url,
                                    misfire_grace_s=misfire_grace_s, run_now=run_now, timezone=timezone))


@pipeline_app.command("show")
def pipeline_show(
    config: Annotated[str, typer.Option(help="Pipeline YAML, or the name of a bundled one.")],
) -> None:
    """Print the effective configuration (environment expanded, paths resolved)."""
    cfg = _pipeline_config(config)
    from pipelines.pipeline import dump_config

    typer.echo(dump_config(cfg))


@app.command("demo")
def demo_cmd(
    workdir: Annotated[Path, typer.Option(help="Folder for the pipeline's landing data, lake and runs.")] = Path(
        ".demo"),
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.", show_default=STORE_DEFAULT)] = None,
) -> None:
    """The whole path: `ranker pipeline run --config synthetic`, then serve the champion and rank once."""
    import subprocess

    _out_folder(workdir, "--workdir")
    from pipelines.tracking import check_reachable, default_tracking_uri

    store = tracking_uri or default_tracking_uri()
    with reading("tracking store", store):
        uri = check_reachable(store)
    _setup_logging()
    from pipelines.demo import DemoConfig, run_demo

    again = _command("demo", "--workdir", workdir, "--tracking-uri", tracking_uri)
    errors.on_interrupt(lambda: f"rerun `{again}` to resume (the pipeline continues where it stopped)")
    try:
        run_demo(DemoConfig(workdir=workdir, tracking_uri=uri))
    except subprocess.CalledProcessError as e:  # the step's own command printed its error line
        raise typer.Exit(e.returncode if e.returncode > 0 else 1) from None
