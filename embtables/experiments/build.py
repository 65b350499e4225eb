"""From config sections to modules: the embedding factory a model builder receives, the
model, and a :class:`~embtables.experiments.trainer.Trainer` with everything it trains."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from embtables.embeddings import EmbeddingMethod, FeatureSpec, build
from embtables.embeddings.budget import DTYPE_BYTES, resolve_budget
from embtables.embeddings.factory import MakeEmbedding
from embtables.embeddings.quantize import NotQuantizable, check_quantizable, row_bytes
from embtables.experiments.config import EmbeddingSection, ExperimentConfig
from embtables.experiments.evaluate import Evaluator
from embtables.experiments.optim import attach_embedding_optimizer, build_optimizers
from embtables.experiments.trainer import TrainData, Trainer, TrainStep, UsesDatasetStats, measure_sizes
from embtables.models import get_model
from embtables.sharding import DistContext, shard_model


def embedding_factory(embedding_cfg: EmbeddingSection, device=None) -> MakeEmbedding:
    """A :class:`MakeEmbedding` bound to the ``embedding:`` section (method, dim, budget,
    dtype, knobs) and a device."""

    def make(features: Sequence[FeatureSpec], *, sequence: bool = False, method: str | None = None,
             dim: int | None = None, budget: float | int | str | None = None,
             share: float | None = None) -> EmbeddingMethod:
        method = method or embedding_cfg.method
        if share is not None:
            if budget is not None:
                raise ValueError("make_embedding: a budget or a share of the bound one, not both")
            bound = 1 if embedding_cfg.budget is None else embedding_cfg.budget  # none: the full size
            whole = resolve_budget(bound, list(features), embedding_cfg.dim)
            budget = max(2, int(share * whole))  # bytes: 0 and 1 would read as fractions
        kw = dict(method=method, dim=dim or embedding_cfg.dim, dtype=embedding_cfg.dtype, sequence=sequence,
                  init_scale=embedding_cfg.init_scale, **embedding_cfg.module_knobs(method))
        budget = embedding_cfg.budget if budget is None else budget
        if embedding_cfg.serve_dtype is not None and budget is not None:
            budget = training_budget_for_serving(list(features), budget, embedding_cfg.serve_dtype, kw)
        return build(list(features), budget=budget, device=device, **kw)

    return make


def training_budget_for_serving(features: list[FeatureSpec], budget: float | int | str, serve_dtype: str,
                                kw: dict[str, Any]) -> int:
    """The training budget (bytes at ``embedding.dtype``) at which the method's tables,
    served at ``serve_dtype``, fill ``budget``: each row costs its quantized bytes, not its
    training ones. Found by sizing on the meta device (nothing allocated, the caller's RNG
    untouched); the module's own sizing stays the method's."""
    target = resolve_budget(budget, features, kw["dim"])
    train_row = kw["dim"] * DTYPE_BYTES[kw["dtype"]]
    trial = max(2, target * train_row // row_bytes(kw["dim"], serve_dtype))
    for _ in range(12):
        with torch.random.fork_rng(devices=[]):
            m = build(features, budget=trial, device=torch.device("meta"), **kw)
        if not m.has_tables:
            raise ValueError(
                f"embedding.serve_dtype={serve_dtype}: {m.method_name} has no tables to serve quantized"
            )
        try:
            check_quantizable(m, serve_dtype)
        except NotQuantizable as e:
            raise ValueError(f"embedding.serve_dtype={serve_dtype}: {e}") from None
        served = m.serving_bytes(serve_dtype)
        if served <= target:
            return trial
        trial = max(2, int(trial * target / served * 0.999))
    raise ValueError(
        f"embedding.serve_dtype={serve_dtype}: no size of {m.method_name} fits the budget "
        f"{target} bytes at {serve_dtype} (the nearest served {served} bytes)"
    )


def build_model(cfg: ExperimentConfig, schema, device=None) -> nn.Module:
    entry = get_model(cfg.model.name)
    return entry.builder(cfg.model.knobs(), schema, embedding_factory(cfg.embedding, device), device=device)


def build_trainer(cfg: ExperimentConfig, schema, data_root: Path, ctx: DistContext, run_dir: Path | None, *,
                  for_training: bool = True,
                  extra_param_groups: Callable[[nn.Module], list[dict[str, Any]]] | None = None) -> Trainer:
    """Everything a :class:`Trainer` trains, built from the config: the model (seeded),
    its dataset statistics, the fused embedding optimizer, the sharded model, the dense
    optimizer (plus ``extra_param_groups(model)``, groups with their own settings), the
    evaluator and, ``for_training``, the training stream."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(cfg, schema)
    if isinstance(model, UsesDatasetStats):
        model.load_dataset_stats(data_root)  # e.g. id frequencies for DIN's mini-batch aware L2
    sizes = measure_sizes(model)
    attach_embedding_optimizer(model, cfg.train.embedding_optimizer, ctx.device.type)
    dmp = shard_model(TrainStep(model), cfg.sharding, ctx)
    inner = dmp.module.model  # the model object DMP wraps (its tables are now sharded)
    groups = extra_param_groups(inner) if extra_param_groups is not None else None
    optimizers = build_optimizers(dmp, inner, cfg.train.dense_optimizer, groups)
    evaluator = Evaluator(dmp, cfg, schema, data_root, ctx)
    data = TrainData(cfg, schema, data_root, ctx, run_dir) if for_training else None
    return Trainer(cfg, schema, data_root, ctx, run_dir, model=dmp, inner=inner, optimizers=optimizers,
                   sizes=sizes, evaluator=evaluator, data=data)
