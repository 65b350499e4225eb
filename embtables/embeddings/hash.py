"""`hash`: the hashing trick. One table per feature; ids are hashed (feature-salted
splitmix64) into that table's rows. A feature whose vocabulary fits in its row share
keeps one row per id (identity map, collisionless)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embtables.embeddings.base import EmbeddingMethod, TableSpec, split_features
from embtables.embeddings.budget import DTYPE_BYTES, BudgetTooSmall, feature_weights, split_budget
from embtables.embeddings.hashing import hash_to_rows, salt
from embtables.embeddings.registry import Knobs, register
from embtables.embeddings.spec import FeatureSpec


class HashKnobs(Knobs):
    """``embedding.hash``."""

    rows: int | None = Field(None, ge=1, description="rows of every table; null: from the budget, and one "
                             "row per id without a budget")


@dataclass(frozen=True)
class HashPlan:
    rows: tuple[int, ...]          # rows per feature
    identity: tuple[bool, ...]     # True: rows == cardinality, id -> row (no collisions)
    dim: int
    bytes: int

    @property
    def num_parameters(self) -> int:
        return sum(self.rows) * self.dim


def plan_hash(
    features: list[FeatureSpec], dim: int, budget_bytes: int | None = None, dtype: str = "fp32",
    rows: int | None = None,
) -> HashPlan:
    """Pure sizing. ``rows`` caps every feature's table; else the budget is water-filled
    (budget.split_budget, weights sqrt(cardinality), each feature between 1 row and its
    vocabulary); no budget and no rows: one row per id (= ``full``)."""
    row_bytes = dim * DTYPE_BYTES[dtype]
    card = [f.cardinality for f in features]
    if rows is not None:
        if rows < 1:
            raise ValueError(f"hash: knob rows must be >= 1, got {rows}")
        r = [min(n, rows) for n in card]
    elif budget_bytes is None:
        r = list(card)
    else:
        minimum = len(features) * row_bytes
        if budget_bytes < minimum:
            raise BudgetTooSmall("hash", minimum, budget_bytes, "one row per feature")
        shares = split_budget(budget_bytes, feature_weights(card), [row_bytes] * len(card),
                              [n * row_bytes for n in card])
        r = [max(1, min(n, math.floor(s / row_bytes + 1e-9))) for s, n in zip(shares, card, strict=True)]
    nbytes = sum(r) * row_bytes
    if budget_bytes is not None and nbytes > budget_bytes:
        raise BudgetTooSmall("hash", len(features) * row_bytes, budget_bytes,
                             f"rows={rows} needs {nbytes} bytes; lower `rows` "
                             "or drop it to size from the budget")
    return HashPlan(tuple(r), tuple(x >= n for x, n in zip(r, card, strict=True)), dim, nbytes)


class HashRemap(nn.Module):
    """Raw ids -> rows of each feature's own table. Parameter-free, no buffers: salts
    and row counts are Python ints (one vectorised pass per feature, never per id)."""

    def __init__(self, names: list[str], rows: list[int], identity: list[bool],
                 weighted: bool = False) -> None:
        super().__init__()
        self.names, self.rows, self.identity = list(names), list(rows), list(identity)
        self.salts = [salt(n, 0) for n in names]
        self.weighted = weighted

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        vals, lens, ws, lpk = split_features(kjt, self.names, self.weighted)
        out = []
        for v, r, ident, s in zip(vals, self.rows, self.identity, self.salts, strict=True):
            out.append(v.to(torch.int64) % r if ident else hash_to_rows(v, s, r))  # `% r`: unbounded ids
        return KeyedJaggedTensor(
            keys=self.names, values=torch.cat(out), lengths=torch.cat(lens),
            weights=torch.cat(ws) if ws is not None else None, length_per_key=lpk,
        )


@register("hash", knobs=HashKnobs, plan=plan_hash)
class HashEmbedding(EmbeddingMethod):
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
        rows: int | None = None,
    ) -> None:
        super().__init__(features, dim=dim, budget_bytes=budget_bytes, dtype=dtype, sequence=sequence,
                         device=device, weighted=weighted)
        self.plan = plan_hash(self.features, dim, budget_bytes, dtype, rows=rows)
        self.remap = HashRemap(self.feature_names, list(self.plan.rows), list(self.plan.identity), weighted)
        self._make_tables([TableSpec(f"t_{f.name}", r, dim, (f.name,), pooling=f.pooling)
                           for f, r in zip(self.features, self.plan.rows, strict=True)], device)
