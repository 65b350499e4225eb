"""DIN (Zhou et al. 2018, Deep Interest Network): a local activation unit weighs each
history behaviour by its relevance to the target, and the weighted sum is the user's
interest for that target.

Activation unit on ``[e_j, v_A, e_j - v_A, e_j * v_A]`` -> ``attention_hidden`` (36)
-> 1, weights unnormalised as in the paper (``softmax: true`` normalises them within
each history). The unit runs on the jagged history values only (``[N, D]``, N = sum of
history lengths), never on padding, so padding contributes exactly nothing, and Dice's
batch statistics are over real behaviours. The first linear layer is applied in its
split form ``(W_e + W_d) e_j + (W_v - W_d) v_A + W_p (e_j * v_A)``, which is the same
function as one Linear on the concatenation but computes the target part once per row
instead of once per behaviour. PReLU in the unit by default (Dice optional, as in the
paper's Fig. 2). Output MLP 200-80 with Dice (PReLU/ReLU optional);
mini-batch aware L2 through :meth:`regularization_loss` (see seq_common).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embtables.embeddings.factory import MakeEmbedding
from embtables.models.registry import register_model
from embtables.models.segment_ops import GatherPlan, gather, segment_softmax, segment_sum
from embtables.models.seq_common import (
    BehaviorInputs,
    BehaviorModel,
    SeqModelConfig,
    activation,
    head_mlp,
)


class DINConfig(SeqModelConfig):
    attention_hidden: int = Field(36, ge=1)
    # PReLU in the activation unit, as in the paper's Fig. 2 (PReLU/Dice); Dice stays the
    # output MLP's default. Dice here normalises every history position (~80k x 36 per
    # batch): a ~20% slower step on 2 CPU cores for the same AUC on ml-100k.
    attention_activation: Literal["dice", "prelu", "relu", "sigmoid"] = "prelu"
    softmax: bool = Field(False, description="normalise attention weights per history (paper: unnormalised)")


class ActivationUnit(nn.Module):
    """``a(e_j, v_A)`` on jagged histories: ``keys [N, D]``, ``query [B, D]``, ``rows``
    the target row of each behaviour."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.dim = dim
        self.fc1 = nn.Linear(4 * dim, hidden)  # on [e, v, e - v, e * v]
        self.act = nn.Sigmoid() if act == "sigmoid" else activation(act, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, keys: torch.Tensor, query: torch.Tensor, rows: GatherPlan) -> torch.Tensor:
        d = self.dim
        w_e, w_v, w_d, w_p = self.fc1.weight.split(d, dim=1)
        # per target row once: bias + (W_v - W_d) v_A; then per behaviour two matmuls
        h_q = torch.addmm(self.fc1.bias, query, (w_v - w_d).t())
        q_rows = gather(query, rows)
        h = torch.addmm(gather(h_q, rows), keys, (w_e + w_d).t())
        h = torch.addmm(h, keys * q_rows, w_p.t())
        return self.fc2(self.act(h)).squeeze(-1)


class DIN(BehaviorModel):
    def __init__(self, schema, cfg: DINConfig, behavior: nn.Module, context: nn.Module | None) -> None:
        super().__init__(schema, cfg, context, behavior.dim)
        self.behavior_embedding = behavior
        nb = len(self.inputs.behavior)
        d = nb * behavior.dim
        self.unit = ActivationUnit(d, cfg.attention_hidden, cfg.attention_activation)
        self.softmax = cfg.softmax
        n_ctx = len(self.inputs.context) * (context.dim if context is not None else 0)
        self.head = head_mlp(n_ctx + 2 * d + self.num_dense, cfg.mlp, cfg.activation, cfg.dropout)

    def attention(self, packed: KeyedJaggedTensor, lengths: torch.Tensor, b: int):
        """-> (target [B, D], history [N, D], rows of the history, weights [N])."""
        target, hist = self.lookup(self.behavior_embedding, packed, self.inputs.behavior, b)
        rows = GatherPlan.from_lengths(lengths, hist.shape[0])
        if hist.shape[0] == 0:
            return target, hist, rows, hist.new_zeros(0)
        w = self.unit(hist, target, rows)
        if self.softmax:
            w = segment_softmax(w, rows)
        return target, hist, rows, w

    def interest(self, packed: KeyedJaggedTensor, lengths: torch.Tensor, b: int):
        target, hist, rows, w = self.attention(packed, lengths, b)
        return target, segment_sum(hist * w.unsqueeze(1), rows)


def build_behavior_embeddings(schema, make_embedding: MakeEmbedding, inputs_cfg: SeqModelConfig, *,
                              method=None, dim=None, budget=None, share=None, context: bool = True):
    """(behaviour sequence module over the target features, pooled context module or None)."""
    inputs = BehaviorInputs(schema, inputs_cfg.behavior_features, inputs_cfg.context_features,
                            inputs_cfg.padding_id)
    behavior = make_embedding(inputs.behavior_specs, sequence=True, method=method, dim=dim, budget=budget,
                              share=share)
    context = make_embedding(inputs.context_specs) if inputs.context_specs and context else None
    return behavior, context


@register_model("din", DINConfig)
def build_din(cfg: DINConfig, schema, make_embedding: MakeEmbedding, device=None) -> DIN:
    behavior, context = build_behavior_embeddings(schema, make_embedding, cfg)
    model = DIN(schema, cfg, behavior, context)
    return model.to(device) if device is not None else model
