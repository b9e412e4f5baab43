"""Figures logged to MLflow: gate and routing heatmaps (task x expert, expert x category), ROC and calibration."""

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


def routing_heatmap(health: GateHealth, path: str | Path, title: str = "") -> Path:
    """Save two task x expert heatmaps side by side: load (share of rows that give the expert a
    non-zero weight) and importance (its share of the task's weight); collapsed tasks and tasks
    with dropped rows are marked."""
    t, e = len(health.tasks), len(health.load[0]) if health.load else 0
    fig, axes = plt.subplots(1, 2, figsize=(2.4 + 1.4 * e, 1.2 + 0.5 * t), sharey=True)
    labels = [
        name + (" (collapsed)" if health.collapsed[i] else "") + (f" ({health.dropped[i]:.1%} dropped)"
                                                                     if health.dropped[i] > 0 else "")
        for i, name in enumerate(health.tasks)
    ]
    for ax, values, what in ((axes[0], health.load, "load: share of rows"),
                             (axes[1], health.importance, "importance: share of weight")):
        top = max(max(row) for row in values) if values else 1.0
        im = ax.imshow(values, vmin=0.0, vmax=max(top, 1e-9), cmap="viridis", aspect="auto")
        ax.set_xticks(range(e), [f"e{i}" for i in range(e)])
        ax.set_yticks(range(t), labels)
        for i in range(t):
            for j in range(e):
                ax.text(j, i, f"{values[i][j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if values[i][j] < 0.6 * top else "black")
        ax.set_xlabel("expert")
        ax.set_title(what, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
    if title:
        fig.suptitle(title, fontsize=9)
    return save(fig, path, dpi=110)


def choice_heatmap(health: GateHealth, grouping: str, path: str | Path, title: str = "",
                   max_values: int = 40) -> Path:
    """Save one expert x value heatmap per task: the share of a value's rows (a category's) whose
    chosen expert (argmax) is each expert, for the ``max_values`` most frequent values; each panel's
    title gives the mutual information above chance and the specialised flag.

    Raises:
        ValueError: ``health`` has no such grouping.
    """
    if grouping not in health.group_choices:
        raise ValueError(f"no grouping {grouping!r} in this gate health; it has {sorted(health.group_choices)}")
    counts = health.group_choices[grouping].double()  # (T, K, E)
    seen = counts.sum(dim=(0, 2))  # (K,) rows per value over all tasks
    keep = [int(k) for k in seen.argsort(descending=True)[:max_values] if seen[k] > 0]
    keep.sort()
    t, e = counts.shape[0], counts.shape[2]
    fig, axes = plt.subplots(t, 1, figsize=(1.6 + 0.28 * max(len(keep), 1), 0.3 + (0.9 + 0.25 * e) * t),
                             squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        table = counts[i, keep].T  # (E, K') rows of each kept value, by chosen expert
        share = (table / table.sum(dim=0, keepdim=True).clamp_min(1.0)).numpy()
        im = ax.imshow(share, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_yticks(range(e), [f"e{j}" for j in range(e)], fontsize=7)
        ax.set_xticks(range(len(keep)), [str(k) for k in keep], fontsize=6, rotation=90)
        d = health.group_mi[grouping][i]
        ax.set_title(f"{health.tasks[i]}: MI above chance {d.mi:.3f} nats ({d.normalised:.1%} of the choice's "
                     f"entropy){', specialised' if d.specialised else ''}", fontsize=8)
        ax.set_ylabel("expert", fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.03)
    axes[-1, 0].set_xlabel(f"{grouping} id")
    fig.suptitle(title or f"chosen expert by {grouping} (specialised: >= {health.specialised_above:.0%})",
                 fontsize=9)
    return save(fig, path, dpi=100)


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
