"""Feature spec, dataset adapters, fit/transform and splits, written in Polars (no torch here).

Names load on first use, so a light module (``features.synthetic_config``) costs no Polars import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from features.fitted import FittedTransform
    from features.spec import DenseFeature, FeatureSpec, SparseFeature, Task, load_spec

_WHERE = {"FittedTransform": "fitted", "DenseFeature": "spec", "FeatureSpec": "spec", "SparseFeature": "spec",
          "Task": "spec", "load_spec": "spec"}

__all__ = ["DenseFeature", "FeatureSpec", "FittedTransform", "SparseFeature", "Task", "load_spec"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'features' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"features.{_WHERE[name]}"), name)
    globals()[name] = value  # once: later lookups skip this function
    return value
