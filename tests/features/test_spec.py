from pathlib import Path

import pytest

from features.spec import load_spec, parse_spec


def test_bundled_synthetic_spec_declares_tasks_and_sources() -> None:
    spec = load_spec("synthetic")
    assert [t.name for t in spec.tasks] == ["click", "watch_time", "like", "dismiss"]
    assert spec.features_from("user") == ["user_id"]
    assert set(spec.features_from("context")) == {"device", "surface", "hour"}
    assert "tags" in spec.features_from("item")
    assert spec.task("watch_time").type == "regression"


def test_spec_errors_name_field_and_value(tmp_path: Path) -> None:
    data = {"name": "x", "sparse": [{"name": "u", "source": "nowhere"}], "tasks": []}
    with pytest.raises(ValueError, match=r"sparse\.0\.source.*'nowhere'"):
        parse_spec(data)
    with pytest.raises(ValueError, match="unknown dataset spec 'nope'"):
        load_spec("nope")
    with pytest.raises(ValueError, match="spec file not found"):
        load_spec(tmp_path / "missing.yaml")


def test_duplicate_names_rejected() -> None:
    base = {"name": "x", "tasks": [{"name": "c", "type": "binary", "label": "c", "group": "engagement"}]}
    with pytest.raises(ValueError, match="duplicate feature name 'u'"):
        parse_spec({**base, "sparse": [{"name": "u", "source": "user"}, {"name": "u", "source": "item"}]})


def test_position_cross_must_name_a_single_valued_sparse_feature() -> None:
    base = {
        "name": "x",
        "sparse": [{"name": "device", "source": "context"}, {"name": "tags", "source": "item", "multi": True}],
        "tasks": [{"name": "c", "type": "binary", "label": "c", "group": "engagement"}],
    }
    assert parse_spec({**base, "position": {"cross": "device"}}).position.cross == "device"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="position.cross 'os' names no sparse feature"):
        parse_spec({**base, "position": {"cross": "os"}})
    with pytest.raises(ValueError, match="position.cross 'tags' is multi-valued"):
        parse_spec({**base, "position": {"cross": "tags"}})
