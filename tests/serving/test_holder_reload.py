"""ModelHolder hot reload: poll() follows the alias, rejects broken versions, run_polling() drives it.

One real MLflow sqlite registry per module (creating it is the slow part); each test registers
versions under a registered-model name of its own, so tests do not see each other's aliases.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

import serving.holder as holder_module
from pipelines.tracking import ensure_experiment, register_artifact
from ranking.inference import InferenceModel
from serving.holder import LoadedModel, ModelHolder, ReloadEvent

ALIAS = "champion"


def _perturbed_copy(src: Path, dst: Path, version: str, seed: int = 1) -> Path:
    """A copy of the artifact ``src`` with different weights (so it scores differently) and version."""
    art = shutil.copytree(src, dst)
    state = torch.load(art / "weights.pt", map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(seed)
    state = {k: v + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, art / "weights.pt")
    meta = json.loads((art / "metadata.json").read_text())
    meta["model_version"] = version
    meta["weights_sha256"] = hashlib.sha256((art / "weights.pt").read_bytes()).hexdigest()
    (art / "metadata.json").write_text(json.dumps(meta))  # last, as export_artifact writes it
    return art


@dataclass(frozen=True)
class Registry:
    """A sqlite MLflow store with one run holding a good, a different good and two broken artifacts."""

    uri: str
    run_id: str
    client: MlflowClient
    good: Path  # the local folders that were logged (for reference scores)
    other: Path

    def register(self, name: str, artifact: str, alias: str | None = ALIAS) -> str:
        """Register the run's ``artifact`` folder as a new version of ``name``; move ``alias`` to it."""
        return str(register_artifact(self.uri, self.run_id, artifact, name, alias).version)

    def move(self, name: str, version: str) -> None:
        self.client.set_registered_model_alias(name, ALIAS, version)


