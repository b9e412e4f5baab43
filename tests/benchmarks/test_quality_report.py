"""benchmarks/quality.py: options split into model and training fields, the report's verdicts and peer rows."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from pipelines.train_config import TrainConfig
from ranking.config import ModelConfig


@pytest.fixture(scope="module")
def quality(load_benchmark: Callable[[str], ModuleType]) -> ModuleType:
    return load_benchmark("quality")


def test_every_option_names_real_fields(quality: ModuleType) -> None:
    model_fields = set(ModelConfig.__dataclass_fields__)
    train_fields = set(TrainConfig.__dataclass_fields__)
    for name, option in quality.OPTIONS.items():
        for key in option:
            if key.startswith("train."):
                assert key.removeprefix("train.") in train_fields, (name, key)
            else:
                assert key in model_fields, (name, key)
    for before in quality.BEFORE.values():
        assert set(before) <= model_fields


def _row(option: str, seed: int, click: float, like: float) -> dict[str, object]:
    return {"option": option, "seed": seed, "wall_s": 10.0, "val": {"income": click, "never_married": like},
            "test": {"income": {"auc": click}, "never_married": {"auc": like}}}


def test_the_table_marks_wins_and_losses_beyond_twice_the_seed_sd_and_lists_peers(quality: ModuleType,
                                                                                tmp_path: Path) -> None:
    rows = [_row("baseline", s, 0.9495 + d, 0.9948) for s, d in ((1, 0.0), (2, 0.0002), (3, -0.0002))]
    rows += [_row("feature_gate", s, 0.9505 + d, 0.9948 + d) for s, d in ((1, 0.0), (2, 0.0001), (3, -0.0001))]
    rows += [_row("cosine", s, 0.9490 + d, 0.9948) for s, d in ((1, 0.0), (2, 0.0009), (3, -0.0009))]
    peers = [{"option": "torch-rechub SharedBottom", "seed": 2022, "wall_s": 5.0,
              "test": {"income": 0.9493, "never_married": 0.9947}}]
    cost = {"feature_gate": {"s_per_epoch": 4.25, "ms_per_step": 21.8}}
    text = quality.table("census", rows, peers, cost)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()[2:]}
    assert "| 0.9727 ± 0.0001 |" in lines["feature_gate"]  # the validation mean AUC that selects
    assert "wins 1, loses 0 of 2" in lines["feature_gate"]  # +0.0010 income beyond 2 sd (0.0004); marital tied
    assert "(+0.0010)" in lines["feature_gate"] and "4.2 (21.8)" in lines["feature_gate"]
    assert "wins 0, loses 0 of 2" in lines["cosine"]  # -0.0005, inside its own 2 sd (0.0018)
    assert lines["peer: torch-rechub SharedBottom"].count("0.9493") == 1 and "wins" not in lines[
        "peer: torch-rechub SharedBottom"]
    (tmp_path / "census.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    quality.report(tmp_path, tmp_path / "quality.md")
    assert "## census (seeds 1, 2, 3)" in (tmp_path / "quality.md").read_text()


def test_the_winner_is_chosen_on_validation_and_a_combination_must_beat_its_parts(quality: ModuleType) -> None:
    rows = [_row("baseline", s, 0.9495, 0.9948) for s in (1, 2)]
    rows += [_row("feature_gate", s, 0.9505 + d, 0.9948) for s, d in ((1, 0.0), (2, 0.0002))]
    rows += [_row("cosine", s, 0.9490, 0.9948) for s in (1, 2)]
    assert quality.winner(rows)[0] == "feature_gate"
    close = [_row("feature_gate+cross_full", s, 0.9506 + d, 0.9948) for s, d in ((1, 0.0), (2, 0.0006))]
    name, why = quality.winner(rows + close)
    assert name == "feature_gate" and "within its seed sd" in why  # +0.0002 on validation, sd 0.0003
    clear = [_row("feature_gate+cross_full", s, 0.9530 + d, 0.9948) for s, d in ((1, 0.0), (2, 0.0002))]
    assert quality.winner(rows + clear)[0] == "feature_gate+cross_full"
