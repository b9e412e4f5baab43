"""Feature spec, dataset adapters, fit/transform and splits, written in Polars (no torch here)."""

from features.fitted import FittedTransform
from features.spec import DenseFeature, FeatureSpec, SparseFeature, Task, load_spec

__all__ = ["DenseFeature", "FeatureSpec", "FittedTransform", "SparseFeature", "Task", "load_spec"]
