"""DLRM (Naumov et al. 2019): bottom MLP on dense features, pairwise dot interaction
between the dense vector and every sparse feature's embedding, top MLP."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embtables.embeddings import features_from_schema
from embtables.embeddings.factory import MakeEmbedding
from embtables.models.mlp import mlp
from embtables.models.registry import register_model


class DLRMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bottom_mlp: list[int] = Field(
        default_factory=lambda: [64, 32], description="last size is set to embedding.dim")
    top_mlp: list[int] = Field(default_factory=lambda: [128, 64])
    self_interaction: bool = False


class DLRM(nn.Module):
    def __init__(self, embedding: nn.Module, num_dense: int, cfg: DLRMConfig) -> None:
        super().__init__()
        self.embedding = embedding
        self.dim = embedding.dim
        self.num_sparse = len(embedding.feature_names)
        # The bottom MLP ends at the embedding width so the dense vector joins the dot product.
        self.bottom = mlp(num_dense, [*cfg.bottom_mlp, self.dim])
        n = self.num_sparse + 1
        rows, cols = torch.triu_indices(n, n, offset=0 if cfg.self_interaction else 1)
        # index_select on the flattened matrix: its backward is a cheap index_add, where
        # advanced indexing [:, rows, cols] backpropagates through a slow index_put.
        self.register_buffer("_pairs", rows * n + cols, persistent=False)
        self.top = mlp(self.dim + rows.numel(), [*cfg.top_mlp, 1], last_activation=False)

    def embedding_modules(self) -> dict[str, nn.Module]:
        return {"embedding": self.embedding}

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        d = self.bottom(dense)
        emb = self.embedding(sparse).values().view(-1, self.num_sparse, self.dim)
        x = torch.cat([d.unsqueeze(1), emb], dim=1)
        inter = torch.bmm(x, x.transpose(1, 2)).flatten(1).index_select(1, self._pairs)
        return self.top(torch.cat([d, inter], dim=1)).squeeze(-1)


@register_model("dlrm", DLRMConfig)
def build_dlrm(cfg: DLRMConfig, schema, make_embedding: MakeEmbedding, device=None) -> DLRM:
    return DLRM(make_embedding(features_from_schema(schema)), len(schema.dense), cfg)
