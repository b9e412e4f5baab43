"""The ranker CLI: --help everywhere (with every default shown), --version, and bad input gives one readable line
with a non-zero exit (the full table of bad inputs through the installed command is test_bad_inputs.py)."""

import dataclasses
import importlib.metadata
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from pipelines.cli import app

runner = CliRunner()


@pytest.mark.parametrize("cmd", [[], ["data", "synth"], ["features", "build"], ["train"], ["serve"],
                                 ["rank"], ["demo"]])
def test_help(cmd: list[str]) -> None:
    result = runner.invoke(app, [*cmd, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_synth_then_build(tmp_path: Path) -> None:
    r = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "log"), "--days", "2", "--users", "30",
                            "--items", "100", "--requests-per-day", "20", "--slate-size", "5"])
    assert r.exit_code == 0, r.output
    assert "wrote 200 impressions in 2 daily partitions" in r.output
    r = runner.invoke(app, ["features", "build", "--input", str(tmp_path / "log"), "--out", str(tmp_path / "f")])
    assert r.exit_code == 0, r.output
    assert "dataset synthetic: 200 rows in" in r.output
    assert re.search(r"^train\s+100\s+2026-01-01\.\.2026-01-01", r.output, re.M)
    assert re.search(r"^val\s+100\s+2026-01-02\.\.2026-01-02", r.output, re.M)
    assert "quarantined: 0" in r.output
    assert (tmp_path / "f" / "transform.json").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data", "synth", "--out", "x", "--correlation", "2"], "correlation must be in [-1, 1], got 2.0"),
        (["features", "build", "--input", "nowhere", "--out", "o"], "input not found: 'nowhere'"),
        (["features", "build", "--input", ".", "--out", "o", "--dataset", "imdb"], "unknown dataset 'imdb'"),
        (["train", "--features", "nowhere"], "not a features folder"),
        (["train", "--features", "nowhere", "--promote", "--alias", "staging"],
         "--promote moves 'champion'; it cannot go with --alias 'staging'"),
        (["rank"], "give exactly one of --log or --request"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args: list[str], message: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, args)
    assert r.exit_code == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0]


def test_train_fails_within_seconds_when_the_tracking_server_is_unreachable(small_features: Path) -> None:
    """Checked before any work (MLflow's own client retries for minutes), in one error line."""
    start = time.monotonic()
    r = runner.invoke(app, ["train", "--features", str(small_features), "--tracking-uri", "http://127.0.0.1:9"])
    elapsed = time.monotonic() - start
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: MLflow tracking server 'http://127.0.0.1:9' is unreachable")
    assert elapsed < 10, elapsed


def test_version_is_the_installed_package_version() -> None:
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"ranker (mmoe-ranker) {importlib.metadata.version('mmoe-ranker')}"


