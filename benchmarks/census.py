"""Census-income (KDD) replication of the MMoE paper's task group 1, against the peer libraries, in one run.

The protocol (``shared/peers/RESULTS-2026-11-22.md``) fixes data, split, features and metric:
train = census-income.data, val / test = even / odd rows of census-income.test, 32 sparse x 4 +
7 min-max dense = 135 inputs, tasks income > 50K and never married, AUC on the whole split
(``ranker features build --dataset census`` reproduces it). Every epoch is validated; the selected
epoch is the argmax of the mean of the two validation AUCs (the protocol's sum, earliest on
ties) and the test split is scored with the selected weights. Models, widths and the optimiser
recipe are ours (``MODELS``, ``RECIPE``), printed with the results.

Our runs go through ``pipelines.train.train`` (Lightning, MLflow experiment ``census-replication``
in ``<work>/mlflow.db``, ``monitor="val/auc_mean"``). ``--peers`` runs ``shared/peers/run_all.sh``
(``WORK=/tmp/peers``: its venv and prepared data are reused) and prints its rows beside ours;
``--throughput`` builds that environment first when it is missing (:func:`ensure_peers`, about a
minute).

``--throughput`` measures training samples/s at batch 1024 over the training passes only
(no evaluation, no loading; the protocol's definition) and CPU µs/sample, for our MMoE in the
peers' shape (8 experts x [16], towers [8], no bottom, 135 inputs), once through Lightning's
fit loop and once through a bare loop over the same LightningModule, next to deepctr-torch's
MMOE run in the same invocation; the machine is shared, so load is recorded with every figure.

    .venv/bin/python benchmarks/census.py [--seeds 2022,...] [--epochs 10] [--models mmoe,...] [--peers]
    .venv/bin/python benchmarks/census.py --throughput-only [--throughput-threads 2]
    .venv/bin/python benchmarks/census.py --smoke        # seconds: 1 seed, 1 epoch, 2 models, short throughput
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from features.build import build
from features.datasets import scan_dataset
from features.spec import load_spec
from pipelines.train import train
from pipelines.train_config import TrainConfig
from ranking.artifact import build_model
from ranking.config import ModelConfig
from ranking.train import FitConfig, OptimConfig, RankingDataModule, RankingModule, fit, load_features

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PEERS = SHARED / "peers"
TASKS = ("income", "never_married")
PEER_TASKS = {"income": "income", "never_married": "marital"}  # the peers' JSON names
EXPERIMENT = "census-replication"
TRAIN_ROWS = 199_523

# Ours: a 256-wide shared bottom (single_task: one per task) under the mixing; 8 experts of [64] for
# the mixtures, PLE's 8 split 2 per task + 4 shared over two levels; towers [32]. Picked on the
# validation split (seed 2022): the peers' shape without a bottom reaches val income AUC 0.9477
# at 10 epochs (lr 2e-3), 0.9489 at 20; this one 0.9492 at 10 with lr 3e-3.
MODELS: dict[str, dict[str, Any]] = {
    "single_task": {"bottom_dims": (256,), "expert_dims": (64,), "tower_dims": (32,)},
    "shared_bottom": {"bottom_dims": (256,), "expert_dims": (128,), "tower_dims": (32,)},
    "omoe": {"bottom_dims": (256,), "num_experts": 8, "expert_dims": (64,), "tower_dims": (32,)},
    # the quality ablation's winner (benchmarks/results/quality.md): a field-wise feature gate on the input
    "mmoe": {"bottom_dims": (256,), "num_experts": 8, "expert_dims": (64,), "tower_dims": (32,),
             "feature_gate_dim": 64},
    "ple": {"bottom_dims": (256,), "num_task_experts": 2, "num_shared_experts": 4, "ple_levels": 2,
            "expert_dims": (64,), "tower_dims": (32,)},
}
RECIPE: dict[str, Any] = {"lr": 3e-3, "weight_decay": 0.0, "batch_size": 1024, "embedding_lr": None}
# deepctr-torch's MMOE as our config: the shape the throughput comparison runs.
PEER_SHAPE: dict[str, Any] = {"bottom_dims": (), "num_experts": 8, "expert_dims": (16,), "tower_dims": (8,)}
PEER_OPTIM = OptimConfig(lr=1e-3, weight_decay=1e-4)  # the throughput runs' optimiser


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU model, cores, date, load averages."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name")), "?")
    return {"cpu": model, "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "load": os.getloadavg(), "torch": torch.__version__}


def run_ours(work: Path, features: Path, model: str, seed: int, epochs: int,
             overrides: dict[str, Any] | None = None, tag: str = "",
             training: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one model and seed through the pipeline; its selected epoch and val/test AUCs.

    ``overrides`` replace fields of the model's ``MODELS`` settings, ``training`` fields of ``RECIPE``
    (e.g. ``{"lr_schedule": "cosine"}``); ``tag`` names the run folder.
    """
    load = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    result = train(TrainConfig(
        features=features, out=work / "runs" / f"{model}{tag}_{seed}", tracking_uri=f"sqlite:///{work / 'mlflow.db'}",
        model=model, epochs=epochs, seed=seed, monitor="val/auc_mean", monitor_mode="max", experiment=EXPERIMENT,
        register_as=None, progress_bar=False, model_overrides={**MODELS[model], **(overrides or {})},
        **{**RECIPE, **(training or {})},
    ))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    m = result.metrics
    return {"model": model, "seed": seed, "best_epoch": (result.best_epoch or 0) + 1,  # Lightning counts from 0
            "val": {t: m[f"final/val/{t}/auc"] for t in TASKS}, "test": {t: m[f"final/test/{t}/auc"] for t in TASKS},
            "wall_s": wall, "cpu_s": cpu, "load1": load, "run_id": result.run_id, "artifact": str(result.artifact)}


