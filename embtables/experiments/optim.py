"""Optimizers: a fused in-backward optimizer for the TorchRec tables, a torch optimizer
for the dense parts, and a step -> LR factor schedule applied to both."""

from __future__ import annotations

import math

import torch
import torchrec.optim as trec_optim
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from embtables.experiments.config import DenseOptimizerConfig, EmbeddingOptimizerConfig, ScheduleConfig

# The classes TorchRec maps to FBGEMM's fused optimizers (torchrec.distributed.utils).
_EMB_OPTIMIZERS = {
    "rowwise_adagrad": trec_optim.RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}


def table_parameters(model: nn.Module) -> list[nn.Parameter]:
    params: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection)):
            params.extend(m.parameters())
    return params


def attach_embedding_optimizer(model: nn.Module, cfg: EmbeddingOptimizerConfig, device: str = "cpu") -> None:
    """Attach the embedding optimizer in backward, so DMP fuses it into FBGEMM's kernels."""
    if cfg.name == "adam" and device == "cpu":
        # FBGEMM's CPU kernels have no fused Adam: say so now, not from deep inside DMP.
        raise ValueError(
            "train.embedding_optimizer.name: adam is not available for embedding tables on CPU "
            "(FBGEMM's CPU kernels fuse only sgd, adagrad and rowwise_adagrad); use rowwise_adagrad or adagrad, "
            "or run with sharding.device: cuda"
        )
    kwargs: dict = {"lr": cfg.lr}
    if cfg.name in ("rowwise_adagrad", "adagrad", "adam"):
        kwargs["eps"] = cfg.eps
    if cfg.weight_decay:
        kwargs["weight_decay"] = cfg.weight_decay
    _apply_optimizer_in_backward(_EMB_OPTIMIZERS[cfg.name], table_parameters(model), kwargs)


def dense_optimizer(params: list[nn.Parameter], cfg: DenseOptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """Multiplier of the base LR at ``step`` (0-based). Pure, so resuming needs no state."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    t = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    if cfg.name == "linear_decay":
        return 1.0 - (1.0 - cfg.min_factor) * t
    return cfg.min_factor + (1.0 - cfg.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizers: list[torch.optim.Optimizer], base_lrs: list[list[float]], factor: float) -> None:
    for opt, bases in zip(optimizers, base_lrs, strict=True):
        for group, base in zip(opt.param_groups, bases, strict=True):
            group["lr"] = base * factor
