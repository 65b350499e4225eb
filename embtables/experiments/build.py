"""From config sections to modules: the embedding factory a model builder receives, and
the model."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from embtables.embeddings import EmbeddingMethod, FeatureSpec, build
from embtables.embeddings.factory import MakeEmbedding
from embtables.experiments.config import EmbeddingSection, ExperimentConfig
from embtables.models import get_model


def embedding_factory(embedding_cfg: EmbeddingSection, device=None) -> MakeEmbedding:
    """A :class:`MakeEmbedding` bound to the ``embedding:`` section (method, dim, budget,
    dtype, knobs) and a device."""

    def make(features: Sequence[FeatureSpec], *, sequence: bool = False, method: str | None = None,
             dim: int | None = None, budget: float | int | str | None = None) -> EmbeddingMethod:
        method = method or embedding_cfg.method
        return build(
            list(features),
            method=method,
            dim=dim or embedding_cfg.dim,
            budget=embedding_cfg.budget if budget is None else budget,
            dtype=embedding_cfg.dtype,
            sequence=sequence,
            device=device,
            **embedding_cfg.module_knobs(method),
        )

    return make


def build_model(cfg: ExperimentConfig, schema, device=None) -> nn.Module:
    entry = get_model(cfg.model.name)
    return entry.builder(cfg.model.knobs(), schema, embedding_factory(cfg.embedding, device), device=device)
