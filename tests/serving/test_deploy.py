"""The container build file and the Kubernetes manifests under ``deploy/`` agree with the server.

What a cluster would only find out at rollout time is checked here: every file parses, the
manifests reference each other by the right names and labels, the ports, the health service name
and the metrics port are ``serving.defaults``'s, the container arguments are options the real
``ranker serve`` command accepts, the stop sequence fits in the grace period, and the image pins
the stack the Makefile installs.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from pipelines.cli import app
from serving import defaults
from serving.server import SERVICE_NAME
from serving.workers import PoolOptions

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def manifests() -> dict[str, dict[str, Any]]:
    """kind -> the one object of that kind in ``deploy/k8s`` (each file holds one)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert len(docs) == 1, f"{path.name}: expected one object, found {len(docs)}"
        kind = docs[0]["kind"]
        assert kind not in out, f"two {kind} objects"
        out[kind] = docs[0]
    return out


@pytest.fixture(scope="module")
def objs() -> dict[str, dict[str, Any]]:
    return manifests()


@pytest.fixture(scope="module")
def pod(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return objs["Deployment"]["spec"]["template"]


@pytest.fixture(scope="module")
def container(pod: dict[str, Any]) -> dict[str, Any]:
    (c,) = pod["spec"]["containers"]
    return c


def serve_options(args: list[str]) -> dict[str, Any]:
    """``args`` parsed by the real ``ranker serve`` command (types converted, defaults filled); an
    unknown option or a bad value fails here as it would in the pod."""
    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    ctx = serve.make_context("serve", list(args))
    return dict(ctx.params)


def test_every_manifest_parses_and_the_kustomization_lists_them_all(objs: dict[str, dict[str, Any]]) -> None:
    assert set(objs) == {"Kustomization", "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
                         "PodDisruptionBudget"}
    listed = objs["Kustomization"]["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_the_container_serves_on_the_servers_default_ports(container: dict[str, Any]) -> None:
    opts = serve_options(container["args"])
    assert opts["port"] == defaults.PORT
    assert opts["metrics_port"] == defaults.METRICS_PORT
    assert opts["host"] == "0.0.0.0"  # a pod must listen beyond loopback
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": defaults.PORT, "metrics": defaults.METRICS_PORT}


def test_probes_ask_the_health_service_on_the_grpc_port(container: dict[str, Any]) -> None:
    assert defaults.HEALTH_SERVICE == SERVICE_NAME  # the API's own name, what the server reports
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["port"] == defaults.PORT, probe
        assert grpc_probe["service"] in ("", defaults.HEALTH_SERVICE), probe  # the names the server sets
    assert container["readinessProbe"]["grpc"]["service"] == defaults.HEALTH_SERVICE


def test_the_stop_sequence_fits_in_the_grace_period(pod: dict[str, Any], container: dict[str, Any]) -> None:
    """preStop sleep, then SIGTERM: NOT_SERVING, ``--drain-s``, ``--grace-s`` for calls in flight, the kill margin."""
    opts = serve_options(container["args"])
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = float(command[1])
    assert pre_stop_s > 0
    needed = pre_stop_s + opts["drain_s"] + opts["grace_s"] + PoolOptions().kill_after_s
    assert pod["spec"]["terminationGracePeriodSeconds"] >= needed + 1, needed
    # the connection-age grace is the shutdown grace; a connection lives longer than a drain
    assert opts["max_connection_age_s"] > pre_stop_s + opts["grace_s"]


def test_one_worker_per_core_of_the_cpu_limit(container: dict[str, Any]) -> None:
    opts = serve_options(container["args"])
    limit = container["resources"]["limits"]["cpu"]
    assert opts["workers"] == int(limit) == int(container["resources"]["requests"]["cpu"])
    assert opts["torch_threads"] == 1


def test_the_headless_service_selects_the_pods_and_names_their_ports(
    objs: dict[str, dict[str, Any]], pod: dict[str, Any], container: dict[str, Any]
) -> None:
    svc = objs["Service"]["spec"]
    assert svc["clusterIP"] == "None"  # DNS returns every pod: the client balances (round robin)
    assert svc["selector"].items() <= pod["metadata"]["labels"].items()
    names = {p["name"]: p["containerPort"] for p in container["ports"]}
    for port in svc["ports"]:
        assert port["targetPort"] in names
        assert port["port"] == names[port["targetPort"]]
    deployment = objs["Deployment"]["spec"]
    assert deployment["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_autoscaler_and_disruption_budget_keep_a_replica(objs: dict[str, dict[str, Any]],
                                                         pod: dict[str, Any]) -> None:
    hpa, deployment = objs["HorizontalPodAutoscaler"]["spec"], objs["Deployment"]
    assert hpa["scaleTargetRef"]["kind"] == "Deployment"
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    pdb = objs["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pdb["maxUnavailable"] < hpa["minReplicas"]
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and deployment["spec"]["minReadySeconds"] > 0


def test_the_pod_reads_the_tracking_uri_from_the_configmap(objs: dict[str, dict[str, Any]],
                                                           container: dict[str, Any]) -> None:
    (env,) = [e for e in container["env"] if e["name"] == "MLFLOW_TRACKING_URI"]
    ref = env["valueFrom"]["configMapKeyRef"]
    assert ref["name"] == objs["ConfigMap"]["metadata"]["name"]
    assert ref["key"] in objs["ConfigMap"]["data"]


def test_metrics_annotations_point_at_the_metrics_port(pod: dict[str, Any]) -> None:
    notes = pod["metadata"]["annotations"]
    assert int(notes["prometheus.io/port"]) == defaults.METRICS_PORT


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def makefile_pins() -> dict[str, str]:
    """package -> version the Makefile's setup installs (torch, fbgemm-gpu-cpu, torchrec)."""
    text = (ROOT / "Makefile").read_text()
    return dict(re.findall(r"\b(torch|fbgemm-gpu-cpu|torchrec)==([\w.]+)", text))


def test_the_image_pins_the_stack_the_makefile_installs() -> None:
    steps = dockerfile()
    runs = " ".join(args for word, args in steps if word == "RUN")
    image_pins = dict(re.findall(r"\b(torch|fbgemm-gpu-cpu|torchrec)==([\w.]+)", runs))
    assert image_pins == makefile_pins() and set(image_pins) == {"torch", "fbgemm-gpu-cpu", "torchrec"}
    assert "download.pytorch.org/whl/cpu" in runs  # the CPU build, never the multi-GB CUDA one
    assert "--no-deps torchrec" in runs  # torchrec's metadata would pull the CUDA fbgemm-gpu
    assert "-c requirements/cpu.txt" in runs  # the locked versions
    copied = [args.split()[0] for word, args in steps if word == "COPY"]
    for package in ("features", "ranking", "serving", "pipelines", "protos"):
        assert package in copied


def test_the_image_runs_ranker_serve_as_a_non_root_user(pod: dict[str, Any]) -> None:
    steps = dockerfile()
    (user,) = [args for word, args in steps if word == "USER"]
    assert user.isdigit() and int(user) != 0
    assert pod["spec"]["securityContext"]["runAsUser"] == int(user)
    assert next(i for i, (w, _) in enumerate(steps) if w == "USER") > max(
        i for i, (w, _) in enumerate(steps) if w == "RUN")  # nothing runs as root after it
    (entry,) = [yaml.safe_load(args) for word, args in steps if word == "ENTRYPOINT"]
    assert entry == ["ranker", "serve"]
    (cmd,) = [yaml.safe_load(args) for word, args in steps if word == "CMD"]
    opts = serve_options(cmd)
    assert (opts["port"], opts["metrics_port"], opts["host"]) == (defaults.PORT, defaults.METRICS_PORT, "0.0.0.0")
    exposed = {int(p) for word, args in steps if word == "EXPOSE" for p in shlex.split(args)}
    assert exposed == {defaults.PORT, defaults.METRICS_PORT}


def test_the_dockerignore_keeps_what_the_image_copies() -> None:
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = {src.rstrip("/") for word, args in dockerfile() if word == "COPY" for src in args.split()[:-1]}
    assert copied and copied <= kept, copied - kept


def test_a_bad_container_argument_fails_the_parse() -> None:
    """The check above can fail: an option ``ranker serve`` does not have is refused."""
    with pytest.raises(Exception, match="no-such-option"):
        serve_options(["--no-such-option", "1"])
