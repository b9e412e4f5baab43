"""Figures logged to MLflow: the task x expert gate heatmap, ROC and calibration curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files, never to a screen
import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from torchmetrics.functional.classification import binary_roc

from ranking.gate_health import GateHealth


def save(fig: Figure, path: str | Path, dpi: int) -> Path:
    """Lay out, write (creating the folder) and close a figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def gate_heatmap(health: GateHealth, path: str | Path, title: str = "") -> Path:
    """Save a task x expert heatmap of mean gate weights, with polarized tasks marked."""
    weights = health.mean_weight
    t, e = len(weights), len(weights[0]) if weights else 0
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * e, 1.0 + 0.5 * t))
    im = ax.imshow(weights, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(e), [f"e{i}" for i in range(e)])
    labels = [
        f"{name}{' (polarized)' if pol else ''}" for name, pol in zip(health.tasks, health.polarized, strict=True)
    ]
    ax.set_yticks(range(t), labels)
    for i in range(t):
        for j in range(e):
            ax.text(j, i, f"{weights[i][j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if weights[i][j] < 0.6 else "black")
    ax.set_xlabel("expert")
    ax.set_title(title or f"mean gate weight (dead experts: {health.dead_fraction:.0%})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    return save(fig, path, dpi=110)


def roc_and_calibration(
    task: str, scores: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str | Path, bins: int = 10
) -> Path:
    """One PNG per binary task: ROC curves and a reliability diagram (equal-count bins) per model.

    Args:
        scores: model label ("challenger", "champion") -> (predictions (N,), labels (N,)).
    """
    fig, (roc_ax, cal_ax) = plt.subplots(1, 2, figsize=(9, 4))
    top = 0.0
    for label, (p, y) in scores.items():
        if p.numel() == 0 or y.min() == y.max():
            continue
        fpr, tpr, _ = binary_roc(p, y.long())
        roc_ax.plot(fpr.numpy(), tpr.numpy(), label=label)
        order = torch.argsort(p)
        chunks = [c for c in torch.tensor_split(order, bins) if c.numel()]
        mean_p = torch.stack([p[c].mean() for c in chunks]).numpy()
        mean_y = torch.stack([y[c].float().mean() for c in chunks]).numpy()
        cal_ax.plot(mean_p, mean_y, marker="o", label=label)
        top = max(top, float(mean_p.max()), float(mean_y.max()))
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{task}: ROC (holdout)")
    top = top or 1.0
    cal_ax.plot([0, top], [0, top], color="grey", linestyle=":")
    cal_ax.set(xlabel="mean prediction", ylabel="observed rate", title=f"{task}: calibration ({bins} bins)")
    roc_ax.legend(loc="lower right")
    cal_ax.legend(loc="upper left")
    return save(fig, path, dpi=90)
