"""The run report: one Markdown page a person reads the morning after (also logged to MLflow)."""

from __future__ import annotations

import math
from typing import Any

from pipelines.champion import PREFIX, GateCheck

METRICS = ("auc", "gauc", "logloss", "ne", "calibration", "rmse", "r2")


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "-" if math.isnan(x) else f"{x:.4f}"
    return str(x)


def decision_text(checks: list[GateCheck], promoted: bool, version: str | None, champion: str | None) -> str:
    """One paragraph: what happened and why, with the failing gates and their shortfall."""
    if champion is None:
        return f"**Promoted**: version {version} is the first model, so it becomes champion (no gates to pass)."
    failed = [c for c in checks if not c.passed]
    if promoted:
        return (f"**Promoted**: version {version} passed all {len(checks)} gates against champion version "
                f"{champion} and is now champion.")
    why = "; ".join(
        f"{c.name} on {c.task} {c.metric}: {_fmt(c.challenger)} < required {_fmt(c.threshold)} "
        f"(short by {_fmt(-c.margin)})" for c in failed
    )
    return (f"**Not promoted**: version {version} is registered but version {champion} stays champion. "
            f"Failed gate(s): {why}.")


def render(ctx: dict[str, Any]) -> str:
    """Markdown from the run's context (see ``pipelines.pipeline`` for the keys)."""
    lines = [f"# Pipeline `{ctx['pipeline']}`: as of {ctx['as_of']}", ""]
    lines += [decision_text(ctx["checks"], ctx["promoted"], ctx["version"], ctx["champion_version"]), ""]
    w = ctx["windows"]
    lines += [
        "## Data",
        "",
        f"- Windows: train {w['train']}, validation {w['validation']}, holdout {w['holdout']}.",
        f"- Partitions ingested this run: {', '.join(ctx['ingested']) or 'none (already in the lake)'}.",
        f"- Rows checked: {ctx['rows_checked']}; quarantined: {ctx['quarantined_total']}"
        + (f" ({'; '.join(f'{k}: {v}' for k, v in ctx['quarantined'].items())})" if ctx["quarantined"] else "")
        + ".",
        f"- Training rows: {ctx['rows'].get('train', 0)}, validation rows: {ctx['rows'].get('val', 0)}, "
        f"holdout rows scored: {ctx['holdout_rows']}.",
        f"- Fitted transform: `{ctx['transform_hash']}`; code `{ctx['code_version']}`; config `{ctx['config_hash']}`.",
        "",
        "## Challenger",
        "",
        f"- Model {ctx['model']}, best epoch {ctx['best_epoch']}, warm start: {ctx['warm_start']}.",
        f"- Training run `{ctx['train_run_id']}`; registered as `{ctx['model_name']}` version {ctx['version']}.",
        "",
        f"## Holdout ({w['holdout']}): challenger vs champion"
        + (f" (version {ctx['champion_version']})" if ctx["champion_version"] else " (none yet)"),
        "",
        "| task | metric | challenger | champion | difference |",
        "|---|---|---|---|---|",
    ]
    chal, champ = ctx["challenger_metrics"], ctx["champion_metrics"] or {}
    for task in ctx["tasks"]:
        for m in METRICS:
            key = f"{PREFIX}/{task}/{m}"
            if key not in chal:
                continue
            a, b = chal[key], champ.get(key)
            diff = a - b if isinstance(b, float) and not (math.isnan(a) or math.isnan(b)) else None
            lines.append(f"| {task} | {m} | {_fmt(a)} | {_fmt(b)} | {_fmt(diff)} |")
    lines += ["", "## Gates", "", "| gate | task | metric | challenger | champion | required | margin | result |",
              "|---|---|---|---|---|---|---|---|"]
    for c in ctx["checks"]:
        lines.append(f"| {c.name} | {c.task} | {c.metric} | {_fmt(c.challenger)} | {_fmt(c.champion)} | "
                     f"{_fmt(c.threshold)} | {_fmt(c.margin)} | {'pass' if c.passed else '**FAIL**'} |")
    settings = ", ".join(f"{k} {v}" for k, v in ctx["gates"].items())
    lines += ["", f"Gate settings: {settings}.", "", f"MLflow parent run `{ctx['parent_run_id']}`.", ""]
    return "\n".join(lines)
