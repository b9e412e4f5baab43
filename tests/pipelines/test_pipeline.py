"""The nightly pipeline, for real: synthetic days in Parquet, Lightning training, a sqlite MLflow store and registry."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipelines.champion import check_gates
from pipelines.config import PromotionGates, bundled_config, load_pipeline_config
from pipelines.lock import PipelineBusy, RunLock
from pipelines.pipeline import Pipeline, run_pipeline
from pipelines.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING, SAVED_VIEW_TAG
from tests.pipelines.conftest import DAY7, DAY8, Nights, write_config

RANKER = str(Path(sys.executable).parent / "ranker")


def _versions(uri: str, name: str = "ranker") -> list[int]:
    return sorted(int(v.version) for v in MlflowClient(uri, uri).search_model_versions(f"name='{name}'"))


def test_two_nights_register_two_versions_and_the_report_says_why(nights: Nights) -> None:
    first, second = nights.first, nights.second
    assert (first.status, first.version, first.promoted) == ("done", "1", True)
    assert (second.status, second.version, second.promoted) == ("done", "2", False)
    assert _versions(nights.tracking_uri) == [1, 2]
    client = MlflowClient(nights.tracking_uri, nights.tracking_uri)
    # the failing challenger did not move the alias
    assert str(client.get_model_version_by_alias("ranker", "champion").version) == "1"
    assert "first model" in first.report.read_text()
    text = second.report.read_text()
    assert "**Not promoted**: version 2 is registered but version 1 stays champion" in text
    assert "primary on click auc" in text and "short by 0.5" in text  # the gate and by how much
    assert "| primary | click | auc |" in text and "**FAIL**" in text
    assert "train 2026-01-01..2026-01-06, validation 2026-01-07..2026-01-07, holdout 2026-01-08..2026-01-08" in text
    v2 = client.get_model_version("ranker", "2")
    assert v2.tags["gates"] == "failed" and v2.tags["promoted"] == "false"
    assert v2.tags["gates.failed"] == "primary:click"
    assert v2.tags["data.holdout_window"] == "2026-01-08..2026-01-08"
    assert v2.tags["champion_at_evaluation"] == "1"
    assert 0.0 < float(v2.tags["holdout.click.auc"]) < 1.0
    assert "gates failed" in v2.description and "2026-01-01..2026-01-06" in v2.description


def test_each_model_is_scored_on_the_same_holdout_with_its_own_transform(nights: Nights) -> None:
    client = MlflowClient(nights.tracking_uri, nights.tracking_uri)
    [ev] = [r for r in _children(client, nights.second.parent_run_id) if r.info.run_name == "evaluate"]
    chal, champ = ev.data.metrics["challenger/holdout/click/auc"], ev.data.metrics["champion/holdout/click/auc"]
    assert 0.5 < chal < 1.0 and 0.5 < champ < 1.0 and chal != champ
    gate = next(c for c in nights.second.checks if c.name == "primary")
    assert gate.champion == pytest.approx(champ) and gate.challenger == pytest.approx(chal)
    assert gate.threshold == pytest.approx(champ + 0.5) and gate.margin == pytest.approx(chal - champ - 0.5)


def _children(client: MlflowClient, parent: str | None):
    assert parent is not None
    run = client.get_run(parent)
    return client.search_runs([run.info.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'")


def test_mlflow_holds_a_parent_run_with_a_child_per_step_and_the_artifacts(nights: Nights) -> None:
    client = MlflowClient(nights.tracking_uri, nights.tracking_uri)
    parent = client.get_run(nights.second.parent_run_id or "")
    tags = parent.data.tags
    assert parent.info.status == "FINISHED" and tags["pipeline.status"] == "done"
    assert tags["pipeline.decision"] == "rejected" and tags["pipeline.version"] == "2"
    assert tags["pipeline.window.holdout"] == "2026-01-08..2026-01-08" and tags["pipeline.as_of"] == "2026-01-08"
    assert len(tags["pipeline.transform_hash"]) == 16 and tags["pipeline.config_hash"] == nights.strict.content_hash
    assert tags["pipeline.code_version"]
    assert parent.data.params["gates.primary_min_gain"] == "0.5"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"report.md", "config"}
    children = {r.info.run_name: r for r in _children(client, parent.info.run_id)}
    assert set(children) == {"ingest", "validate", "features", "train", "evaluate", "register"}
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert children["ingest"].data.metrics["partitions_new"] == 1  # day 8 only; days 1-7 came the night before
    listed = {name: {a.path for a in client.list_artifacts(r.info.run_id)} for name, r in children.items()}
    assert {"transform.json", "summary.json", "feature_stats.csv"} <= listed["features"]
    assert "quarantine_report.json" in listed["validate"]
    assert {"plots", "gates.json"} <= listed["evaluate"]
    plots = {a.path for a in client.list_artifacts(children["evaluate"].info.run_id, "plots")}
    assert plots == {f"plots/roc_calibration_{t}.png" for t in ("click", "like", "dismiss")}
    train = children["train"].info.run_id
    assert "gates" in listed["train"] and "model" in listed["train"]
    assert len(client.get_metric_history(train, "val/click/auc")) == 1  # one point per epoch (1 epoch)


def _contexts(run) -> dict[str, str]:
    """``{context: dataset name}`` of a run's dataset inputs."""
    return {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset.name
            for i in run.inputs.dataset_inputs}


