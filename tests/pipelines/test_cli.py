"""The ranker CLI: --help everywhere, and bad input gives one readable line with a non-zero exit."""

import re
import time
from pathlib import Path

import pytest
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
