"""DeepFM (Guo et al. 2017): a factorization machine and a deep MLP side by side on the
same field embeddings, their logits summed.

    logit = b + sum_i <w_i, e_i> + sum_{i<j} <e_i, e_j> + MLP([dense, e_1, ..., e_F])

The FM's second-order term uses the O(F * dim) identity
``0.5 * sum_k ((sum_i e_ik)^2 - sum_i e_ik^2)``. Its first-order weight of id x in field i
is ``<w_i, e_x>``: a projection of the shared embedding instead of a separate 1-wide table
(FBGEMM's tables are multiples of 4 wide, and a memory-budget comparison counts every
embedding byte in the one module). Dense features, if any, join the MLP input and a linear
term; they take no part in the FM.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embtables.embeddings import features_from_schema
from embtables.embeddings.factory import MakeEmbedding
from embtables.models.mlp import mlp
from embtables.models.registry import register_model


class DeepFMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    deep_mlp: list[int] = Field(
        default_factory=lambda: [400, 400, 400], description="hidden sizes of the deep part"
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="dropout after each hidden layer of the deep part"
    )


class DeepFM(nn.Module):
    def __init__(self, embedding: nn.Module, num_dense: int, cfg: DeepFMConfig) -> None:
        super().__init__()
        self.embedding = embedding
        self.num_fields = len(embedding.feature_names)
        self.dim = embedding.dim
        width = self.num_fields * self.dim
        # Per-field first-order projection (one `dim`-vector per field), as a grouped linear map.
        self.first_order = nn.Parameter(torch.zeros(self.num_fields, self.dim))
        self.dense_linear = nn.Linear(num_dense, 1) if num_dense else None
        self.bias = nn.Parameter(torch.zeros(1))
        self.deep = nn.Sequential(
            mlp(num_dense + width, cfg.deep_mlp, dropout=cfg.dropout),
            nn.Linear(cfg.deep_mlp[-1] if cfg.deep_mlp else num_dense + width, 1),
        )

    def embedding_modules(self) -> dict[str, nn.Module]:
        return {"embedding": self.embedding}

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        flat = self.embedding(sparse).values()
        e = flat.view(-1, self.num_fields, self.dim)
        first = (e * self.first_order).sum((1, 2))
        second = 0.5 * (e.sum(1).pow(2) - e.pow(2).sum(1)).sum(1)
        logit = self.bias + first + second + self.deep(torch.cat([dense, flat], dim=1)).squeeze(-1)
        if self.dense_linear is not None:
            logit = logit + self.dense_linear(dense).squeeze(-1)
        return logit


@register_model("deepfm", DeepFMConfig)
def build_deepfm(cfg: DeepFMConfig, schema, make_embedding: MakeEmbedding, device=None) -> DeepFM:
    return DeepFM(make_embedding(features_from_schema(schema)), len(schema.dense), cfg)
