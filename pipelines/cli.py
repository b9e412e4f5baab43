"""The ``ranker`` command line: thin commands that parse into typed configs and call library code."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

app = typer.Typer(help="MMoE multi-task ranker: data, features, training, serving.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets.", no_args_is_help=True)
features_app = typer.Typer(help="Feature pipelines.", no_args_is_help=True)
pipeline_app = typer.Typer(help="Scheduled training: ingest, train, evaluate against the champion, promote.",
                            no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(features_app, name="features")
app.add_typer(pipeline_app, name="pipeline")

F = TypeVar("F", bound=Callable[..., Any])


def friendly(fn: F) -> F:
    """Turn user errors into one readable line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pipelines.lock import PipelineBusy

        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, KeyError, PipelineBusy) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,  # imports (fbgemm_gpu) may already have configured the root logger
    )


def _day(value: str | None, flag: str) -> date | None:
    """``YYYY-MM-DD`` -> date (None stays None); anything else is an error naming the flag."""
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{flag} must be YYYY-MM-DD, got {value!r}") from None


@data_app.command("synth")
@friendly
def data_synth(
    out: Annotated[Path, typer.Option(help="Output folder (date=YYYY-MM-DD/ partitions).")],
    days: Annotated[int | None, typer.Option(help="Days of impressions.")] = None,
    users: Annotated[int | None, typer.Option(help="Number of users.")] = None,
    items: Annotated[int | None, typer.Option(help="Number of items.")] = None,
    requests_per_day: Annotated[int | None, typer.Option(help="Requests per day.")] = None,
    slate_size: Annotated[int | None, typer.Option(help="Candidates shown per request.")] = None,
    correlation: Annotated[float | None, typer.Option(help="Engagement/satisfaction correlation.")] = None,
    position_bias: Annotated[float | None, typer.Option(help="Exponent of the examination curve.")] = None,
    policy_promotion: Annotated[
        float | None, typer.Option(help="Logging-policy boost for promoted categories (a position confounder).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
) -> None:
    """Write a synthetic YouTube-like impression log as date-partitioned Parquet."""
    from features.synthetic import config_with, write_log

    cfg = config_with(
        days=days, users=users, items=items, requests_per_day=requests_per_day, slate_size=slate_size,
        correlation=correlation, position_bias=position_bias, policy_promotion=policy_promotion, seed=seed,
    )
    paths = write_log(cfg, out)
    rows = cfg.days * cfg.requests_per_day * cfg.slate_size
    typer.echo(f"wrote {rows} impressions in {len(paths)} daily partitions under {out}")


@features_app.command("build")
@friendly
def features_build(
    input: Annotated[Path, typer.Option(help="Raw data: a file or folder in the dataset's layout.")],
    out: Annotated[Path, typer.Option(help="Output folder for model-ready data.")],
    dataset: Annotated[str, typer.Option(help="Dataset adapter: synthetic, kuairand or census.")] = "synthetic",
    spec: Annotated[Path | None, typer.Option(help="A spec YAML file (default: the dataset's own).")] = None,
    train_end: Annotated[str | None, typer.Option(help="Last training day YYYY-MM-DD.")] = None,
) -> None:
    """Validate, split, fit on the training rows only, write model-ready Parquet and a summary."""
    from features.build import build
    from features.datasets import scan_dataset
    from features.spec import load_spec

    end = _day(train_end, "--train-end")
    # A Parquet log folder is built partition by partition (bounded memory); adapters give one frame.
    source = input if dataset == "synthetic" else scan_dataset(dataset, input)
    summary = build(source, load_spec(spec or dataset), out, end)
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


@app.command("train")
@friendly
def train_cmd(
    features: Annotated[Path, typer.Option(help="Output of `ranker features build`.")],
    model: Annotated[str | None, typer.Option(help="mmoe (default), ple, omoe, shared_bottom, single_task.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML of training fields (+ model_config: {...}).")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Model config override key=value (repeatable).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for checkpoints, artifact, metrics.json.")] = Path("runs/latest"),
    epochs: Annotated[int | None, typer.Option(help="Training epochs (default 2).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per batch (default 1024).")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate (default 2e-3).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for weights, shuffling and dropout.")] = None,
    accelerator: Annotated[str | None, typer.Option(help="Lightning accelerator: auto, cpu, gpu.")] = None,
    devices: Annotated[str | None, typer.Option(help="Devices per node (e.g. 2, or auto).")] = None,
    strategy: Annotated[str | None, typer.Option(help="Lightning strategy (auto, ddp).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoints/last.ckpt.")] = False,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow URI (default: .mlflow/ sqlite).")] = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment name (default ranker).")] = None,
    register_as: Annotated[str | None, typer.Option(help="Registered model name ('' = don't register).")] = None,
    alias: Annotated[str | None, typer.Option(
        help="Point this alias at the new version (none by default; the pipeline's gates move the champion).")] = None,
    promote: Annotated[bool, typer.Option(
        help="Make the new version the champion without gates (same as --alias champion; tagged so).")] = False,
) -> None:
    """Train a model, export the inference artifact, log to MLflow and register it.

    Precedence: command-line options > --config file > defaults; --set overrides model_config.
    """
    from pipelines.tracking import check_reachable, default_tracking_uri
    from pipelines.train import TrainConfig, load_config_file, parse_overrides, train

    _setup_logging()
    fields, model_overrides = load_config_file(config) if config else ({}, {})
    given = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "accelerator": accelerator,
             "strategy": strategy, "devices": (int(devices) if devices and devices.isdigit() else devices),
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
    from ranking.data import features_transform_path

    features_transform_path(features)  # the local inputs first (read once, by train), then the store:
    uri = check_reachable(tracking_uri or default_tracking_uri())  # seconds, not MLflow's minutes of retries
    cfg = TrainConfig(
        features=features, out=out, tracking_uri=uri,
        model_overrides={**model_overrides, **parse_overrides(set_ or [])}, **fields,
    )
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
@friendly
def serve_cmd(
    model: Annotated[str, typer.Option(help="models:/name@alias, models:/name/version or a folder.")] = (
        "models:/ranker@champion"
    ),
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 picks a free one).")] = 50051,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow URI (default: .mlflow/ sqlite).")] = None,
    max_candidates: Annotated[int, typer.Option(help="Most candidates per request.")] = 1000,
    max_batch_candidates: Annotated[int, typer.Option(help="Most candidates in one batched forward pass.")] = 1000,
    max_queue_delay_us: Annotated[int, typer.Option(
        help="Longest a request may wait for a batch to fill (µs); spent only while others are expected.")] = 2000,
    max_queue: Annotated[int, typer.Option(help="Most requests waiting; beyond: RESOURCE_EXHAUSTED.")] = 256,
    max_queue_wait_ms: Annotated[float, typer.Option(
        help="Refuse (RESOURCE_EXHAUSTED) a request whose expected wait exceeds this (ms); 0 = no budget.")] = 0.0,
    batching: Annotated[bool, typer.Option(help="Batch candidates across concurrent requests.")] = True,
    reload_interval_s: Annotated[float, typer.Option(help="Poll the model URI every N s; 0 = off.")] = (
        30.0
    ),
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus /metrics on this port of --host.")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate chain (with --tls-key).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key (with --tls-cert).")] = None,
    max_message_mb: Annotated[int, typer.Option(help="Largest request or response message (MiB).")] = 16,
    log_format: Annotated[str, typer.Option(help="json (one object per line) or text.")] = "json",
    torch_threads: Annotated[int, typer.Option(help="Threads of one forward pass (forwards run one at a time).")] = 1,
    ready_file: Annotated[Path | None, typer.Option(help="Write the bound port here when serving.")] = None,
    workers: Annotated[int | None, typer.Option(
        help="Server processes sharing the port (SO_REUSEPORT); default one per core; 1 = one process.")] = None,
    compile: Annotated[bool, typer.Option(
        help="torch.compile the model at load (slower loads; eager if it fails or disagrees).")] = False,
) -> None:
    """Serve the Ranker gRPC API (health checks and reflection included) until SIGINT/SIGTERM."""
    import asyncio

    from pipelines.tracking import default_tracking_uri
    from serving.batcher import BatcherConfig
    from serving.server import ServerOptions, serve

    if log_format not in ("json", "text"):
        raise ValueError(f"--log-format must be json or text, got {log_format!r}")
    if not 0 <= max_queue_wait_ms < float("inf"):  # also refuses NaN
        raise ValueError(f"--max-queue-wait-ms must be a finite number >= 0 (0: no budget), got {max_queue_wait_ms}")
    options = ServerOptions(
        host=host, port=port, max_candidates=max_candidates, max_message_bytes=max_message_mb * 1024 * 1024,
        tls_cert=str(tls_cert) if tls_cert else None, tls_key=str(tls_key) if tls_key else None,
        batching=BatcherConfig(max_batch_candidates=max_batch_candidates, max_queue_delay_us=max_queue_delay_us,
                               max_queue=max_queue, max_queue_wait_us=round(max_queue_wait_ms * 1000),
                               enabled=batching),
        reload_interval_s=reload_interval_s, metrics_port=metrics_port, compile=compile,
    )
    if torch_threads < 1:
        raise ValueError(f"--torch-threads must be >= 1, got {torch_threads}")
    from serving.workers import PoolOptions, WorkerError, default_workers, serve_workers

    n_workers = default_workers() if workers is None else workers
    if n_workers < 1:
        raise ValueError(f"--workers must be >= 1, got {n_workers}")
    _setup_serve_process(log_format, torch_threads)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one log line, not a bar
    if n_workers > 1:
        try:
            serve_workers(model, tracking_uri=tracking_uri or default_tracking_uri(),
                          ready_file=str(ready_file) if ready_file else None, options=options,
                          pool=PoolOptions(workers=n_workers),
                          setup=functools.partial(_setup_serve_process, log_format, torch_threads))
        except WorkerError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2 if e.user_error else 1) from None
        return
    asyncio.run(
        serve(model, tracking_uri=tracking_uri or default_tracking_uri(), options=options,
              ready_file=str(ready_file) if ready_file else None)
    )


