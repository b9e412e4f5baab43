"""Protos of the ``ranking`` API family (package ``ranking.v1`` and later versions)."""
