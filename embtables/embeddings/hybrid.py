"""`hybrid`: frequency-aware hot/cold tables (the idea behind DeepRec's adaptive
embedding and CAFE, Zhang et al., SIGMOD 2024).

The K most frequent ids of a feature get exact rows; every other id is hashed into C
shared cold rows. Both live in one TorchRec table of K + C rows, so each id costs one
lookup: rows [0, K) are the hot ids, rows [K, K + C) the hashed rest.

The hot set comes only from what the data says:

- ``frequency_ranked=True``: ids are numbered by descending frequency (the Criteo
  converter's ``vocab`` mode: 0 = OOV, 1 = missing, then kept values most frequent
  first), so the hot ids are simply ids < K and the remap is a comparison and an offset;
- ``counts=PATH``: per-id counts (a ``.npz`` with one array per feature name, indexed by
  id), the hot ids are the K most counted, kept as a sorted buffer (8 bytes per hot id,
  counted in ``memory_bytes()``) and found with ``searchsorted``.

Without either the method refuses: it never guesses a hot set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embtables.embeddings.base import EmbeddingMethod, TableSpec, split_features
from embtables.embeddings.budget import DTYPE_BYTES, BudgetTooSmall, feature_weights, split_budget
from embtables.embeddings.hashing import hash_to_rows, salt
from embtables.embeddings.registry import Knobs, register
from embtables.embeddings.spec import FeatureSpec


class HybridKnobs(Knobs):
    """``embedding.hybrid``: the hot ids come from ``frequency_ranked`` or ``counts`` (one of them)."""

    hot_fraction: float = Field(0.5, gt=0, lt=1, description="share of a feature's rows that are hot "
                                "(one exact row per hot id)")
    frequency_ranked: bool = Field(False, description="ids are numbered by descending frequency (the hot "
                                   "ids are the smallest)")
    counts: str | None = Field(None, description="path to per-id counts (.npz, one array per feature; "
                               "relative to the working directory)")

ID_BYTES = 8  # one int64 per hot id in the counts mode's id map


@dataclass(frozen=True)
class HybridPlan:
    hot: tuple[int, ...]  # K per feature (== cardinality: a plain table, no cold rows)
    cold: tuple[int, ...]  # C per feature
    cardinalities: tuple[int, ...]
    dim: int
    id_map: bool  # counts mode: a sorted hot-id buffer per feature
    bytes: int

    @property
    def num_parameters(self) -> int:
        return sum(k + c for k, c in zip(self.hot, self.cold, strict=True)) * self.dim


def _need_hot_source(frequency_ranked: bool, counts: str | None) -> None:
    if frequency_ranked and counts is not None:
        raise ValueError("hybrid: give knob frequency_ranked or knob counts, not both")
    if not frequency_ranked and counts is None:
        raise ValueError(
            "hybrid: the hot ids must come from the data: set knob frequency_ranked: true when ids are "
            "numbered by descending frequency (the Criteo converter's vocab mode), or knob counts: PATH to a "
            ".npz of per-id counts (one array per feature, indexed by id)"
        )


def plan_hybrid(
    features: list[FeatureSpec],
    dim: int,
    budget_bytes: int | None = None,
    dtype: str = "fp32",
    hot_fraction: float = 0.5,
    frequency_ranked: bool = False,
    counts: str | None = None,
) -> HybridPlan:
    """Pure sizing. Each feature's share of the budget is water-filled like `hash`'s
    (weights sqrt(n), between one hot and one cold row and a plain table); a feature
    whose share holds its vocabulary is a plain table, else ``hot_fraction`` of its rows
    are hot (exact) and the rest cold (hashed). No budget: plain tables (= ``full``)."""
    _need_hot_source(frequency_ranked, counts)
    if not 0.0 < hot_fraction < 1.0:
        raise ValueError(f"hybrid: knob hot_fraction must be in (0, 1), got {hot_fraction}")
    b = DTYPE_BYTES[dtype]
    row = dim * b
    hot_row = row + (ID_BYTES if counts is not None else 0)
    card = [f.cardinality for f in features]
    if budget_bytes is None:
        hot, cold = list(card), [0] * len(card)
    else:
        mins = [hot_row + row if n > 2 else n * row for n in card]
        if budget_bytes < sum(mins):
            raise BudgetTooSmall("hybrid", sum(mins), budget_bytes, "one hot and one cold row per feature")
        shares = split_budget(budget_bytes, feature_weights(card), mins, [n * row for n in card])
        hot, cold = [], []
        for n, s in zip(card, shares, strict=True):
            if s >= n * row - 1e-9 or n <= 2:
                hot.append(n)
                cold.append(0)
                continue
            # k hot rows (with their id) and c cold rows in s bytes, k = hot_fraction of k + c
            total = s / (hot_fraction * hot_row + (1 - hot_fraction) * row)
            k = max(1, min(n - 1, math.floor(hot_fraction * total + 1e-9)))
            c = max(1, min(n - k, math.floor((s - k * hot_row) / row + 1e-9)))
            hot.append(k)
            cold.append(c)
    nbytes = sum((k * (hot_row if c else row)) + c * row for k, c in zip(hot, cold, strict=True))
    return HybridPlan(tuple(hot), tuple(cold), tuple(card), dim, counts is not None, nbytes)


def load_counts(path: str, features: list[FeatureSpec]) -> dict[str, np.ndarray]:
    """Per-feature per-id counts from a .npz (one array per feature name, indexed by id)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"hybrid: counts file {p} not found (knob counts); `embtables data synth` writes "
            "id_counts.npz into the dataset directory (regenerate data made before it did)"
        )
    with np.load(p) as z:
        missing = [f.name for f in features if f.name not in z.files]
        if missing:
            raise ValueError(
                f"hybrid: counts file {p} has no array for feature(s) {missing}; it has {z.files}"
            )
        out = {f.name: np.asarray(z[f.name]) for f in features}
    for f in features:
        if out[f.name].ndim != 1 or out[f.name].shape[0] < f.cardinality:
            raise ValueError(
                f"hybrid: counts file {p}: array {f.name!r} must be 1-D with one count per id "
                f"(>= {f.cardinality} entries), got shape {out[f.name].shape}"
            )
    return out


