"""``ranker train --num-nodes 2`` for real: two "nodes" on loopback, each its own process group and ``--out``.

Each node is started as a team would start it on its own machine: Lightning's launcher (``MASTER_ADDR``,
``MASTER_PORT``, ``NODE_RANK``) or torchrun (``--nnodes 2 --node-rank R``), gloo on CPU. Node 1 gets
an empty ``--out`` folder of its own and a tracking URI that cannot be reached, as a machine with its
own local disk would: whatever it needed of rank 0's files or of the store would fail the run.

A two-node run and a one-node run of the same world size (2 x 1 device vs 1 x 2 devices, same seed)
give the same global ranks the same rows and sum the same two gradients, so their metrics agree to
the last bit here (0.0 difference on every metric, DDP and sharded); ``EXACT`` leaves room for
summation order only. A single process with the same global batch (512 rows = 2 x 256) differs by the
per-rank training randomness and float order: val/loss by 4e-5, AUCs by up to 0.0035 (``LOOSE``),
where a single process with the per-rank batch (256) is 0.19 off in val/loss.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import torch
from mlflow import MlflowClient

BIN = Path(sys.executable).parent
RANKER, TORCHRUN = str(BIN / "ranker"), str(BIN / "torchrun")
TINY = ("--accelerator", "cpu", "--batch-size", "256", "--set", "bottom_dims=[16]", "--set", "expert_dims=[8]")
SHARDED = "strategy: torchrec\nsharding_type: table_wise\nembedding_lr: 0.1\n"
UNREACHABLE = "http://127.0.0.1:9"  # node 1's tracking URI: only rank 0 may open the store
EXACT = {"rel": 1e-6, "abs": 1e-9}  # observed: bit-identical
LOOSE = {"val/loss": 0.005, "auc": 0.01}  # observed: 4e-5 and 0.0035
TIMEOUT_S = 240


@dataclass(frozen=True)
class Run:
    """What one training run (one node or several) left: per-node output, exit codes and ``--out`` folders."""

    stdout: list[str]
    stderr: list[str]
    returncodes: list[int]
    outs: list[Path]
    store: str

    def check(self) -> None:
        for node, (rc, err) in enumerate(zip(self.returncodes, self.stderr, strict=True)):
            assert rc == 0, f"node {node} exited {rc}:\n{err[-3000:]}"

    @property
    def metrics(self) -> dict[str, float]:
        return dict(json.loads((self.outs[0] / "metrics.json").read_text()))

    def lines(self, word: str) -> list[str]:
        return [line for out in self.stdout for line in out.splitlines() if word in line]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_together(commands: Sequence[Sequence[str]], envs: Sequence[dict[str, str]], timeout: float = TIMEOUT_S
                 ) -> tuple[list[str], list[str], list[int]]:
    """Start every command at once (one per node), wait for all; a run past ``timeout`` is a hang: all killed."""
    procs = [subprocess.Popen(list(c), env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for c, e in zip(commands, envs, strict=True)]
    deadline = time.monotonic() + timeout
    outs: list[tuple[str, str]] = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1)))
    except subprocess.TimeoutExpired:
        for p in procs:
            os.killpg(p.pid, 9)  # the node's whole group: torchrun's and Lightning's workers too
        pytest.fail(f"the nodes did not finish within {timeout} s")
    return [o for o, _ in outs], [e for _, e in outs], [p.returncode for p in procs]


def train_args(features: Path, out: Path, extra: Sequence[str]) -> list[str]:
    return ["train", "--features", str(features), "--out", str(out), *TINY, *extra]


def one_node(features: Path, folder: Path, devices: int, extra: Sequence[str]) -> Run:
    folder.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{folder / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    out = folder / "out"
    stdout, stderr, codes = run_together([[RANKER, *train_args(features, out, ["--devices", str(devices), *extra])]],
                                         [env])
    return Run(stdout, stderr, codes, [out], store)


def two_nodes(features: Path, folder: Path, launcher: str, extra: Sequence[str],
              env: dict[str, str] | None = None) -> Run:
    """Nodes 0 and 1 of ``--num-nodes 2 --devices 1``, each its own ``--out``, under ``launcher``.

    ``lightning``: ``ranker train`` with ``MASTER_ADDR``, ``MASTER_PORT`` and ``NODE_RANK``;
    ``torchrun``: ``torchrun --nnodes 2 --nproc-per-node 1 --node-rank R ... $(which ranker) train``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    store, port = f"sqlite:///{folder / 'mlflow.db'}", free_port()
    outs = [folder / f"node{n}" for n in (0, 1)]
    clean = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "RANK")}
    commands, envs = [], []
    for node, out in enumerate(outs):
        args = train_args(features, out, ["--num-nodes", "2", "--devices", "1", *extra])
        node_env = {**clean, **(env or {}), "MLFLOW_TRACKING_URI": store if node == 0 else UNREACHABLE}
        if launcher == "lightning":
            node_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(node))
            commands.append([RANKER, *args])
        else:
            commands.append([TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                             "--master-addr", "127.0.0.1", "--master-port", str(port), RANKER, *args])
        envs.append(node_env)
    stdout, stderr, codes = run_together(commands, envs)
    return Run(stdout, stderr, codes, outs, store)