def _setup_serve_process(log_format: str, torch_threads: int) -> None:
    """Logging and torch threads of a serving process (``ranker serve`` and each of its workers)."""
    import torch

    from serving.observability import setup_json_logging

    torch.set_num_threads(torch_threads)
    if log_format == "json":
        logging.getLogger().handlers.clear()  # imports (fbgemm_gpu) may have added a plain handler
        setup_json_logging("INFO")
    else:
        _setup_logging()


@app.command("rank")
@friendly
def rank_cmd(
    target: Annotated[str, typer.Option(help="host:port of a running `ranker serve`.")] = "127.0.0.1:50051",
    log: Annotated[Path | None, typer.Option(help="Take the request from this raw log.")] = None,
    request: Annotated[Path | None, typer.Option(help="A JSON request {user, context, candidates, item_ids}.")]
    = None,
    index: Annotated[int, typer.Option(help="Which request of --log (time order; -1 = last).")] = -1,
    dataset: Annotated[str, typer.Option(help="Spec that names user/context/item columns of --log.")] = (
        "synthetic"
    ),
    top_k: Annotated[int, typer.Option(help="Candidates to return (0 = all).")] = 10,
    weight: Annotated[
        list[str] | None, typer.Option(help="Objective weight override name=value (repeatable).")
    ] = None,
    timeout_s: Annotated[float, typer.Option(help="Deadline of the call in seconds.")] = 5.0,
) -> None:
    """Send one Rank call and print the ranked list with each objective's score."""
    import grpc

    from features.spec import load_spec
    from pipelines.requests import request_from_log
    from serving.client import RankerClient, format_ranking

    if (log is None) == (request is None):
        raise ValueError("give exactly one of --log or --request")
    req = request_from_log(log, load_spec(dataset), index) if log is not None else _read_request(request)
    weights = {}
    for w in weight or []:
        name, _, value = w.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"--weight expects name=number, got {w!r}") from None
    try:
        with RankerClient(target) as client:
            resp = client.rank(req.user, req.context, req.candidates, req.item_ids,
                               objective_weights=weights or None, top_k=top_k,
                               request_id=req.request_id, timeout_s=timeout_s)
    except grpc.RpcError as e:
        typer.echo(f"error: {e.code().name}: {e.details()}", err=True)
        raise typer.Exit(1) from None
    typer.echo(format_ranking(resp, limit=top_k or len(resp.candidates)))