def hot_ids(counts: np.ndarray, k: int) -> np.ndarray:
    """The k most counted ids (ties: smaller id first), sorted by id."""
    order = np.lexsort((np.arange(counts.shape[0]), -counts))
    return np.sort(order[:k]).astype(np.int64)


class HybridRemap(nn.Module):
    """Raw ids -> rows of each feature's table: hot ids to [0, K), the rest hashed into
    [K, K + C). Stateless; the counts mode's sorted hot ids are buffers."""

    def __init__(
        self, names: list[str], plan: HybridPlan, hot_sets: dict[str, np.ndarray] | None, weighted: bool
    ) -> None:
        super().__init__()
        self.names, self.weighted = list(names), weighted
        self.hot, self.cold, self.cards = list(plan.hot), list(plan.cold), list(plan.cardinalities)
        self.salts = [salt(n, 0) for n in names]
        self.ranked = hot_sets is None
        for i, n in enumerate(names):
            if hot_sets is not None and self.cold[i]:
                self.register_buffer(f"hot_{i}", torch.from_numpy(hot_sets[n]))

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        vals, lens, ws, lpk = split_features(kjt, self.names, self.weighted)
        out = []
        for i, v in enumerate(vals):
            v, k, c = v.to(torch.int64), self.hot[i], self.cold[i]
            if not c:  # a plain table; `% n` wraps ids of an unbounded feature
                out.append(v % self.cards[i])
                continue
            cold_row = k + hash_to_rows(v, self.salts[i], c)
            if self.ranked:
                out.append(torch.where(v < k, v, cold_row))
            else:
                ids = getattr(self, f"hot_{i}")
                pos = torch.searchsorted(ids, v).clamp(max=k - 1)
                out.append(torch.where(ids[pos] == v, pos, cold_row))
        return KeyedJaggedTensor(
            keys=self.names,
            values=torch.cat(out),
            lengths=torch.cat(lens),
            weights=torch.cat(ws) if ws is not None else None,
            length_per_key=lpk,
        )


@register("hybrid", knobs=HybridKnobs, plan=plan_hybrid)
class HybridEmbedding(EmbeddingMethod):
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
        hot_fraction: float = 0.5,
        frequency_ranked: bool = False,
        counts: str | None = None,
    ) -> None:
        super().__init__(features, dim=dim, budget_bytes=budget_bytes, dtype=dtype, sequence=sequence,
                         device=device, weighted=weighted)
        self.plan = p = plan_hybrid(
            self.features,
            dim,
            budget_bytes,
            dtype,
            hot_fraction=hot_fraction,
            frequency_ranked=frequency_ranked,
            counts=counts,
        )
        hot_sets = None
        if counts is not None:
            cnt = load_counts(counts, self.features)
            hot_sets = {f.name: hot_ids(cnt[f.name], k) for f, k in zip(self.features, p.hot, strict=True)}
        self.remap = HybridRemap(self.feature_names, p, hot_sets, weighted)
        self._make_tables(
            [
                TableSpec(f"t_{f.name}", k + c, dim, (f.name,), pooling=f.pooling)
                for f, k, c in zip(self.features, p.hot, p.cold, strict=True)
            ],
            device,
        )
