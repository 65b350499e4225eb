"""`full`: one row per id, one table per feature: exactly a TorchRec EmbeddingBagCollection."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from embtables.embeddings.base import EmbeddingMethod, TableSpec
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


def plan_full(features: list[FeatureSpec], dim: int, budget_bytes: int | None = None,
              dtype: str = "fp32") -> FullPlan:
    """Pure sizing: cardinality rows x dim per feature; errors if over the budget."""
    rows = tuple(f.cardinality for f in features)
    nbytes = sum(rows) * dim * DTYPE_BYTES[dtype]
    if budget_bytes is not None and nbytes > budget_bytes:
        raise BudgetTooSmall("full", nbytes, budget_bytes,
                             "`full` cannot compress; use a compressing method (hash, qr, unified, mch)")
    return FullPlan(rows, dim, nbytes)


@register("full", plan=plan_full)  # no knobs
class FullEmbedding(EmbeddingMethod):
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
            raise ValueError(f"full: features {unbounded} have unbounded ids (bounded=False, raw-mode data); "
                             "a one-row-per-id table needs ids in [0, cardinality): use a hashing method")
        self.plan = plan_full(self.features, dim, budget_bytes, dtype)
        names = [f.table or f"t_{f.name}" for f in self.features]
        if len(set(names)) != len(names):
            names = [f"t_{f.name}" for f in self.features]
        self._make_tables(
            [TableSpec(t, f.cardinality, dim, (f.name,), pooling=f.pooling)
             for t, f in zip(names, self.features, strict=True)],
            device)
        # Checkpoints interchange with a plain EmbeddingBagCollection / EmbeddingCollection:
        # state_dict() has its keys (``embedding_bags.<table>.weight``, no ``tables.``), and
        # load_state_dict() takes those as well as the ``tables.``-prefixed keys older
        # checkpoints hold.
        self._register_state_dict_hook(_as_torchrec_keys)
        self._register_load_state_dict_pre_hook(_from_torchrec_keys)


_TORCHREC_PARTS = ("embedding_bags.", "embeddings.")


def _as_torchrec_keys(module, state_dict, prefix, local_metadata):
    for k in [k for k in state_dict if k.startswith(prefix + "tables.")]:
        state_dict[prefix + k[len(prefix) + len("tables."):]] = state_dict.pop(k)
    return state_dict


def _from_torchrec_keys(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                        error_msgs):
    for k in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):].startswith(_TORCHREC_PARTS)]:
        state_dict[prefix + "tables." + k[len(prefix):]] = state_dict.pop(k)


def legacy_key(key: str) -> str | None:
    """The name ``key`` (a ``full`` table weight in TorchRec's layout) had in checkpoints
    written before the layout change, or None (sharding.checkpoint loads those)."""
    for part in _TORCHREC_PARTS:
        i = key.rfind("." + part)
        if i >= 0 or key.startswith(part):
            j = i + 1 if i >= 0 else 0
            return key[:j] + "tables." + key[j:]
    return None
