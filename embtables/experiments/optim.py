"""Optimizers: a fused in-backward optimizer for the TorchRec tables, a torch optimizer
for the dense parts, and a step -> LR factor schedule applied to both."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torchrec.optim as trec_optim
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer
from torchrec.optim.optimizers import in_backward_optimizer_filter

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
            "(FBGEMM's CPU kernels fuse only sgd, adagrad and rowwise_adagrad); use rowwise_adagrad or "
            "adagrad, or run with sharding.device: cuda"
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


@dataclass
class Optimizers:
    """The dense optimizer and the fused embedding optimizer of one model, stepped together
    (also the optimizer TorchRec's train pipelines are given: ``zero_grad`` and ``step``)."""

    dense: torch.optim.Optimizer
    fused: KeyedOptimizer

    def all(self) -> list[torch.optim.Optimizer]:
        return [self.dense, self.fused]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None) -> None:
        self.dense.step()
        self.fused.step()  # applies the scheduled LR to FBGEMM's fused update


def fused_optimizer(model: nn.Module) -> CombinedOptimizer:
    """The fused optimizers of the sharded tables under ``model``, keyed by their paths from
    ``model`` (what DMP's ``fused_optimizer`` holds when ``model`` is the module it wraps)."""
    found: list[tuple[str, KeyedOptimizer]] = []

    def walk(module: nn.Module, path: str) -> None:
        if isinstance(module, FusedOptimizerModule):
            found.append((path, module.fused_optimizer))
            return
        for name, child in module.named_children():
            walk(child, f"{path}.{name}" if path else name)

    walk(model, "")
    return CombinedOptimizer(found)


def build_optimizers(dmp: nn.Module, model: nn.Module, cfg: DenseOptimizerConfig,
                     extra_groups: list[dict[str, Any]] | None = None) -> Optimizers:
    """The dense optimizer over every parameter of ``dmp`` the fused optimizer does not
    update, plus ``extra_groups`` (parameter groups with their own settings; their
    parameters are taken out of the default group), and the fused optimizer of ``model``'s
    sharded tables (``model``: the module inside ``dmp`` that checkpoints are keyed from)."""
    extra_groups = extra_groups or []
    own = {id(p) for g in extra_groups for p in g["params"]}
    params = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters(), include=False)]
    rest = [p for p in params if id(p) not in own]
    if len(rest) != len(params) - len(own):
        raise RuntimeError("internal: a parameter of an extra optimizer group is not a dense parameter")
    dense = dense_optimizer(rest, cfg)
    for group in extra_groups:
        dense.add_param_group(dict(group))
    return Optimizers(dense, fused_optimizer(model))
