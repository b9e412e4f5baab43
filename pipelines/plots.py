"""Figures logged to MLflow: the task x expert gate heatmap."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files, never to a screen
import matplotlib.pyplot as plt

from ranking.gate_health import GateHealth


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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