def _read_request(path: Path | None) -> Any:
    from pipelines.requests import RawRequest

    if path is None or not path.is_file():
        raise ValueError(f"request file not found: {str(path)!r}")
    try:
        body = json.loads(path.read_text())
        return RawRequest(str(body.get("request_id", "")), body["user"], body["context"],
                          body["candidates"], body["item_ids"])
    except json.JSONDecodeError as e:
        raise ValueError(f"request file {str(path)!r} is not valid JSON: {e}") from None
    except KeyError as e:
        raise ValueError(f"request file {str(path)!r} lacks field {e}") from None


def _config_path(config: str) -> Path:
    """``--config``: a YAML path, or a bare name (``synthetic``) for a bundled file."""
    from pipelines.config import bundled_config

    path = Path(config)
    if not path.is_file() and "/" not in config and not config.endswith((".yaml", ".yml")):
        path = bundled_config(config)
    return path


def _pipeline_config(config: str, workdir: Path | None = None, tracking_uri: str | None = None) -> Any:
    from pipelines.config import load_pipeline_config

    return load_pipeline_config(_config_path(config), workdir=workdir, tracking_uri=tracking_uri)


@pipeline_app.command("run")
@friendly
def pipeline_run(
    config: Annotated[str, typer.Option(help="Pipeline YAML, or the name of a bundled one (synthetic, kuairand).")],
    as_of: Annotated[str | None, typer.Option(help="Run for this day YYYY-MM-DD (default: newest day of data).")]
    = None,
    force: Annotated[bool, typer.Option(help="Run again even if this day is already done.")] = False,
    workdir: Annotated[Path | None, typer.Option(help="Override the config's workdir.")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="Override the config's MLflow URI.")] = None,
) -> None:
    """Ingest -> validate -> features -> train -> evaluate vs champion -> register -> promote -> report.

    Re-running a day already done is a no-op (unless --force); an interrupted run resumes where it stopped.
    """
    from pipelines.pipeline import run_pipeline

    _setup_logging()
    day = _day(as_of, "--as-of")
    result = run_pipeline(_pipeline_config(config, workdir, tracking_uri), as_of=day, force=force)
    typer.echo(result.message)
    if result.status == "done":
        typer.echo(f"report: {result.report}")
        typer.echo(f"MLflow parent run {result.parent_run_id}; version {result.version}; "
                   f"promoted: {'yes' if result.promoted else 'no'}")


