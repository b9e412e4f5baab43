"""The composition root: the ``ranker`` CLI, training runs, MLflow tracking and registry, the demo."""