@pytest.fixture(scope="module")
def registry(workspace: Any, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("reload")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = client.create_run(ensure_experiment(uri, "reload-test")).info.run_id
    other = _perturbed_copy(workspace.artifact, root / "other", version="2")
    corrupt = shutil.copytree(workspace.artifact, root / "corrupt")
    (corrupt / "weights.pt").write_bytes(b"not a torch file")
    no_config = shutil.copytree(workspace.artifact, root / "no_config")
    (no_config / "model_config.json").unlink()
    logged = {"good": workspace.artifact, "other": other, "corrupt": corrupt, "no_config": no_config}
    for name, folder in logged.items():
        client.log_artifacts(run_id, str(folder), artifact_path=name)
    client.set_terminated(run_id)
    return Registry(uri=uri, run_id=run_id, client=client, good=workspace.artifact, other=other)


@pytest.fixture
def events() -> list[ReloadEvent]:
    return []


@pytest.fixture
def champion(registry: Registry, events: list[ReloadEvent], request: pytest.FixtureRequest) -> Iterator[ModelHolder]:
    """A holder of ``models:/<test name>@champion`` with version 1 (the good artifact) loaded."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)
    assert registry.register(name, "good") == "1"
    holder = ModelHolder(f"models:/{name}@{ALIAS}", tracking_uri=registry.uri)
    holder.listeners.append(events.append)
    assert holder.load().version == "1"
    yield holder
    holder.close()


def _name(holder: ModelHolder) -> str:
    return holder.uri.removeprefix("models:/").split("@")[0]


def _scores(model: InferenceModel, raw_request: Any) -> dict[str, np.ndarray]:
    return model.score_request(raw_request.user, raw_request.context, raw_request.all_candidates())


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for t in a:
        np.testing.assert_allclose(a[t], b[t], rtol=1e-6, err_msg=t)


# ------------------------------------------------------------------------------------- poll()
def test_poll_swaps_to_the_version_the_alias_moved_to(
    champion: ModelHolder, registry: Registry, events: list[ReloadEvent], raw_request: Any
) -> None:
    before = champion.current
    assert before is not None
    assert champion.poll() is None and champion.current is before  # alias unchanged: nothing to do

    assert registry.register(_name(champion), "other") == "2"
    after = champion.poll()
    assert after is not None and champion.current is after
    assert (after.name, after.version, before.version) == (_name(champion), "2", "1")
    assert (champion.loads_ok, champion.loads_failed, champion.last_error) == (2, 0, None)
    assert [(e.kind, e.version, e.model) for e in events] == [("loaded", "1", before), ("loaded", "2", after)]

    # the snapshot taken before the swap still scores, with v1's weights (its download is gone:
    # it lives in memory), and v2 really is a different model
    assert not before.model.path.exists()
    ref_v1 = _scores(InferenceModel(registry.good), raw_request)
    ref_v2 = _scores(InferenceModel(registry.other), raw_request)
    assert any(not np.allclose(ref_v1[t], ref_v2[t]) for t in ref_v1)
    _assert_same(_scores(before.model, raw_request), ref_v1)
    _assert_same(_scores(after.model, raw_request), ref_v2)


@pytest.mark.parametrize("broken", ["corrupt", "no_config", "warm_up_raises"])
def test_broken_version_is_rejected_once_and_a_good_one_recovers(
    champion: ModelHolder,
    registry: Registry,
    events: list[ReloadEvent],
    broken: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = champion.current
    if broken == "warm_up_raises":

        def boom(model: InferenceModel, n: int = 2) -> None:
            raise RuntimeError("warm-up exploded")

        monkeypatch.setattr(holder_module, "warm_up", boom)
        assert registry.register(_name(champion), "other") == "2"
    else:
        assert registry.register(_name(champion), broken) == "2"

    caplog.set_level(logging.ERROR, logger="serving")
    assert champion.poll() is None
    assert champion.current is before  # the old model keeps serving
    assert champion.rejected_version == "2"
    assert champion.last_error is not None and champion.last_error.startswith("version 2: ")
    assert (champion.loads_ok, champion.loads_failed) == (1, 1)
    errors = [r for r in caplog.records if r.name == "serving" and r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "version=2" in errors[0].getMessage()
    assert (events[-1].kind, events[-1].version, events[-1].model) == ("failed", "2", None)
    assert events[-1].error == champion.last_error.removeprefix("version 2: ")

    n_events = len(events)
    assert champion.poll() is None  # the same broken version is not tried again
    assert (champion.loads_failed, len(events), champion.rejected_version) == (1, n_events, "2")
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1

    monkeypatch.undo()
    assert registry.register(_name(champion), "other") == "3"
    recovered = champion.poll()
    assert recovered is not None and champion.current is recovered and recovered.version == "3"
    assert (champion.rejected_version, champion.last_error, champion.loads_ok) == (None, None, 2)


def test_moving_the_alias_back_lifts_the_rejection(
    champion: ModelHolder, registry: Registry, events: list[ReloadEvent]
) -> None:
    before = champion.current
    assert registry.register(_name(champion), "corrupt") == "2"
    assert champion.poll() is None and champion.rejected_version == "2"

    registry.move(_name(champion), "1")  # roll back
    assert champion.poll() is None and champion.current is before
    assert (champion.rejected_version, champion.last_error) == (None, None)
    assert (events[-1].kind, events[-1].version, events[-1].model) == ("cleared", "1", before)
    n_events = len(events)
    assert champion.poll() is None and len(events) == n_events  # "cleared" is said once

    registry.move(_name(champion), "2")  # the alias moved again: the version gets a new chance
    assert champion.poll() is None
    assert (champion.loads_failed, champion.rejected_version) == (2, "2")


def test_unresolvable_alias_keeps_serving_and_recovers(champion: ModelHolder, registry: Registry) -> None:
    before = champion.current
    registry.client.delete_registered_model_alias(_name(champion), ALIAS)
    assert champion.poll() is None and champion.current is before
    assert champion.last_error is not None and "cannot resolve" in champion.last_error
    assert (champion.loads_failed, champion.rejected_version) == (0, None)  # no version was tried

    registry.move(_name(champion), "1")
    assert champion.poll() is None and champion.current is before and champion.last_error is None


def test_fixed_version_uri_never_reloads_and_latest_follows_new_versions(registry: Registry) -> None:
    registry.register("fixed", "good", alias=None)
    pinned = ModelHolder("models:/fixed/1", tracking_uri=registry.uri)
    latest = ModelHolder("models:/fixed/latest", tracking_uri=registry.uri)
    try:
        assert pinned.load().version == latest.load().version == "1"
        assert registry.register("fixed", "other", alias=None) == "2"
        assert pinned.poll() is None and pinned.current is not None and pinned.current.version == "1"
        polled = latest.poll()
        assert polled is not None and polled.version == "2"
    finally:
        pinned.close()
        latest.close()


def test_local_folder_reloads_when_its_metadata_version_changes(
    workspace: Any, tmp_path: Path, events: list[ReloadEvent]
) -> None:
    art = shutil.copytree(workspace.artifact, tmp_path / "ranker")
    holder = ModelHolder(str(art))

    def buggy(event: ReloadEvent) -> None:
        raise RuntimeError("listener bug")

    holder.listeners.append(buggy)
    holder.listeners.append(events.append)
    first = holder.load()
    assert first.version == "1" and holder.poll() is None

    # new weights under the same version are not picked up (the version is the trigger) ...
    shutil.copy(_perturbed_copy(workspace.artifact, tmp_path / "v2", version="2") / "weights.pt", art)
    assert holder.poll() is None and holder.current is first
    # ... a bumped version is, even though a listener raises
    shutil.copy(tmp_path / "v2" / "metadata.json", art)
    second = holder.poll()
    assert second is not None and holder.current is second and second.version == "2"
    assert [e.kind for e in events] == ["loaded", "loaded"]
    assert art.exists()  # a local source is never deleted

    (art / "weights.pt").write_bytes(b"garbage")
    meta = json.loads((art / "metadata.json").read_text())
    (art / "metadata.json").write_text(json.dumps({**meta, "model_version": "3"}))
    assert holder.poll() is None and holder.current is second and holder.rejected_version == "3"


def test_poll_loads_when_the_uri_itself_was_changed(workspace: Any, tmp_path: Path) -> None:
    holder = ModelHolder(str(shutil.copytree(workspace.artifact, tmp_path / "a")))
    first = holder.load()
    holder.uri = str(shutil.copytree(workspace.artifact, tmp_path / "b"))  # same metadata version "1"
    second = holder.poll()
    assert second is not None and holder.current is second and second is not first
    assert (second.uri, second.version) == (holder.uri, "1")
    assert holder.poll() is None


# ------------------------------------------------------------------------------ run_polling()
async def _wait_until(condition: Any, timeout_s: float) -> float:
    """Seconds until ``condition()`` held; fails the test after ``timeout_s``."""
    start = time.perf_counter()
    while not condition():
        if time.perf_counter() - start > timeout_s:
            pytest.fail(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.01)
    return time.perf_counter() - start


def test_run_polling_swaps_in_a_worker_thread_and_stops_on_the_event(
    champion: ModelHolder, registry: Registry, events: list[ReloadEvent]
) -> None:
    threads: list[int] = []
    champion.listeners.append(lambda e: threads.append(threading.get_ident()))

    async def scenario() -> tuple[float, LoadedModel | None, int]:
        loop_thread = threading.get_ident()
        stop = asyncio.Event()
        task = asyncio.create_task(champion.run_polling(0.05, stop))
        await asyncio.sleep(0.12)  # a couple of polls with nothing to do
        assert not task.done() and champion.loads_ok == 1
        registry.register(_name(champion), "other")
        took = await _wait_until(lambda: champion.current is not None and champion.current.version == "2", 10.0)
        stop.set()
        await asyncio.wait_for(task, timeout=1.0)  # promptly: between polls
        return took, champion.current, loop_thread

    took, current, loop_thread = asyncio.run(scenario())
    assert current is not None and current.version == "2"
    assert took < 5.0
    assert threads and all(t != loop_thread for t in threads)  # the load ran off the event loop


def test_run_polling_survives_a_raising_poll(workspace: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    holder = ModelHolder(str(workspace.artifact))
    calls: list[float] = []

    def flaky() -> None:
        calls.append(time.perf_counter())
        if len(calls) <= 2:
            raise RuntimeError("registry hiccup")

    monkeypatch.setattr(holder, "poll", flaky)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(holder.run_polling(0.01, stop))
        await _wait_until(lambda: len(calls) >= 4, 5.0)
        assert not task.done()
        stop.set()
        await asyncio.wait_for(task, timeout=1.0)

    asyncio.run(scenario())
    assert len(calls) >= 4


def test_run_polling_stops_promptly_during_a_long_interval(workspace: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    holder = ModelHolder(str(workspace.artifact))
    calls: list[int] = []
    monkeypatch.setattr(holder, "poll", lambda: calls.append(1))

    async def scenario() -> float:
        stop = asyncio.Event()
        task = asyncio.create_task(holder.run_polling(60.0, stop))
        await asyncio.sleep(0.05)
        start = time.perf_counter()
        stop.set()
        await asyncio.wait_for(task, timeout=2.0)
        return time.perf_counter() - start

    assert asyncio.run(scenario()) < 0.5
    assert calls == []


@pytest.mark.parametrize("interval", [0, 0.0, None])
def test_run_polling_off(workspace: Any, monkeypatch: pytest.MonkeyPatch, interval: float | None) -> None:
    holder = ModelHolder(str(workspace.artifact))
    monkeypatch.setattr(holder, "poll", lambda: pytest.fail("polled while polling is off"))
    asyncio.run(asyncio.wait_for(holder.run_polling(interval, asyncio.Event()), timeout=1.0))


@pytest.mark.parametrize("interval", [-1.0, math.nan, math.inf])
def test_run_polling_rejects_a_bad_interval(workspace: Any, interval: float) -> None:
    holder = ModelHolder(str(workspace.artifact))
    with pytest.raises(ValueError, match="interval_s must be"):
        asyncio.run(holder.run_polling(interval, asyncio.Event()))
