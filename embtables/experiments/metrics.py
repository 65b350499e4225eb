"""Evaluation metrics (AUC, logloss): they live in the leaf `embtables.metrics`, which
`sharding` may import too; this name keeps `embtables.experiments.metrics` working."""

from embtables.metrics import auc, logloss

__all__ = ["auc", "logloss"]