def run_peers(peers_work: Path, epochs: int) -> list[dict[str, Any]]:
    """``run_all.sh`` (torch-rechub and deepctr-torch, MMOE and SharedBottom), then its result files."""
    env = {**os.environ, "WORK": str(peers_work), "EPOCHS": str(epochs)}
    subprocess.run([str(PEERS / "run_all.sh")], env=env, check=True)
    return [json.loads(f.read_text()) for f in sorted((peers_work / "results").glob("*.json"))
            if not f.stem.endswith("_tp")]


def _stat(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def quality_table(rows: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: test AUC per task at the best val epoch, mean ± std and best over seeds."""
    head = ("| system | seeds | best val epoch | test AUC income | best | test AUC never-married | best "
            "| val AUC inc / mar (mean) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, runs in rows.items():
        inc = [r["test"]["income"] for r in runs]
        mar = [r["test"]["never_married"] for r in runs]
        val = "/".join(f"{statistics.mean(r['val'][t] for r in runs):.4f}" for t in TASKS)
        lines.append(f"| {name} | {len(runs)} | {','.join(str(r['best_epoch']) for r in runs)} | {_stat(inc)} "
                     f"| {max(inc):.4f} | {_stat(mar)} | {max(mar):.4f} | {val} |")
    return "\n".join(lines)


class EpochClock(L.Callback):
    """Wall and process CPU seconds of each training pass (Lightning's train epoch, nothing else)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._t, self._c = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.wall.append(time.perf_counter() - self._t)
        self.cpu.append(time.process_time() - self._c)


def _rate(wall: list[float], cpu: list[float], rows: int, how: str) -> dict[str, Any]:
    n = rows * len(wall)
    return {"how": how, "epochs": len(wall), "samples_per_s": n / sum(wall), "cpu_us_per_sample": 1e6 * sum(cpu) / n,
            "median_epoch_s": statistics.median(wall), "load1": os.getloadavg()[0]}


def _module(features: Path, seed: int) -> tuple[RankingModule, RankingDataModule]:
    torch.manual_seed(seed)
    mconf = ModelConfig.from_fitted(load_features(features), model="mmoe", **PEER_SHAPE)
    data = RankingDataModule(features, mconf, batch_size=1024, seed=seed)
    data.setup()
    module = RankingModule(build_model(mconf), mconf, FitConfig(optim=PEER_OPTIM, seed=seed))
    return module, data


def lightning_throughput(features: Path, epochs: int, seed: int = 2022) -> dict[str, Any]:
    """Our MMoE (peer shape) through ``ranking.train.fit`` (Lightning's loop) with no validation,
    logger, checkpoints or final evaluation."""
    mconf = ModelConfig.from_fitted(load_features(features), model="mmoe", **PEER_SHAPE)
    clock = EpochClock()
    result = fit(features, mconf, FitConfig(epochs=epochs, batch_size=1024, optim=PEER_OPTIM, seed=seed,
                                            accelerator="cpu", validate=False, final_eval=False), callbacks=[clock])
    how = "Lightning Trainer.fit (training_step, its logging and metrics)"
    return _rate(clock.wall, clock.cpu, len(result.trainer.datamodule.tables["train"]), how)


def bare_throughput(features: Path, epochs: int, fused: bool, seed: int = 2022) -> dict[str, Any]:
    """The same LightningModule's ``training_step`` in a plain loop: batches, step, backward, Adam.

    ``fused``: the module's Adam param groups in ``torch.optim.Adam(fused=True)`` (one kernel for
    all parameters, what the module itself uses since 2026-11-30) or, when False, in the
    per-parameter for-loop Adam it used before.
    """
    module, data = _module(features, seed)
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # no Trainer to log to
    opt = module.optimizer()
    # the same groups (lr, weight decay) minus the per-group implementation choice
    groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in opt.param_groups]
    opt = torch.optim.Adam(groups, fused=True) if fused else torch.optim.Adam(groups, fused=False, foreach=False)
    loader = data.train_dataloader()
    wall, cpu = [], []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]  # EpochBatchSampler, as Lightning calls it
        t, c = time.perf_counter(), time.process_time()
        for i, batch in enumerate(loader):
            module.on_train_batch_start(batch, i)
            loss = module.training_step(batch, i)
            opt.zero_grad()
            loss.backward()
            opt.step()
        module.train_metrics.reset()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    how = "bare loop over training_step, " + ("fused Adam" if fused else "for-loop Adam")
    return _rate(wall, cpu, len(data.tables["train"]), how)


def ensure_peers(peers_work: Path) -> None:
    """The peers' environment under ``peers_work`` (venv, prepared split), built by ``run_all.sh``
    itself when missing: with ``MODELS=" "`` it sets up and trains nothing (its model loop is over
    the words of ``MODELS``)."""
    if (peers_work / "venv" / "bin" / "python").is_file() and (peers_work / "prepared" / "meta.json").is_file():
        return
    print(f"building the peers' environment in {peers_work} (shared/peers/run_all.sh, once)", flush=True)
    subprocess.run([str(PEERS / "run_all.sh")], env={**os.environ, "WORK": str(peers_work), "MODELS": " "},
                   check=True)


def deepctr_throughput(peers_work: Path, epochs: int, threads: int) -> dict[str, Any]:
    """deepctr-torch MMOE, the protocol's command, in a subprocess; its JSON (train passes only)."""
    ensure_peers(peers_work)
    out = peers_work / "results_tp"
    cmd = [str(peers_work / "venv" / "bin" / "python"), str(PEERS / "run_deepctr_torch.py"), "--model", "MMOE",
           "--epochs", str(epochs), "--batch_size", "1024", "--seed", "2022", "--threads", str(threads),
           "--out", str(out)]
    subprocess.run(cmd, env={**os.environ, "WORK": str(peers_work), "TQDM_DISABLE": "1"}, check=True,
                   capture_output=True)
    r = json.loads((out / "deepctr_torch_MMOE.json").read_text())
    return {"how": f"deepctr-torch 0.3.0 MMOE fit(epochs=1) x {epochs}", "epochs": epochs,
            "samples_per_s": r["train_samples_per_s"], "cpu_us_per_sample": r["train_cpu_us_per_sample"],
            "median_epoch_s": r["median_epoch_train_s"], "load1": os.getloadavg()[0],
            "test_auc": r["test_auc_at_best_val_epoch"], "command": " ".join(cmd)}


def throughput(features: Path, peers_work: Path, epochs: int, threads: int) -> list[dict[str, Any]]:
    """Ours (Lightning, bare, bare + fused Adam) and deepctr-torch's MMOE, back to back, same threads."""
    torch.set_num_threads(threads)
    rows = [deepctr_throughput(peers_work, epochs, threads),
            lightning_throughput(features, epochs),
            bare_throughput(features, epochs, fused=False),
            bare_throughput(features, epochs, fused=True)]
    for r in rows:
        r["threads"] = threads
    return rows


def throughput_table(rows: list[dict[str, Any]]) -> str:
    peer = {r["threads"]: r["samples_per_s"] for r in rows if r["how"].startswith(("deepctr", "(smoke"))}
    head = "| threads | system | samples/s | CPU µs/sample | median epoch s | × deepctr | load1 after |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ratio = r["samples_per_s"] / peer[r["threads"]]
        lines.append(f"| {r['threads']} | {r['how']} | {r['samples_per_s']:,.0f} | {r['cpu_us_per_sample']:.2f} "
                     f"| {r['median_epoch_s']:.2f} | {ratio:.2f} | {r['load1']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="2022,2023,2024,2025,2026", help="comma list; >= 5 for mean ± std")
    ap.add_argument("--epochs", type=int, default=10, help="10 = the peers' recipe")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the quality runs")
    ap.add_argument("--peers", action="store_true", help="also run shared/peers/run_all.sh and show its rows")
    ap.add_argument("--throughput", action="store_true", help="also measure training throughput vs deepctr-torch")
    ap.add_argument("--throughput-only", action="store_true", help="only the throughput comparison")
    ap.add_argument("--throughput-threads", default="2", help="comma list of torch thread counts (protocol: 2)")
    ap.add_argument("--throughput-epochs", type=int, default=10)
    ap.add_argument("--peers-work", type=Path, default=Path("/tmp/peers"))
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "census_income_kdd")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="1 seed, 1 epoch, 2 models, 1 throughput epoch, no peers")
    args = ap.parse_args()
    if args.smoke:
        args.seeds, args.epochs, args.models, args.peers = "2022", 1, "mmoe,shared_bottom", False
        args.throughput_epochs = 1
    seeds = [int(s) for s in args.seeds.split(",")]
    models = [m.strip() for m in args.models.split(",")]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown --models {unknown}; available: {list(MODELS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="census-"))
    features = work / "features"
    print(json.dumps({"machine": machine(), "argv": vars(args) | {"work": str(work)}}, default=str), flush=True)
    build(scan_dataset("census", args.data), load_spec("census"), features)

    if not args.throughput_only:
        torch.set_num_threads(args.threads)
        ours: dict[str, list[dict[str, Any]]] = {}
        for model in models:
            for seed in seeds:
                row = run_ours(work, features, model, seed, args.epochs)
                ours.setdefault(f"ours {model}", []).append(row)
                print(json.dumps(row), flush=True)
        (work / "ours.json").write_text(json.dumps(ours, indent=1))
        rows = dict(ours)
        if args.peers:
            for r in run_peers(args.peers_work, args.epochs):
                best = r["test_auc_at_best_val_epoch"]
                val = next(e["val_auc"] for e in r["epochs"] if e["epoch"] == r["best_val_epoch"])
                rows.setdefault(f"{r['library']} {r['model']}", []).append({
                    "best_epoch": r["best_val_epoch"], "val": dict(zip(TASKS, val, strict=True)),
                    "test": {t: best[PEER_TASKS[t]] for t in TASKS}})
        print(f"\nours: {args.epochs} epochs, recipe {json.dumps(RECIPE)}, models {json.dumps(MODELS)}")
        print(quality_table(rows), flush=True)
    if args.throughput or args.throughput_only or args.smoke:
        tp: list[dict[str, Any]] = []
        for threads in (int(t) for t in args.throughput_threads.split(",")):
            if args.smoke:
                torch.set_num_threads(threads)
                tp += [lightning_throughput(features, 1), bare_throughput(features, 1, fused=True)]
                for r in tp:
                    r["threads"] = threads
                tp.insert(0, {"how": "(smoke: no peer run)", "samples_per_s": tp[0]["samples_per_s"],
                              "cpu_us_per_sample": 0.0, "median_epoch_s": 0.0, "load1": 0.0, "threads": threads})
            else:
                tp += throughput(features, args.peers_work, args.throughput_epochs, threads)
        (work / "throughput.json").write_text(json.dumps(tp, indent=1))
        print(f"\nthroughput at batch 1024, our MMoE in deepctr's shape {json.dumps(PEER_SHAPE)}, "
              f"{args.throughput_epochs} epochs each, training passes only:")
        print(throughput_table(tp), flush=True)
    print(f"work dir: {work}")


if __name__ == "__main__":
    main()
