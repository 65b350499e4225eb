"""`mch`: TorchRec's managed-collision hashing (MCH) as a method, the zero-collision baseline.

Each feature gets a ``MCHManagedCollisionModule`` with ``zch_size`` slots in front of its
own table: an admitted raw id owns a row exclusively; ids not (yet) admitted share the
last row. Admission and eviction happen only in *training mode*, every
``eviction_interval`` forward calls, from the ids seen since (LFU: most frequent win;
LRU: most recent). In eval mode the mapping is frozen. So, unlike the other methods:

- the remap has state: its buffers (sorted raw ids, slot mapping, eviction metadata and a
  1025-entry segment table per feature) count in ``memory_bytes()`` and in the budget;
  its history buffer (~1.25 x ids per batch x eviction_interval x 8 bytes, allocated at the
  first training batch) depends on the batch size, so it is counted once it exists but is
  not part of the up-front sizing;
- a freshly built module maps every id to the shared row until it has seen a training batch;
- evicted rows are re-initialised here (TorchRec 1.8's MC-EBC leaves them as they were);
- sharding: DMP of ``.tables`` alone leaves the MCH state replicated on every rank (exact,
  but not memory-sharded); TorchRec's own sharded MC-EBC shards it row-wise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torchrec.modules.mc_modules import (
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from embtables.embeddings.base import EmbeddingMethod, TableSpec, select_features
from embtables.embeddings.budget import DTYPE_BYTES, BudgetTooSmall, feature_weights, split_budget
from embtables.embeddings.registry import Knobs, register
from embtables.embeddings.spec import FeatureSpec

POLICIES = {"lfu": LFU_EvictionPolicy, "lru": LRU_EvictionPolicy}
EvictionPolicy = Literal["lfu", "lru"]


class MCHKnobs(Knobs):
    """``embedding.mch``."""

    SIZING = ("rows",)

    rows: int | None = Field(None, ge=1, description="zch_size per feature; null: from the budget, "
                             "cardinality + 1 without a budget")
    eviction_policy: EvictionPolicy = Field("lfu", description="lfu: the most frequent ids win; lru: the "
                                            "most recent")
    eviction_interval: int = Field(1, ge=1, description="forward calls between admissions/evictions")
STATE_BYTES_PER_ROW = 3 * 8       # sorted raw id, slot mapping, one eviction-metadata int64
FIXED_BYTES_PER_FEATURE = (1025 + 3) * 8  # output segments table, iteration counter, slots, delimiter
MIN_ROWS = 2                      # one admitted id + the shared row for the rest


@dataclass(frozen=True)
class MCHPlan:
    rows: tuple[int, ...]  # zch_size per feature (the last row is the shared miss row)
    dim: int
    bytes: int

    @property
    def num_parameters(self) -> int:
        return sum(self.rows) * self.dim


def plan_mch(
    features: list[FeatureSpec], dim: int, budget_bytes: int | None = None, dtype: str = "fp32",
    rows: int | None = None,
) -> MCHPlan:
    """Pure sizing: per feature ``rows`` (capped at cardinality + 1: every id plus the miss
    row), else water-filled from the budget counting table row + MCH state per slot and
    the fixed per-feature state, else cardinality + 1."""
    row_b = dim * DTYPE_BYTES[dtype] + STATE_BYTES_PER_ROW
    card = [f.cardinality for f in features]
    if rows is not None:
        if rows < MIN_ROWS:
            raise ValueError(f"mch: knob rows must be >= {MIN_ROWS}, got {rows}")
        r = [min(n + 1, rows) for n in card]
    elif budget_bytes is None:
        r = [n + 1 for n in card]
    else:
        mins = [MIN_ROWS * row_b + FIXED_BYTES_PER_FEATURE] * len(card)
        if sum(mins) > budget_bytes:
            raise BudgetTooSmall("mch", sum(mins), budget_bytes,
                                 f"{MIN_ROWS} slots per feature plus "
                                 f"{FIXED_BYTES_PER_FEATURE} bytes of MCH state")
        # The fixed per-feature state comes off the top; slots are water-filled.
        slots = budget_bytes - len(card) * FIXED_BYTES_PER_FEATURE
        shares = split_budget(slots, feature_weights(card), [MIN_ROWS * row_b] * len(card),
                              [(n + 1) * row_b for n in card])
        r = [max(MIN_ROWS, min(n + 1, math.floor(s / row_b + 1e-9)))
             for s, n in zip(shares, card, strict=True)]
    nbytes = sum(x * row_b + FIXED_BYTES_PER_FEATURE for x in r)
    if budget_bytes is not None and nbytes > budget_bytes:
        raise BudgetTooSmall("mch", len(card) * (MIN_ROWS * row_b + FIXED_BYTES_PER_FEATURE), budget_bytes,
                             f"rows={rows} needs {nbytes} bytes")
    return MCHPlan(tuple(r), dim, nbytes)


class _MCHModule(MCHManagedCollisionModule):
    """TorchRec's module (its state, admission and eviction untouched) with a cheaper
    lookup: one ``torch.where`` instead of TorchRec 1.8's two boolean-mask writes, which
    cost ~6 ms of a ~50 ms training step at 4096 x 26 ids. Same result (tested against
    TorchRec's own remap). TorchRec's sharded MC-EBC rebuilds plain modules, which is fine."""

    def remap(self, features: dict[str, JaggedTensor], mutate_miss_lengths: bool = True,
              write_weights: torch.Tensor | None = None) -> dict[str, JaggedTensor]:
        sorted_ids, mapping = self._mch_sorted_raw_ids, self._mch_remapped_ids_mapping
        miss = self._output_global_offset + self._zch_size - 1  # the shared row of ids not admitted
        out = {}
        for name, f in features.items():
            v = f.values()
            pos = torch.searchsorted(sorted_ids[:-1], v)
            ids = torch.where(sorted_ids[pos] == v, mapping[pos], miss)
            out[name] = JaggedTensor(values=ids, lengths=f.lengths(), offsets=f.offsets(),
                                     weights=f.weights_or_none())
        return out


class MCHRemap(nn.Module):
    """Canonical feature order, then TorchRec's ManagedCollisionCollection (no parameters;
    its buffers are the admitted-id state)."""

    def __init__(self, names: list[str], mcc: ManagedCollisionCollection) -> None:
        super().__init__()
        self.names = names
        self.mcc = mcc

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            # (TorchRec's train pipeline traces the model with this remap as a leaf: not here.)
            raise NotImplementedError(
                "mch cannot be fx-symbolically traced: TorchRec's managed-collision remap "
                "admits and evicts ids with data-dependent Python control flow; "
                "torch.export (eval mode) works")
        return self.mcc(select_features(kjt, self.names))


@register("mch", knobs=MCHKnobs, plan=plan_mch)
class MCHEmbedding(EmbeddingMethod):
    # Admission/eviction mutate the remap's state in forward: not pipelineable (it must not
    # run a batch ahead), and the state is per process, so more than one rank is refused.
    stateful_remap = True
    supports_multi_rank = False
    bounded_ids = False  # raw ids by design: any id >= 0
    fx_traceable = False  # TorchRec's MCH remap is not symbolically traceable (export works)

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
        eviction_policy: EvictionPolicy = "lfu",
        eviction_interval: int = 1,
    ) -> None:
        super().__init__(features, dim=dim, budget_bytes=budget_bytes, dtype=dtype, sequence=sequence,
                         device=device, weighted=weighted)
        if eviction_policy not in POLICIES:
            raise ValueError(f"mch: knob eviction_policy must be one of {sorted(POLICIES)}, "
                             f"got {eviction_policy!r}")
        if eviction_interval < 1:
            raise ValueError(f"mch: knob eviction_interval must be >= 1, got {eviction_interval}")
        self.plan = plan_mch(self.features, dim, budget_bytes, dtype, rows=rows)
        self._make_tables([TableSpec(f"t_{f.name}", r, dim, (f.name,), pooling=f.pooling)
                           for f, r in zip(self.features, self.plan.rows, strict=True)], device)
        dev = device or torch.device("cpu")
        modules = {
            f"t_{f.name}": _MCHModule(
                zch_size=r, device=dev, eviction_policy=POLICIES[eviction_policy](),
                eviction_interval=eviction_interval, input_hash_size=2**63 - 1, name=f"t_{f.name}")
            for f, r in zip(self.features, self.plan.rows, strict=True)
        }
        self.remap = MCHRemap(self.feature_names, ManagedCollisionCollection(modules, self.table_configs()))

    def buffer_bytes(self) -> int:
        # The LFU history accumulator is a plain attribute, not a registered buffer.
        extra = sum(m._history_accumulator.numel() * 8
                    for m in self.remap.mcc._managed_collision_modules.values()
                    if hasattr(m, "_history_accumulator"))
        return super().buffer_bytes() + extra

    def before_lookup(self) -> None:
        # The remap just admitted/evicted ids; reset the evicted rows before they are read.
        if self.training:
            self._reset_evicted()

    @torch.no_grad()
    def _reset_evicted(self) -> None:
        bags = getattr(self.tables, "embedding_bags", None) or self.tables.embeddings
        for table, idx in self.remap.mcc.evict().items():
            if idx is not None and idx.numel():
                w = bags[table].weight
                bound = math.sqrt(1 / w.shape[0])
                w[idx.to(w.device).long()] = torch.empty(idx.numel(), w.shape[1], dtype=w.dtype,
                                                         device=w.device).uniform_(-bound, bound)
