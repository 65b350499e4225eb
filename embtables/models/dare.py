"""DARE (Feng et al. 2024, "Long-Sequence Recommendation Models Need Decoupled
Embeddings"): attention and representation use separate embedding modules for the
behaviour features, so the gradients of "which behaviours matter" and "what they
mean" stop fighting over one table.

* ``attention`` module (width ``attention_dim``, default ``embedding.dim``; method and
  budget overridable): the target and its history share this table; score
  ``s_j = <a_j, a_A> / sqrt(d_att)`` with d_att the concatenated attention width.
* ``representation`` module (``embedding`` section as is): the target and its history
  share this table; the interest is ``sum_j w_j r_j`` with ``w = softmax(s)`` over the
  history (or over its ``top_k`` highest-scoring behaviours: TWIN-style soft search for
  long histories; rows with fewer than k behaviours use all of theirs, never padding).
* The MLP sees ``[context, r_A, interest, r_A * interest]`` (``target_product``: DARE's
  target-aware representation).

Each embedding module is any embtables method (``full``, ``hash``, ``qr``, ...). DARE
is a model option, not an embedding method: YAML knobs live under ``model.dare``.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embtables.embeddings.factory import MakeEmbedding
from embtables.models.din import build_behavior_embeddings
from embtables.models.registry import register_model
from embtables.models.segment_ops import (
    GatherPlan,
    gather,
    offsets_from_lengths,
    segment_softmax,
    segment_sum,
)
from embtables.models.seq_common import BehaviorModel, SeqModelConfig, head_mlp, pad_jagged


class DAREConfig(SeqModelConfig):
    attention_dim: int | None = Field(
        None, ge=4, description="attention embedding width (default embedding.dim)")
    attention_method: str | None = Field(
        None, description="embedding method of the attention module (default embedding.method)")
    attention_budget: float | int | str | None = Field(
        None, description="budget of the attention module (default embedding.budget)")
    attention_share: float | None = Field(
        None, gt=0, lt=1, description="DARE at DIN's memory: the attention module gets this share of "
        "embedding.budget and the representation module the rest (both in bytes of the behaviour "
        "tables' full size at embedding.dim); null: each module gets a whole budget")
    top_k: int | None = Field(
        None, ge=1, description="aggregate only the k highest-scoring behaviours (soft search)")
    target_product: bool = True

    @model_validator(mode="after")
    def _one_way_to_size_attention(self) -> DAREConfig:
        if self.attention_share is not None and self.attention_budget is not None:
            raise ValueError("attention_budget and attention_share exclude each other (a share divides "
                             "embedding.budget between the two modules)")
        return self


class DARE(BehaviorModel):
    def __init__(self, schema, cfg: DAREConfig, attention: nn.Module, representation: nn.Module,
                 context: nn.Module | None) -> None:
        super().__init__(schema, cfg, context, representation.dim)
        self.attention_embedding = attention
        self.representation_embedding = representation
        nb = len(self.inputs.behavior)
        self.d_att = nb * attention.dim
        d = nb * representation.dim
        self.top_k = cfg.top_k
        self.target_product = cfg.target_product
        n_ctx = len(self.inputs.context) * (context.dim if context is not None else 0)
        self.head = head_mlp(n_ctx + (3 if cfg.target_product else 2) * d + self.num_dense, cfg.mlp,
                             cfg.activation, cfg.dropout)

    def embedding_modules(self) -> dict[str, nn.Module]:
        mods = {"attention": self.attention_embedding, "representation": self.representation_embedding}
        if self.context_embedding is not None:
            mods["context"] = self.context_embedding
        return mods

    def scores(self, packed: KeyedJaggedTensor, lengths: torch.Tensor, b: int) -> torch.Tensor:
        """Attention logits of every history behaviour (jagged, ``[N]``): the attention path."""
        target, hist = self.lookup(self.attention_embedding, packed, self.inputs.behavior, b)
        rows = GatherPlan.from_lengths(lengths, hist.shape[0])
        return (hist * gather(target, rows)).sum(1) / math.sqrt(self.d_att)

    def select(self, scores: torch.Tensor, lengths: torch.Tensor, b: int):
        """Weights of the aggregated behaviours: ``(flat index [M] into the jagged history,
        or None for all of them in order; their rows; weight [M])``. With ``top_k``: the k
        best of each row among its real behaviours (all of them when it has fewer than k)."""
        n = scores.shape[0]
        max_len = int(lengths.max()) if b else 0
        if self.top_k is None or self.top_k >= max_len:
            rows = GatherPlan.from_lengths(lengths, n)
            return None, rows, segment_softmax(scores, rows)
        k = self.top_k
        padded = pad_jagged(scores, lengths, max_len, pad=float("-inf"))  # padding can never win
        top, pos = padded.topk(k, dim=1)  # [B, k]
        valid = pos < lengths.unsqueeze(1)  # False only where a row has < k behaviours
        flat = (offsets_from_lengths(lengths)[:-1].unsqueeze(1) + pos)[valid]
        rows = GatherPlan.from_lengths(valid.sum(1))  # row-major: the selected values are in row order
        return flat, rows, segment_softmax(top[valid], rows)

    def interest(self, packed: KeyedJaggedTensor, lengths: torch.Tensor, b: int):
        s = self.scores(packed, lengths, b)
        target, hist = self.lookup(self.representation_embedding, packed, self.inputs.behavior, b)
        flat, rows, w = self.select(s, lengths, b)
        pooled = segment_sum((hist if flat is None else hist[flat]) * w.unsqueeze(1), rows)
        if self.target_product:
            pooled = torch.cat([pooled, pooled * target], dim=1)
        return target, pooled


@register_model("dare", DAREConfig)
def build_dare(cfg: DAREConfig, schema, make_embedding: MakeEmbedding, device=None) -> DARE:
    share = cfg.attention_share
    rep, context = build_behavior_embeddings(schema, make_embedding, cfg,
                                             share=None if share is None else 1 - share)
    att, _ = build_behavior_embeddings(schema, make_embedding, cfg, method=cfg.attention_method,
                                       dim=cfg.attention_dim, budget=cfg.attention_budget, share=share,
                                       context=False)
    model = DARE(schema, cfg, att, rep, context)
    return model.to(device) if device is not None else model
