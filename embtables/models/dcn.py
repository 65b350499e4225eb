"""DCN-v2 (Wang et al. 2021): cross network (optionally low-rank) stacked with a deep MLP
over [dense, all embeddings]."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embtables.embeddings import features_from_schema
from embtables.embeddings.factory import MakeEmbedding
from embtables.models.mlp import mlp
from embtables.models.registry import register_model


class DCNConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cross_layers: int = Field(3, ge=1)
    low_rank: int | None = Field(
        None, ge=1, description="rank of each cross layer's weight; None = full rank")
    deep_mlp: list[int] = Field(default_factory=lambda: [256, 128])
    structure: str = Field("stacked", pattern="^(stacked|parallel)$")


class CrossLayer(nn.Module):
    """x_{l+1} = x0 * (W x_l + b) + x_l, with W = U V^T when low-rank."""

    def __init__(self, d: int, rank: int | None) -> None:
        super().__init__()
        if rank is None:
            self.w: nn.Module = nn.Linear(d, d)
        else:
            self.w = nn.Sequential(nn.Linear(d, rank, bias=False), nn.Linear(rank, d))

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.w(x) + x


class DCNv2(nn.Module):
    def __init__(self, embedding: nn.Module, num_dense: int, cfg: DCNConfig) -> None:
        super().__init__()
        self.embedding = embedding
        d = num_dense + sum(embedding.output_dims())
        self.cross = nn.ModuleList([CrossLayer(d, cfg.low_rank) for _ in range(cfg.cross_layers)])
        self.structure = cfg.structure
        self.deep = mlp(d, cfg.deep_mlp)
        head_in = cfg.deep_mlp[-1] + (d if cfg.structure == "parallel" else 0)
        self.head = nn.Linear(head_in, 1)

    def embedding_modules(self) -> dict[str, nn.Module]:
        return {"embedding": self.embedding}

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        x0 = torch.cat([dense, self.embedding(sparse).values()], dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        if self.structure == "parallel":
            out = torch.cat([x, self.deep(x0)], dim=1)
        else:
            out = self.deep(x)
        return self.head(out).squeeze(-1)


@register_model("dcn", DCNConfig)
def build_dcn(cfg: DCNConfig, schema, make_embedding: MakeEmbedding, device=None) -> DCNv2:
    return DCNv2(make_embedding(features_from_schema(schema)), len(schema.dense), cfg)
