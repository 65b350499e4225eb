"""`dhe`: Deep Hash Embedding (Kang et al., KDD 2021). No table at all.

An id is encoded by k hashes (default 1,024) into a dense vector with entries uniform in
[-1, 1], and one MLP (shared by every feature; the feature enters through its salt)
decodes it to ``dim``. Memory is the MLP's weights, whatever the vocabulary.

The encoding: the id is first mixed with the feature's salt (x = splitmix64(id ^
salt(feature))), then hash j is multiply-add-shift universal hashing (Dietzfelbinger et
al. 1997) h_j(x) = ((a_j x + b_j) mod 2^64) >> 40, i.e. the top 24 bits, in [0, M) with
M = 2^24, and e_j = 2 h_j / (M - 1) - 1. The paper uses ((a x + b) mod p) mod m with
m = 10^6; the shift form needs no integer division (7x faster on CPU, where the encoding
is a large share of DHE's time) and M = 2^24 values stay exact in fp32. (a_j odd, b_j)
come from splitmix64 of j: fixed constants, so the encoding is identical across
processes and releases (tests pin golden values). They are recomputed per call (a
k-element splitmix64, microseconds), so the module holds nothing but the MLP.

The declared exception to remap -> TorchRec tables -> combine (DESIGN.md): all the
parameters are dense and data-parallel (DDP under DistributedModelParallel), so there is
nothing for the planner to shard. The MLP is not linear, so ids are decoded one by one
and then pooled; a batch's distinct keys are decoded once each (the same function, a
fraction of the compute).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from embtables.embeddings.base import EmbeddingMethod, split_features
from embtables.embeddings.budget import BudgetTooSmall
from embtables.embeddings.hashing import MASK64, hash_ids, mix64, mix64_int, salt
from embtables.embeddings.registry import Knobs, register
from embtables.embeddings.spec import FeatureSpec
from embtables.embeddings.tt import pool_per_id

SHIFT = 40  # keep the top 64 - 40 = 24 bits of a_j x + b_j
M = 2**24  # values per hash
PARAM_BYTES = 4  # the MLP is fp32


class DHEKnobs(Knobs):
    """``embedding.dhe``."""

    hashes: int = Field(1024, ge=1, description="k, the width of the dense hash encoding")
    hidden: int | None = Field(None, ge=1, description="width of the hidden layers; null: the widest that "
                               "fits the budget, at most max_hidden")
    layers: int = Field(2, ge=1, description="hidden layers of the decoder MLP")
    max_hidden: int = Field(256, ge=1, description="the widest MLP the budget may buy (compute per id grows "
                            "as hashes*hidden + hidden^2)")


def _int64(u: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits."""
    u &= MASK64
    return u - (1 << 64) if u >> 63 else u


def hash_constants(k: int) -> tuple[list[int], list[int]]:
    """(a_j, b_j) of the k multiply-add-shift hashes, as signed int64: a_j odd."""
    a = [_int64(mix64_int(2 * j + 1) | 1) for j in range(k)]
    b = [_int64(mix64_int(2 * j + 2)) for j in range(k)]
    return a, b


def mlp_parameters(hashes: int, hidden: int, layers: int, dim: int) -> int:
    return hashes * hidden + hidden + (layers - 1) * (hidden * hidden + hidden) + hidden * dim + dim


@dataclass(frozen=True)
class DHEPlan:
    hashes: int
    hidden: int
    layers: int
    dim: int
    bytes: int  # the MLP's weights

    @property
    def num_parameters(self) -> int:
        return mlp_parameters(self.hashes, self.hidden, self.layers, self.dim)


def plan_dhe(
    features: list[FeatureSpec],
    dim: int,
    budget_bytes: int | None = None,
    dtype: str = "fp32",
    hashes: int = 1024,
    hidden: int | None = None,
    layers: int = 2,
    max_hidden: int = 256,
) -> DHEPlan:
    """Pure sizing. ``hidden`` fixes the MLP's width; else the widest MLP (``layers`` hidden
    layers) that fits the budget, at most ``max_hidden`` (compute per id grows as
    hashes*hidden + hidden^2: a larger budget buys nothing but time); no budget: max_hidden."""
    if dtype != "fp32":
        raise ValueError(
            f"dhe: embedding.dtype={dtype!r} is not supported; DHE holds no table, only a dense fp32 "
            "MLP (use dtype fp32)"
        )
    for name, v in (("hashes", hashes), ("layers", layers), ("max_hidden", max_hidden)):
        if v < 1:
            raise ValueError(f"dhe: knob {name} must be >= 1, got {v}")

    def nbytes(h: int) -> int:
        return mlp_parameters(hashes, h, layers, dim) * PARAM_BYTES

    if hidden is not None:
        if hidden < 1:
            raise ValueError(f"dhe: knob hidden must be >= 1, got {hidden}")
        if budget_bytes is not None and nbytes(hidden) > budget_bytes:
            raise BudgetTooSmall(
                "dhe",
                nbytes(1),
                budget_bytes,
                f"hidden={hidden} needs {nbytes(hidden)} bytes; lower `hidden` or drop it",
            )
        return DHEPlan(hashes, hidden, layers, dim, nbytes(hidden))
    if budget_bytes is None:
        return DHEPlan(hashes, max_hidden, layers, dim, nbytes(max_hidden))
    if nbytes(1) > budget_bytes:
        raise BudgetTooSmall("dhe", nbytes(1), budget_bytes, f"an MLP {hashes} -> 1 -> {dim}")
    lo, hi = 1, max_hidden  # nbytes is increasing in h
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if nbytes(mid) <= budget_bytes else (lo, mid - 1)
    return DHEPlan(hashes, lo, layers, dim, nbytes(lo))


