"""`full`: one row per id, one table per feature: exactly a TorchRec EmbeddingBagCollection."""

from __future__ import annotations

import torch

from embtables.embeddings.base import EmbeddingMethod
from embtables.embeddings.budget import format_bytes
from embtables.embeddings.registry import register
from embtables.embeddings.spec import FeatureSpec


@register("full")
class FullEmbedding(EmbeddingMethod):
    def __init__(
        self,
        features: list[FeatureSpec],
        *,
        dim: int,
        budget_bytes: int | None = None,
        dtype: str = "fp32",
        sequence: bool = False,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(features, dim=dim, budget_bytes=budget_bytes, dtype=dtype, sequence=sequence, device=device)
        self._make_tables([(f"t_{f.name}", f.cardinality, dim, [f.name]) for f in self.features], device)
        if budget_bytes is not None and self.memory_bytes() > budget_bytes:
            raise ValueError(
                f"full: the full tables need {format_bytes(self.memory_bytes())}, over the budget "
                f"{format_bytes(budget_bytes)}; `full` cannot compress, so use a budget >= "
                f"{self.memory_bytes()} bytes or a compressing method (hash, qr, unified)"
            )