def test_the_parent_run_carries_what_the_runs_list_shows(nights: Nights) -> None:
    """Each task's holdout gate metric (rounded), the decision, the version and the data, on the parent."""
    client = MlflowClient(nights.tracking_uri, nights.tracking_uri)
    parent = client.get_run(nights.second.parent_run_id or "")
    assert parent.info.run_name == "nightly as-of 2026-01-08"
    assert set(parent.data.metrics) == {"holdout/click/auc", "holdout/like/auc", "holdout/dismiss/auc",
                                        "holdout/watch_time/r2"}
    [ev] = [r for r in _children(client, parent.info.run_id) if r.info.run_name == "evaluate"]
    for key, value in parent.data.metrics.items():
        assert value == round(ev.data.metrics[f"challenger/{key}"], 4), key
    assert (parent.data.tags["pipeline.decision"], parent.data.tags["pipeline.version"]) == ("rejected", "2")
    assert _contexts(parent) == {"train": "synthetic-train", "val": "synthetic-val", "holdout": "synthetic-holdout"}
    assert _contexts(ev) == {"holdout": "synthetic-holdout"}
    [train] = [r for r in _children(client, parent.info.run_id) if r.info.run_name == "train"]
    assert _contexts(train) == {"train": "synthetic-train", "val": "synthetic-val"}

    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    view = json.loads(exp.tags[SAVED_VIEW_TAG + "pipeline-nightly"])
    assert view["name"] == "pipeline nightly: decisions"
    assert json.loads(view["state"])["selectedColumns"] == [
        "tags.`pipeline.decision`", "tags.`pipeline.version`", "metrics.`holdout/click/auc`",
        "metrics.`holdout/watch_time/r2`", "metrics.`holdout/like/auc`", "metrics.`holdout/dismiss/auc`"]
    assert nights.second.runs_url == (f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs"
                                      "?viewStateShareKey=pipeline-nightly&workflowType=machine_learning")


def test_a_day_already_done_is_a_noop_and_no_new_data_says_so(nights: Nights) -> None:
    before = _versions(nights.tracking_uri)
    again = run_pipeline(nights.lenient, as_of=DAY7)
    assert again.status == "noop" and "already done" in again.message and "--force" in again.message
    newest = run_pipeline(nights.strict)  # default as-of: the newest day, 2026-01-08, done last night
    assert newest.status == "noop" and newest.message.startswith("no new data")
    assert _versions(nights.tracking_uri) == before


def test_a_day_done_in_another_work_folder_runs_here(nights: Nights, tmp_path: Path) -> None:
    """Same store, same pipeline and day, a new work folder: "done" is not taken from the store alone."""
    store = tmp_path / "store.db"  # a copy of the nights' store: the other tests keep theirs as it was
    shutil.copy(str(nights.tracking_uri).removeprefix("sqlite:///"), store)
    uri = f"sqlite:///{store}"
    before = _versions(uri)
    moved = nights.lenient.model_copy(update={"workdir": tmp_path / "fresh", "tracking_uri": uri})
    result = run_pipeline(moved, as_of=DAY7)
    assert result.status != "noop", result.message
    assert (tmp_path / "fresh" / "runs" / DAY7.isoformat() / "state.json").is_file()
    assert len(_versions(uri)) == len(before) + 1
    again = run_pipeline(moved, as_of=DAY7)  # and now it is done there
    assert again.status == "noop" and "already done in" in again.message