def sharded_config(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sharded.yaml").write_text(SHARDED)
    return ["--config", str(folder / "sharded.yaml")]


@pytest.fixture(scope="module")
def ddp_one_node(small_features: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    run = one_node(small_features, tmp_path_factory.mktemp("ddp_one_node"), 2, ["--strategy", "ddp", "--epochs", "1"])
    run.check()
    return run


@pytest.fixture(scope="module")
def ddp_two_nodes(small_features: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    run = two_nodes(small_features, tmp_path_factory.mktemp("ddp_two_nodes"), "torchrun",
                    ["--strategy", "ddp", "--epochs", "1"])
    run.check()
    return run


def assert_rank_zero_alone_recorded(run: Run) -> None:
    """One MLflow run and one registered version, one artifact (node 0's), nothing in node 1's folder."""
    client = MlflowClient(tracking_uri=run.store, registry_uri=run.store)
    versions = client.search_model_versions("name='ranker'")
    assert [str(v.version) for v in versions] == ["1"]
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert len(run.lines("registered version")) == 1 and "registered version 1" in run.stdout[0]
    assert len(run.lines("artifact")) == 1
    assert (run.outs[0] / "artifact" / "weights.pt").is_file()
    assert list(run.outs[1].iterdir()) == []  # node 1 wrote nothing and read none of rank 0's files


def assert_same_metrics(got: dict[str, float], want: dict[str, float]) -> None:
    assert got.keys() == want.keys()
    off = {k: got[k] for k in want if got[k] != pytest.approx(want[k], nan_ok=True, **EXACT)}
    assert not off, {k: (off[k], want[k]) for k in off}


def test_ddp_over_two_nodes_under_torchrun(ddp_two_nodes: Run, ddp_one_node: Run) -> None:
    """torchrun on each node: rank 0 alone records; the metrics are the one-node run's (2 x 1 = 1 x 2 devices)."""
    assert_rank_zero_alone_recorded(ddp_two_nodes)
    assert "MEMBER: 2/2" in ddp_two_nodes.stderr[1]  # node 1 really joined as global rank 1
    assert_same_metrics(ddp_two_nodes.metrics, ddp_one_node.metrics)


def test_one_node_of_two_processes_trains_each_rank_on_half_the_rows(small_features: Path, ddp_one_node: Run) -> None:
    """``--devices 2 --strategy ddp`` on one machine: two gloo processes, one registered version."""
    assert ddp_one_node.stdout[0].count("registered version 1") == 1  # only rank 0 exports and registers
    assert "MEMBER: 2/2" in ddp_one_node.stderr[0]
    state = torch.load(ddp_one_node.outs[0] / "checkpoints" / "last.ckpt", weights_only=True)
    rows = pl.scan_parquet(small_features / "train.parquet").select(pl.len()).collect().item()
    per_rank = -(-rows // 2)  # each rank trains on half the rows (the sampler pads by wrapping)
    assert state["global_step"] == -(-per_rank // 256)


def test_two_nodes_agree_loosely_with_one_process_of_the_same_global_batch(
        small_features: Path, tmp_path: Path, ddp_two_nodes: Run) -> None:
    single = one_node(small_features, tmp_path, 1, ["--epochs", "1", "--batch-size", "512"])
    single.check()
    got, want = ddp_two_nodes.metrics, single.metrics
    assert abs(got["val/loss"] - want["val/loss"]) < LOOSE["val/loss"], (got["val/loss"], want["val/loss"])
    aucs = [k for k in want if k.startswith("final/val/") and k.endswith("/auc")]
    assert len(aucs) == 3
    for key in aucs:
        assert abs(got[key] - want[key]) < LOOSE["auc"], (key, got[key], want[key])


def test_sharded_tables_over_two_nodes_under_lightnings_launcher(small_features: Path, tmp_path: Path) -> None:
    """``strategy: torchrec`` table-wise over two nodes: tables on both nodes' ranks, the one-node run's metrics."""
    config = sharded_config(tmp_path)
    two = two_nodes(small_features, tmp_path / "two", "lightning", [*config, "--epochs", "1"])
    one = one_node(small_features, tmp_path / "one", 2, [*config, "--epochs", "1"])
    two.check()
    one.check()
    assert_rank_zero_alone_recorded(two)
    assert one.stdout[0].count("registered version 1") == 1
    # the checkpoint holds full tables; the exported artifact is an ordinary (unsharded) model
    state = torch.load(one.outs[0] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    item = state["model.embeddings.embedding_bags.t_item_id.weight"]
    assert isinstance(item, torch.Tensor) and item.shape[0] > 1000
    plan = (two.outs[0] / "sharding_plan.txt").read_text()
    ranks = {line.split("|")[-1].strip() for line in plan.splitlines() if "table_wise" in line}
    assert ranks == {"[0]", "[1]"}, plan[:2000]  # rank 1 is node 1's only process
    assert plan == (one.outs[0] / "sharding_plan.txt").read_text()
    assert_same_metrics(two.metrics, one.metrics)
    assert two.metrics["final/val/click/auc"] > 0.65  # trained: an untrained model gives 0.5


def test_launch_mismatches_end_in_one_line_not_a_hang(small_features: Path, tmp_path: Path) -> None:
    """No launcher, ``--num-nodes 0``, a torchrun world of another size: refused before any wait. A node 0
    whose peer never comes: its wait ends after ``RANKER_DIST_TIMEOUT_S`` with one line (run side by side)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "RANK")}
    envs = [{**clean, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / f'mlflow{i}.db'}"} for i in range(4)]
    port = free_port()
    envs[3].update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", RANKER_DIST_TIMEOUT_S="5")
    outs = [tmp_path / f"out{i}" for i in range(4)]
    _, stderr, codes = run_together(
        [[RANKER, *train_args(small_features, outs[0], ["--num-nodes", "2"])],
         [RANKER, *train_args(small_features, outs[1], ["--num-nodes", "0"])],
         [TORCHRUN, "--nnodes", "1", "--nproc-per-node", "1", "--master-port", str(free_port()), RANKER,
          *train_args(small_features, outs[2], ["--num-nodes", "2"])],
         [RANKER, *train_args(small_features, outs[3], ["--num-nodes", "2", "--devices", "1"])]],
        envs, timeout=150)  # a process that waited for a peer would end in this timeout
    assert codes[0] == 2, stderr[0][-2000:]
    assert stderr[0].splitlines()[0] == (
        "error: --num-nodes 2 needs a launcher to meet the other nodes: set MASTER_ADDR, MASTER_PORT and NODE_RANK "
        "(0..1) on every node, or start each node under torchrun --nnodes 2 (or srun); "
        "MASTER_ADDR, MASTER_PORT, NODE_RANK not set")
    assert stderr[1].splitlines() == ["error: --num-nodes must be >= 1, got 0"] and codes[1] == 2
    assert codes[2] != 0
    assert ("error: --num-nodes 2, but torchrun started 1 node(s) of 1 process(es) (WORLD_SIZE 1): "
            "give torchrun --nnodes 2, or --num-nodes 1") in stderr[2], stderr[2][-2000:]
    assert not any(out.exists() for out in outs[:3])
    assert codes[3] == 2, stderr[3][-2000:]
    assert (f"error: --num-nodes 2 --devices 1: node 0 could not join the other processes at 127.0.0.1:{port} "
            "within 5 s (Timed out after ") in stderr[3] and "1/2 clients joined" in stderr[3], stderr[3][-2000:]
    client = MlflowClient(tracking_uri=envs[3]["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FAILED"]  # rank 0's run ends failed, with the error in a tag


def test_resume_needs_rank_zeros_checkpoint_on_every_node(small_features: Path, tmp_path: Path,
                                                          ddp_two_nodes: Run) -> None:
    """Node 1's own disk has no checkpoint: every process stops with one line instead of training other epochs."""
    folder = tmp_path / "again"
    shutil.copytree(ddp_two_nodes.outs[0].parent, folder)  # the store, rank 0's out and node 1's empty one
    assert not (folder / "node1" / "checkpoints").exists()
    again = two_nodes(small_features, folder, "torchrun", ["--strategy", "ddp", "--epochs", "2", "--resume"])
    assert again.returncodes[0] != 0 and again.returncodes[1] != 0
    assert "error: --resume: global rank 0 resumes but another has none: every node needs its own copy of rank 0's" \
        in again.stderr[0], again.stderr[0][-2000:]
    assert "error: --resume: global rank 1 has no checkpoint but another resumes" in again.stderr[1]
