"""Evaluation metrics: AUC (torchmetrics) and logloss over arrays. A leaf (it imports nothing
from embtables): the trainer and `sharding.collectives_metrics.global_metrics` share it."""

from __future__ import annotations

import math

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc


def auc(labels: np.ndarray | torch.Tensor, probs: np.ndarray | torch.Tensor) -> float | None:
    """ROC AUC; None when only one class is present (AUC undefined)."""
    y = torch.as_tensor(np.asarray(labels)).to(torch.long).flatten()
    p = torch.as_tensor(np.asarray(probs, dtype=np.float64)).flatten()
    if y.numel() == 0 or bool((y == y[0]).all()):
        return None
    return float(binary_auroc(p, y))


def logloss(labels: np.ndarray | torch.Tensor, probs: np.ndarray | torch.Tensor, eps: float = 1e-7) -> float:
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1 - eps)
    if y.size == 0:
        return math.nan
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))
