"""`full`: one row per id, one table per feature: exactly a TorchRec EmbeddingBagCollection."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from embtables.embeddings.base import EmbeddingMethod
from embtables.embeddings.budget import DTYPE_BYTES, BudgetTooSmall
from embtables.embeddings.registry import register
from embtables.embeddings.spec import FeatureSpec


@dataclass(frozen=True)
class FullPlan:
    rows: tuple[int, ...]
    dim: int
    bytes: int

    @property
    def num_parameters(self) -> int:
        return sum(self.rows) * self.dim


def plan_full(features: list[FeatureSpec], dim: int, budget_bytes: int | None = None, dtype: str = "fp32") -> FullPlan:
    """Pure sizing: cardinality rows x dim per feature; errors if over the budget."""
    rows = tuple(f.cardinality for f in features)
    nbytes = sum(rows) * dim * DTYPE_BYTES[dtype]
    if budget_bytes is not None and nbytes > budget_bytes:
        raise BudgetTooSmall("full", nbytes, budget_bytes,
                             "`full` cannot compress; use a compressing method (hash, qr, unified, mch)")
    return FullPlan(rows, dim, nbytes)


@register("full")
class FullEmbedding(EmbeddingMethod):
    plan_fn = staticmethod(plan_full)  # pure sizing: registry.plan(...)

    def __init__(
        self,
        features: list[FeatureSpec],
        *,
        dim: int,
        budget_bytes: int | None = None,
        dtype: str = "fp32",
        sequence: bool = False,
        device: torch.device | None = None,
        weighted: bool = False,
    ) -> None:
        super().__init__(features, dim=dim, budget_bytes=budget_bytes, dtype=dtype, sequence=sequence,
                         device=device, weighted=weighted)
        unbounded = [f.name for f in self.features if not f.bounded]
        if unbounded:
            raise ValueError(f"full: features {unbounded} have unbounded ids (bounded=False, raw-mode data); a "
                             "one-row-per-id table needs ids in [0, cardinality): use a hashing method")
        self.plan = plan_full(self.features, dim, budget_bytes, dtype)
        self._make_tables(
            [(f"t_{f.name}", f.cardinality, dim, [f.name], None, f.pooling) for f in self.features], device)