def _commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command and group under ``group``, with the words that reach it."""
    yield path, group
    for name, sub in sorted(getattr(group, "commands", {}).items()):
        yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(typer.main.get_command(app)))


def test_every_command_is_walked() -> None:
    leaves = {" ".join(path) for path, cmd in COMMANDS if not hasattr(cmd, "commands")}
    assert leaves == {"data synth", "features build", "train", "serve", "rank", "score", "pipeline run",
                      "pipeline schedule", "pipeline show", "demo"}


def _option_blocks(help_text: str) -> dict[str, str]:
    """``{"--out": "its help, joined over its wrapped lines"}`` from a rendered options table."""
    blocks: dict[str, str] = {}
    current = None
    for row in help_text.splitlines():
        inner = row.strip().strip("│")
        cells = inner.strip()
        if not row.lstrip().startswith("│"):
            current = None
        elif (m := re.match(r"\*?\s*(--[a-z0-9-]+)", cells)) and len(inner) - len(inner.lstrip()) <= 4:
            current = m[1]
            blocks[current] = cells
        elif current is not None:
            blocks[current] += " " + cells
    return blocks


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) or "ranker" for p, _ in COMMANDS])
def test_help_shows_every_default(path: tuple[str, ...], command: Any) -> None:
    """Each option is required or shows its default; an option whose default is None says what happens then.

    Plain on/off switches (--version, --debug, typer's completion options) are off unless given and show none.
    """
    r = runner.invoke(app, [*path, "--help"])
    assert r.exit_code == 0, r.output
    blocks = _option_blocks(r.output)
    for param in command.params:
        name = param.opts[0]
        if param.param_type_name != "option" or name == "--help":
            continue
        if param.is_flag and not param.secondary_opts:
            assert not param.default, name
            continue
        assert name in blocks, f"{name} not in the help of {path}"
        text = blocks[name]
        assert "[required]" in text if param.required else "[default: " in text, f"{path} {name}: {text}"
        if param.default is None and not param.required:
            assert isinstance(param.show_default, str), f"{path} {name}: say what happens without it"


def test_help_defaults_are_the_config_defaults() -> None:
    """The defaults shown for options that leave the value to a config (None) are that config's."""
    from features.synthetic import SynthConfig
    from pipelines.train_config import TrainConfig

    def shown(path: tuple[str, ...]) -> dict[str, str]:
        command = dict(COMMANDS)[path]
        return {p.name: p.show_default for p in command.params if isinstance(p.show_default, str)}

    synth, train = SynthConfig(), TrainConfig(features=Path("f"), out=Path("o"), tracking_uri="sqlite:///x")
    for name, text in shown(("data", "synth")).items():
        assert text == str(getattr(synth, name)), name
    values = shown(("train",))
    for name in ("model", "epochs", "batch_size", "lr", "seed", "accelerator", "devices", "strategy", "experiment",
                 "register_as"):
        assert values[name] == str(getattr(train, name)), name
    assert dataclasses.asdict(synth)  # a dataclass: every field the help names exists


def test_serve_defaults_are_the_servers_own() -> None:
    """`ranker serve` with no options configures the server as ServerOptions() and BatcherConfig() do."""
    from serving.batcher import BatcherConfig
    from serving.server import ServerOptions

    params = {p.name: p.default for p in dict(COMMANDS)[("serve",)].params}
    server, batcher = ServerOptions(), BatcherConfig()
    assert params["max_candidates"] == server.max_candidates
    assert params["max_message_mb"] * 1024 * 1024 == server.max_message_bytes
    assert params["reload_interval_s"] == server.reload_interval_s == 30.0
    assert params["max_batch_candidates"] == batcher.max_batch_candidates
    assert params["max_queue_delay_us"] == batcher.max_queue_delay_us
    assert params["max_queue"] == batcher.max_queue
    assert round(params["max_queue_wait_ms"] * 1000) == batcher.max_queue_wait_us
    assert params["batching"] is batcher.enabled


def test_the_command_line_reads_its_defaults_without_the_heavy_libraries() -> None:
    """The defaults come from the configs themselves, and importing them loads no torch, Polars or MLflow."""
    code = ("import sys, pipelines.cli; heavy = sorted({'torch', 'polars', 'mlflow', 'lightning'} & set(sys.modules)); "
            "print(heavy)")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "[]", got.stdout + got.stderr


def test_the_ui_reads_the_same_default_store_as_the_commands() -> None:
    from pipelines.tracking import DEFAULT_DIR
    from pipelines.ui import STORE_DIR

    assert STORE_DIR == DEFAULT_DIR


REPO = Path(__file__).resolve().parents[2]


def _block(text: str, after: str) -> list[str]:
    """The lines of the first ```bash block after the line ``after``."""
    rest = text[text.index(after):]
    start = rest.index("```bash\n") + len("```bash\n")
    return rest[start:rest.index("```", start)].splitlines()


def test_readme_install_recipe_is_the_makefiles() -> None:
    make = (REPO / "Makefile").read_text()
    stack = re.search(r"^TORCH_STACK := (.+)$", make, re.M)
    assert stack is not None
    wanted = [line.split(" install ", 1)[1].replace("-q ", "").replace("$(TORCH_STACK)", stack[1]).strip()
              for line in make.splitlines() if "$(PIP) install" in line]
    shown = [line.split("#")[0].split(" pip install ", 1)[1].strip()
             for line in _block((REPO / "README.md").read_text(), "## Install") if " pip install " in line]
    assert shown == wanted


def test_readme_states_the_pipelines_steps() -> None:
    from pipelines.pipeline import STEPS

    readme = (REPO / "README.md").read_text()
    words = {5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}
    stated = f"One run, for one as-of day, is {words[len(STEPS)]} steps"
    assert stated in readme
    listed = re.findall(r"^(\d+)\. \*\*(\w+)\*\*", readme[readme.index(stated):], re.M)
    assert [name for _, name in listed[:len(STEPS)]] == list(STEPS)
    assert [int(n) for n, _ in listed[:len(STEPS)]] == list(range(1, len(STEPS) + 1))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("epochs: two\n", "field 'epochs': Input should be a valid integer, unable to parse string as an integer "
                          "(got 'two')"),
        ("loss_weighting: average\n",
         "field 'loss_weighting': Input should be 'fixed' or 'uncertainty' (got 'average')"),
        ("model_config: {expert_dims: wide}\n",
         "field 'model_config.expert_dims': Input should be a valid tuple (got 'wide')"),
        ("epochz: 3\n", "field 'epochz': Extra inputs are not permitted (got 3)"),
        ("model_config: {gate: {kind: dense}}\n",
         "field 'model_config.gate.kind': Input should be 'softmax', 'noisy_topk', 'top_p', 'hash', 'expert_choice' "
         "or 'shared_topk' (got 'dense')"),
        ("model_config: {top_k: 1}\n", "field 'model_config.top_k': Extra inputs are not permitted (got 1)"),
    ],
)
def test_config_file_values_are_type_checked(body: str, message: str, small_features: Path, tmp_path: Path) -> None:
    """`ranker train --config` refuses a file with the pipeline config's one-line error, naming the field."""
    config = tmp_path / "train.yaml"
    config.write_text(body)
    r = runner.invoke(app, ["train", "--features", str(small_features), "--config", str(config),
                            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip() == f"error: invalid training config {str(config)!r}: {message}"


def test_set_values_are_coerced_to_the_field_type() -> None:
    from pipelines.train_config import merge_overrides, model_overrides, parse_overrides

    got = model_overrides(parse_overrides(["expert_dims=[64,32]", "dropout=0", "gate.kind=noisy_topk",
                                           "gate.top_k=1"]), "--set")
    assert got == {"expert_dims": (64, 32), "dropout": 0.0, "gate": {"kind": "noisy_topk", "top_k": 1}}
    assert isinstance(got["dropout"], float)
    with pytest.raises(ValueError, match=r"^invalid --set: field 'gate.kind': Input should be 'softmax', "
                                         r"'noisy_topk', .* or 'shared_topk' \(got 'dense'\)$"):
        model_overrides(parse_overrides(["gate.kind=dense"]), "--set")
    with pytest.raises(ValueError, match=r"^invalid --set: field 'gate_noise': Extra inputs are not permitted"):
        model_overrides(parse_overrides(["gate_noise=0.5"]), "--set")
    with pytest.raises(ValueError, match=r"--set expects key=value, got 'gate.=1'"):
        parse_overrides(["gate.=1"])
    # a file's gate and --set's gate.top_k merge field by field
    assert merge_overrides({"gate": {"kind": "noisy_topk", "top_k": 3}}, got)["gate"] == {"kind": "noisy_topk",
                                                                                           "top_k": 1}
