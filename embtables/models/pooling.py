"""The Embedding&MLP baseline of the DIN paper (``model.name: pool``): the same model as
DIN with the history summed or averaged instead of weighted by attention."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embtables.embeddings.factory import MakeEmbedding
from embtables.models.din import build_behavior_embeddings
from embtables.models.registry import register_model
from embtables.models.segment_ops import GatherPlan, segment_sum
from embtables.models.seq_common import BehaviorModel, SeqModelConfig, head_mlp


class PoolConfig(SeqModelConfig):
    pooling: Literal["sum", "mean"] = "sum"


class PoolModel(BehaviorModel):
    def __init__(self, schema, cfg: PoolConfig, behavior: nn.Module, context: nn.Module | None) -> None:
        super().__init__(schema, cfg, context, behavior.dim)
        self.behavior_embedding = behavior
        self.pooling = cfg.pooling
        d = len(self.inputs.behavior) * behavior.dim
        n_ctx = len(self.inputs.context) * (context.dim if context is not None else 0)
        self.head = head_mlp(n_ctx + 2 * d + self.num_dense, cfg.mlp, cfg.activation, cfg.dropout)

    def interest(self, packed: KeyedJaggedTensor, lengths: torch.Tensor, b: int):
        target, hist = self.lookup(self.behavior_embedding, packed, self.inputs.behavior, b)
        pooled = segment_sum(hist, GatherPlan.from_lengths(lengths, hist.shape[0]))
        if self.pooling == "mean":
            pooled = pooled / lengths.clamp(min=1).unsqueeze(1).to(pooled.dtype)
        return target, pooled


@register_model("pool", PoolConfig)
def build_pool(cfg: PoolConfig, schema, make_embedding: MakeEmbedding, device=None) -> PoolModel:
    behavior, context = build_behavior_embeddings(schema, make_embedding, cfg)
    model = PoolModel(schema, cfg, behavior, context)
    return model.to(device) if device is not None else model