@pipeline_app.command("schedule")
@friendly
def pipeline_schedule(
    config: Annotated[str, typer.Option(help="Pipeline YAML, or the name of a bundled one.")],
    cron: Annotated[str, typer.Option(help="5-field crontab expression, e.g. '0 3 * * *'.")],
    timezone: Annotated[str, typer.Option(help="Time zone of the cron expression.")] = "UTC",
    misfire_grace_s: Annotated[int, typer.Option(help="Catch up a run missed by at most this many seconds.")] = (
        6 * 3600
    ),
    run_now: Annotated[bool, typer.Option(help="Also run once right away.")] = False,
    jobstore_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the job store "
                                                          "(default: sqlite in the pipeline's workdir).")] = None,
) -> None:
    """Run the pipeline on a cron schedule until SIGINT/SIGTERM; missed runs are caught up once, never overlapped."""
    from pipelines.schedule import ScheduleConfig, run_schedule

    _setup_logging()
    run_schedule(ScheduleConfig(config_path=_config_path(config), cron=cron, jobstore_url=jobstore_url,
                                misfire_grace_s=misfire_grace_s, run_now=run_now, timezone=timezone))


@pipeline_app.command("show")
@friendly
def pipeline_show(
    config: Annotated[str, typer.Option(help="Pipeline YAML, or the name of a bundled one.")],
) -> None:
    """Print the effective configuration (environment expanded, paths resolved)."""
    from pipelines.pipeline import dump_config

    typer.echo(dump_config(_pipeline_config(config)))


@app.command("demo")
@friendly
def demo_cmd(
    workdir: Annotated[Path, typer.Option(help="Folder for the pipeline's landing data, lake and runs.")] = Path(
        ".demo"),
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow URI (default: .mlflow/ sqlite).")] = None,
) -> None:
    """The whole path: `ranker pipeline run --config synthetic`, then serve the champion and rank once."""
    from pipelines.demo import DemoConfig, run_demo
    from pipelines.tracking import default_tracking_uri

    _setup_logging()
    run_demo(DemoConfig(workdir=workdir, tracking_uri=tracking_uri or default_tracking_uri()))


if __name__ == "__main__":
    app()