def test_gates_pass_promotes_and_an_interrupted_promotion_resumes(tmp_path: Path, monkeypatch) -> None:
    cfg = load_pipeline_config(write_config(tmp_path, warm_start=True,
                                            gates={"primary_min_gain": -1.0, "max_drop": 1.0}))
    uri = str(cfg.tracking_uri)
    assert run_pipeline(cfg, as_of=DAY7).promoted

    def crash(self: Pipeline, parent: str) -> None:
        raise RuntimeError("power cut between register and promote")

    monkeypatch.setattr(Pipeline, "promote", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        run_pipeline(cfg, as_of=DAY8)
    client = MlflowClient(uri, uri)
    assert _versions(uri) == [1, 2]
    assert str(client.get_model_version_by_alias("ranker", "champion").version) == "1"  # nothing half-promoted
    failed = client.get_run(run_id := _state(cfg, DAY8)["parent_run_id"])
    assert failed.info.status == "FAILED" and failed.data.tags["pipeline.status"] == "failed"
    assert failed.data.tags["pipeline.error"] == "RuntimeError: power cut between register and promote"
    monkeypatch.undo()
    done = run_pipeline(cfg, as_of=DAY8)
    assert done.resumed_from == "promote" and done.promoted and done.version == "2"
    resumed = client.get_run(run_id)  # the same parent run, finished, without the earlier attempt's error
    assert done.parent_run_id == run_id and resumed.info.status == "FINISHED"
    assert "pipeline.error" not in resumed.data.tags and "error" not in _state(cfg, DAY8)
    assert _versions(uri) == [1, 2]  # resumed: the same version, not a new one
    assert str(client.get_model_version_by_alias("ranker", "champion").version) == "2"
    assert "passed all" in done.report.read_text() and "warm start: True" in done.report.read_text()


def _state(cfg, day: date) -> dict:
    return json.loads((cfg.workdir / "runs" / day.isoformat() / "state.json").read_text())


def test_a_failed_start_is_closed_and_force_closes_an_abandoned_run(tmp_path: Path, monkeypatch) -> None:
    import pipelines.pipeline as pipeline_module

    cfg = load_pipeline_config(write_config(tmp_path))
    client = MlflowClient(str(cfg.tracking_uri), str(cfg.tracking_uri))

    def refused(*args: object) -> dict:
        raise ConnectionError("the store refused the params")

    monkeypatch.setattr(pipeline_module, "_flatten", refused)  # right after the parent run is created
    with pytest.raises(ConnectionError):
        run_pipeline(cfg, as_of=DAY7)
    [started] = client.search_runs([client.get_experiment_by_name(cfg.experiment).experiment_id])
    assert started.info.status == "FAILED" and started.data.tags["pipeline.status"] == "failed"
    assert started.data.tags["pipeline.error"] == "ConnectionError: the store refused the params"
    monkeypatch.undo()

    def power_cut(self: Pipeline, parent: str, windows: object) -> None:
        with self.child(parent, "validate"):
            raise RuntimeError("power cut")

    # as after kill -9 in the validate step: nothing got to close the parent or the step's run
    monkeypatch.setattr(Pipeline, "validate", power_cut)
    monkeypatch.setattr(pipeline_module, "close_failed", lambda *args, **kwargs: None)
    with pytest.raises(RuntimeError):
        run_pipeline(cfg, as_of=DAY7)
    abandoned = _state(cfg, DAY7)["parent_run_id"]
    assert client.get_run(abandoned).info.status == "RUNNING"
    monkeypatch.undo()
    monkeypatch.setattr(Pipeline, "validate", power_cut)
    with pytest.raises(RuntimeError):
        run_pipeline(cfg, as_of=DAY7, force=True)  # a fresh start: the abandoned attempt is closed
    closed = {r.info.run_name: r for r in [client.get_run(abandoned), *_children(client, abandoned)]}
    assert {name: r.info.status for name, r in closed.items()} == {
        "nightly as-of 2026-01-07": "KILLED", "ingest": "FINISHED", "validate": "KILLED"}
    assert closed["validate"].data.tags["pipeline.status"] == "abandoned"
    assert client.get_run(_state(cfg, DAY7)["parent_run_id"]).info.status == "FAILED"


def test_the_terminal_shows_steps_and_epochs_not_framework_banners(tmp_path: Path) -> None:
    """Two nights through the real CLI on a fresh store: the second one downloads the champion."""
    config = write_config(tmp_path)
    lines: list[str] = []
    for day in ("2026-01-07", "2026-01-08"):
        r = subprocess.run([RANKER, "pipeline", "run", "--config", str(config), "--as-of", day],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        night = r.stderr.splitlines()
        messages = [ln.split(" ", 2)[-1] for ln in night]  # without the timestamp
        assert len(messages) == len(set(messages)), f"a line printed twice:\n{r.stderr}"
        lines += night
    text = "\n".join(lines)
    for noise in ("GPU available", "TPU available", "💡", "litlogger", "Creating initial MLflow database tables",
                  "Updating database tables", "LeafSpec", "is_fx_tracing", "transfer_batch_to_device",
                  "logging interval", "Downloading artifacts", "Successfully loaded", "max_epochs=1` reached"):
        assert noise not in text, noise
    assert not [ln for ln in lines if "Warning" in ln or "warn(" in ln], text
    assert sum("step 4/8: train" in ln for ln in lines) == 2
    assert sum(bool(re.search(r"pipelines.train: epoch 1/1: \d+ steps, [\d,]+ rows in .* rows/s", ln))
               for ln in lines) == 2
    assert sum("ranking.train: training mmoe on" in ln for ln in lines) == 2  # in place of the device banner
    assert any("champion: ranker version 1, fetched to" in ln for ln in lines)
    assert sum("MLflow runs list: http://" in ln for ln in lines) == 2


def test_kill_9_during_training_then_the_same_command_resumes(tmp_path: Path) -> None:
    config = write_config(tmp_path, train={"epochs": 4, "batch_size": 128},
                          source={"synthesize": {"days": 8, "users": 300, "items": 2000, "requests_per_day": 300,
                                                 "slate_size": 10, "seed": 5}})
    cmd = [RANKER, "pipeline", "run", "--config", str(config), "--as-of", "2026-01-07"]
    run_dir = tmp_path / "work" / "runs" / "2026-01-07"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "train" / "checkpoints" / "last.ckpt").is_file():
            assert proc.poll() is None, "the pipeline ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    train_run = (run_dir / "train" / "mlflow_run_id").read_text().strip()
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert _versions(uri) == []  # killed before registering
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming nightly/2026-01-07 at step train" in again.stderr
    assert "stale lock of dead pid" in again.stderr
    assert _versions(uri) == [1]  # one new version, not two
    client = MlflowClient(uri, uri)
    assert client.get_model_version("ranker", "1").run_id == train_run  # the killed run, continued
    epochs = {m.step for m in client.get_metric_history(train_run, "val/click/auc")}
    assert len(client.get_metric_history(train_run, "val/click/auc")) >= 4 and len(epochs) >= 1


def test_unreachable_tracking_server_fails_before_any_work(tmp_path: Path) -> None:
    config = write_config(tmp_path, tracking_uri="http://127.0.0.1:9")
    r = subprocess.run([RANKER, "pipeline", "run", "--config", str(config)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: MLflow tracking server 'http://127.0.0.1:9' is unreachable")
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "work").exists() and not (tmp_path / "landing").exists()


def test_a_second_run_of_the_same_pipeline_is_refused(tmp_path: Path) -> None:
    cfg = load_pipeline_config(write_config(tmp_path))
    with RunLock(cfg.workdir / "pipeline.lock"), pytest.raises(PipelineBusy, match=f"held by pid {os.getpid()}"):
        run_pipeline(cfg, as_of=DAY7)


def test_a_dead_holders_lock_is_detected_as_stale(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = RunLock(tmp_path / "x.lock")
    lock.owner_file.write_text(f'{{"pid": {dead.pid}, "host": "{os.uname().nodename}", "started": "then"}}')
    with lock:
        assert lock.stale_owner is not None and lock.stale_owner["pid"] == dead.pid


def test_gates() -> None:
    types = {"click": "binary", "watch": "regression"}
    g = PromotionGates(primary="click", primary_min_gain=0.001, max_drop=0.01)
    assert [c.name for c in check_gates({}, None, types, g)] == ["no_champion"]
    champ = {"holdout/click/auc": 0.70, "holdout/watch/r2": 0.20}
    ok = check_gates({"holdout/click/auc": 0.7011, "holdout/watch/r2": 0.191}, champ, types, g)
    assert all(c.passed for c in ok) and [c.metric for c in ok] == ["auc", "auc", "r2"]
    small_gain = check_gates({"holdout/click/auc": 0.7005, "holdout/watch/r2": 0.2}, champ, types, g)
    assert [c.passed for c in small_gain] == [False, True, True]
    nan = check_gates({"holdout/click/auc": math.nan, "holdout/watch/r2": 0.3}, champ, types, g)
    assert not nan[0].passed and not nan[1].passed
    with pytest.raises(ValueError, match="gates.primary 'ctr' is not a task"):
        check_gates({}, champ, types, PromotionGates(primary="ctr"))


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"field 'gate': Extra inputs are not permitted"):
        load_pipeline_config(write_config(tmp_path, gate={}))
    with pytest.raises(ValueError, match=r"field 'gates.min_gain': Extra inputs are not permitted \(got 1\)"):
        load_pipeline_config(write_config(tmp_path, gates={"min_gain": 1}))
    with pytest.raises(ValueError, match=r"field 'windows.holdout_days': .*greater than or equal to 1 \(got 0\)"):
        load_pipeline_config(write_config(tmp_path, windows={"holdout_days": 0}))
    with pytest.raises(ValueError, match=r"field 'gates.binary_metric': Input should be 'auc', 'gauc' or 'r2'"):
        load_pipeline_config(write_config(tmp_path, gates={"binary_metric": "ndcg"}))
    with pytest.raises(ValueError, match=r"field 'name': String should match pattern"):
        load_pipeline_config(write_config(tmp_path, name="no spaces"))
    with pytest.raises(ValueError, match=r"field 'source': Field required$"):
        load_pipeline_config(write_config(tmp_path, source=None))
    with pytest.raises(ValueError, match=r"^invalid pipeline config '.*': field 'train.epoch': Extra inputs are not "
                                         r"permitted \(got 3\)$"):
        load_pipeline_config(write_config(tmp_path, train={"epoch": 3}))
    with pytest.raises(ValueError, match=r"field 'train.model_config.gate.top_k': Input should be a valid integer"):
        load_pipeline_config(write_config(tmp_path, train={"model_config": {"gate": {"top_k": "two"}}}))
    with pytest.raises(ValueError, match=r"field 'train.alias': Extra inputs"):  # the pipeline moves its alias
        load_pipeline_config(write_config(tmp_path, train={"alias": "x"}))
    typed = load_pipeline_config(write_config(tmp_path, train={"epochs": "3", "model_config": {"expert_dims": [8]}}))
    assert (typed.train["epochs"], typed.train["model_config"]) == (3, {"expert_dims": (8,)})
    with pytest.raises(ValueError, match=r"--as-of 2027-01-01 has no data .*newest day: 2026-01-08"):
        run_pipeline(load_pipeline_config(write_config(tmp_path)), as_of=date(2027, 1, 1))


def test_bundled_configs_load_and_expand_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RANKER_PIPELINE_ROOT", str(tmp_path / "p"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    syn = load_pipeline_config(bundled_config("synthetic"))
    assert syn.workdir == tmp_path / "p" / "synthetic" and syn.tracking_uri == "sqlite:///x.db"
    kr = load_pipeline_config(bundled_config("kuairand"))
    assert kr.source.dataset == "kuairand" and kr.gates.primary == "is_click" and kr.warm_start
    assert kr.train["model_config"]["num_experts"] == 8


def test_ddp_training_inside_the_pipeline(tmp_path: Path) -> None:
    """`train: {devices: 2, strategy: ddp}` goes to Lightning; its second process joins only the train step."""
    config = write_config(tmp_path, train={"devices": 2, "strategy": "ddp", "accelerator": "cpu"})
    r = subprocess.run([RANKER, "pipeline", "run", "--config", str(config), "--as-of", "2026-01-07"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in r.stderr  # a second training process ran
    assert "of synthetic: 1 epoch(s), batch 256, cpu x2, 32-true" in r.stderr
    assert re.search(r"epoch 1/1: 20 steps, 10,000 rows in", r.stderr)  # each rank 20 steps; rows of both
    assert "sync_dist" not in r.stderr  # a known warning, filtered (pipelines.quiet says why)
    assert r.stderr.count("pipelines.pipeline: ingest:") == 1  # rank 0 alone ran the other steps
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert _versions(uri) == [1]
    client = MlflowClient(uri, uri)
    parent = client.get_run(client.get_model_version("ranker", "1").tags["pipeline.parent_run_id"])
    assert parent.data.params["train.devices"] == "2" and parent.data.params["train.strategy"] == "ddp"