class DHEEncoder(nn.Module):
    """Ids of one feature -> [N, hashes] dense hash encoding in [-1, 1]. No state."""

    def __init__(self, hashes: int) -> None:
        super().__init__()
        self.hashes = hashes

    def forward(self, ids: torch.Tensor, salt_value: int) -> torch.Tensor:
        return self.encode(hash_ids(ids.to(torch.int64), salt_value))

    def encode(self, keys: torch.Tensor) -> torch.Tensor:
        """Salted, mixed int64 keys (``hash_ids``) -> their [N, hashes] encodings."""
        j = torch.arange(self.hashes, dtype=torch.int64, device=keys.device)
        a, b = mix64(2 * j + 1) | 1, mix64(2 * j + 2)  # = hash_constants(hashes)
        h = keys.unsqueeze(1) * a  # int64 products wrap mod 2^64
        h += b
        h >>= SHIFT  # arithmetic shift; the mask makes it the logical one
        h &= M - 1
        return h.float().mul_(2.0 / (M - 1)).sub_(1.0)


@register("dhe", knobs=DHEKnobs, plan=plan_dhe)
class DHEEmbedding(EmbeddingMethod):
    has_tables = False  # dense and data-parallel only: nothing for TorchRec's planner to shard

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
        hashes: int = 1024,
        hidden: int | None = None,
        layers: int = 2,
        max_hidden: int = 256,
    ) -> None:
        super().__init__(features, dim=dim, budget_bytes=budget_bytes, dtype=dtype, sequence=sequence,
                         device=device, weighted=weighted)
        self.plan = p = plan_dhe(
            self.features,
            dim,
            budget_bytes,
            dtype,
            hashes=hashes,
            hidden=hidden,
            layers=layers,
            max_hidden=max_hidden,
        )
        self.encoder = DHEEncoder(p.hashes)  # the remap stays the identity: lookup() encodes
        self.salts = [salt(f.name, 0) for f in self.features]
        mods: list[nn.Module] = []
        width = p.hashes
        for _ in range(p.layers):
            mods += [nn.Linear(width, p.hidden, device=device), nn.Mish()]
            width = p.hidden
        mods.append(nn.Linear(width, dim, device=device))
        self.mlp = nn.Sequential(*mods)

    @torch.no_grad()
    def scale_init(self, scale: float) -> None:
        """``embedding.init_scale``: the decoder's last (linear) layer, so every vector scales."""
        last = self.mlp[-1]
        last.weight.mul_(scale)
        last.bias.mul_(scale)

    # ---- no TorchRec tables: hashes -> MLP -> pool ---------------------------------------
    def feature_tables(self) -> dict[str, list[str]]:
        """Every logical feature maps to no physical table (planner constraints: none)."""
        return {n: [] for n in self.feature_names}

    def lookup(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """Per-id vectors [N, dim], feature by feature in the module's order."""
        vals, _, _, _ = split_features(kjt, self.feature_names, False)
        keys = torch.cat([hash_ids(vals[i], s) for i, s in enumerate(self.salts)])
        if torch.compiler.is_compiling() or torch.jit.is_scripting():
            # torch.export / compile: a data-dependent number of rows; decode every id
            return self.mlp(self.encoder.encode(keys))
        # An id's vector depends on its key alone, and a batch repeats keys (popular ids,
        # small vocabularies): decoding each distinct key once is the same function, and its
        # gradient sums the repeats (index_select's backward) as the per-id decode would.
        # fx records these ops as they are, so a traced graph computes exactly this.
        unique = torch.unique(keys, return_inverse=True)
        return self.mlp(self.encoder.encode(unique[0])).index_select(0, unique[1])

    def combine(self, vec: torch.Tensor, features: KeyedJaggedTensor) -> KeyedTensor:
        _, lens, ws, lpk = split_features(features, self.feature_names, self.weighted)
        nf, means = len(self.features), [f.pooling.value == "MEAN" for f in self.features]
        if len(set(means)) == 1:  # one embedding_bag over every feature's bags (feature-major)
            w = torch.cat(ws) if ws is not None else None
            pooled = pool_per_id(vec, torch.cat(lens), w, means[0])
            stride = lens[0].shape[0]
            return self._keyed(
                pooled.view(nf, stride, self.dim).transpose(0, 1).reshape(stride, nf * self.dim)
            )
        parts = torch.split(vec, lpk if lpk is not None else [ln.sum() for ln in lens])  # mixed pooling
        cols = [
            pool_per_id(parts[i], lens[i], ws[i] if ws is not None else None, means[i]) for i in range(nf)
        ]
        return self._keyed(torch.cat(cols, dim=1))

    def combine_sequence(self, vec: torch.Tensor, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        _, lens, _, lpk = split_features(features, self.feature_names, False)
        parts = torch.split(vec, lpk if lpk is not None else [ln.sum() for ln in lens])
        return {f.name: JaggedTensor(values=parts[i], lengths=lens[i]) for i, f in enumerate(self.features)}

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", hashes={self.plan.hashes}, hidden={self.plan.hidden}, layers={self.plan.layers}"
        )
