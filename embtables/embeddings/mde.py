"""`mde`: mixed-dimension embeddings (Ginart et al., ISIT 2021; DLRM's ``--md-flag``).

Each feature f gets a width d_f = lam * n_f^(-alpha) (DLRM's ``md_solver`` power rule:
an id of a feature with n ids is seen ~1/n of the time, so popular-per-id, small
vocabularies get wide rows and huge vocabularies narrow ones), rounded to a multiple of
4 (FBGEMM) and clipped to [4, dim]. A feature narrower than ``dim`` is projected back to
``dim`` by its own small dense matrix (d_f x dim, data-parallel, counted in
``memory_bytes()``), so every model sees ``dim`` per feature. The sizing function solves
for the base scale lam that fills the budget.

Tables of mixed widths are one TorchRec EmbeddingBagCollection (pooled). The projection
is linear, so pooling before it equals pooling after it: per-id weights and multi-id
bags need no per-id path.

Width 4 is the floor (dim/4 of the bytes at most). Below it, rows are hashed as DLRM caps
them (``--max-ind-range``): every feature at width 4, rows water-filled like `hash`
(weights sqrt(n), feature-salted splitmix64), so the method builds at any budget that
holds one row per feature. ``sequence=True`` is refused (``supports_sequence = False``):
TorchRec 1.8's EmbeddingCollection takes one width for all its tables, and one width is
not mixed dimensions (``hash``, ``qr``, ``tt`` have sequence faces).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embtables.embeddings.base import EmbeddingMethod, TableSpec
from embtables.embeddings.budget import DTYPE_BYTES, BudgetTooSmall, feature_weights, split_budget
from embtables.embeddings.hash import HashRemap
from embtables.embeddings.registry import Knobs, register
from embtables.embeddings.spec import FeatureSpec


class MDEKnobs(Knobs):
    """``embedding.mde``."""

    alpha: float = Field(0.3, ge=0, le=1, description="temperature of the power law that sets each "
                         "feature's width from its cardinality; 0 gives every feature one width")

PROJ_BYTES = 4  # projections are fp32 dense parameters whatever the table dtype
MIN_BATCHED = 4  # adjacent projected features of one width: one batched product from this many


@dataclass(frozen=True)
class MDEPlan:
    widths: tuple[int, ...]  # table width per feature (multiple of 4, <= dim)
    rows: tuple[int, ...]  # table rows per feature (< cardinality: ids hashed into the rows)
    cardinalities: tuple[int, ...]
    dim: int
    scale: float  # lam of d_f = lam * n_f^(-alpha), before rounding (0: hashed regime)
    bytes: int

    @property
    def num_parameters(self) -> int:
        return sum(
            n * w + (w * self.dim if w < self.dim else 0) for n, w in zip(self.rows, self.widths, strict=True)
        )


def _widths(card: list[int], dim: int, alpha: float, lam: float) -> list[int]:
    return [min(dim, max(4, 4 * round(lam * n**-alpha / 4))) for n in card]


def _bytes(rows: list[int], widths: list[int], dim: int, b: int) -> int:
    return sum(
        n * w * b + (w * dim * PROJ_BYTES if w < dim else 0) for n, w in zip(rows, widths, strict=True)
    )


def _plan(w: list[int], rows: list[int], card: list[int], dim: int, lam: float, b: int) -> MDEPlan:
    return MDEPlan(tuple(w), tuple(rows), tuple(card), dim, lam, _bytes(rows, w, dim, b))


def plan_mde(
    features: list[FeatureSpec],
    dim: int,
    budget_bytes: int | None = None,
    dtype: str = "fp32",
    alpha: float = 0.3,
) -> MDEPlan:
    """Pure sizing. d_f = lam * n_f^(-alpha), rounded to a multiple of 4 in [4, dim]. No
    budget: lam gives the smallest feature the full ``dim`` (DLRM's ``d0`` rule). With a
    budget: the largest lam whose tables plus projections fit; a budget that holds every
    feature at ``dim`` gives plain tables (exactly ``full``, no projections); a budget below
    every feature at width 4 keeps width 4 and hashes rows (water-filled like `hash`)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mde: knob alpha must be in [0, 1], got {alpha}")
    if dim < 4 or dim % 4:
        raise ValueError(f"mde: dim must be a positive multiple of 4, got {dim}")
    b = DTYPE_BYTES[dtype]
    card = [f.cardinality for f in features]
    if budget_bytes is None:
        lam = dim * min(card) ** alpha
        return _plan(_widths(card, dim, alpha, lam), card, card, dim, lam, b)
    hi = dim * max(card) ** alpha * 2  # every feature at dim
    if _bytes(card, _widths(card, dim, alpha, hi), dim, b) <= budget_bytes:
        return _plan(_widths(card, dim, alpha, hi), card, card, dim, hi, b)
    four = [4] * len(card)
    if _bytes(card, four, dim, b) > budget_bytes:  # below the width floor: hash rows at width 4
        proj = len(card) * 4 * dim * PROJ_BYTES if dim > 4 else 0
        row = 4 * b
        minimum = proj + len(card) * row
        if budget_bytes < minimum:
            raise BudgetTooSmall(
                "mde",
                minimum,
                budget_bytes,
                "one hashed row per feature at width 4 plus its 4 x dim projection",
            )
        shares = split_budget(
            budget_bytes - proj, feature_weights(card), [row] * len(card), [n * row for n in card]
        )
        rows = [max(1, min(n, math.floor(s / row + 1e-9))) for s, n in zip(shares, card, strict=True)]
        return _plan(four, rows, card, dim, 0.0, b)
    # Bytes are not quite monotone in lam (a feature reaching dim drops its projection), so
    # bisect for a fitting lam, then keep the best fitting width vector seen.
    lo, best = 0.0, [4] * len(card)
    for _ in range(100):
        mid = (lo + hi) / 2
        w = _widths(card, dim, alpha, mid)
        if _bytes(card, w, dim, b) <= budget_bytes:
            lo, best = mid, w
        else:
            hi = mid
    return _plan(best, card, card, dim, lo, b)


@register("mde", knobs=MDEKnobs, plan=plan_mde)
class MDEEmbedding(EmbeddingMethod):
    # An EmbeddingCollection takes one width for all its tables (TorchRec 1.8).
    supports_sequence = False

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
        alpha: float = 0.3,
    ) -> None:
        super().__init__(features, dim=dim, budget_bytes=budget_bytes, dtype=dtype, sequence=sequence,
                         device=device, weighted=weighted)
        self.plan = p = plan_mde(self.features, dim, budget_bytes, dtype, alpha=alpha)
        # Ids of an unbounded feature (raw-mode data) may exceed its cardinality: map them
        # into the rows as `hash` does, even when the table has one row per expected id.
        hashed = any(r < n for r, n in zip(p.rows, p.cardinalities, strict=True))
        if hashed or not all(f.bounded for f in self.features):
            self.remap = HashRemap(
                self.feature_names,
                list(p.rows),
                [r >= n for r, n in zip(p.rows, p.cardinalities, strict=True)],
                weighted,
            )
        self._make_tables(
            [
                TableSpec(f"t_{f.name}", r, w, (f.name,), pooling=f.pooling)
                for f, w, r in zip(self.features, p.widths, p.rows, strict=True)
            ],
            device,
        )
        # Projections d_f -> dim; init keeps a plain table's variance (entries of variance
        # 1/d_f: the projected vector has the row's per-entry variance).
        self.proj = nn.ParameterDict()
        for f, w in zip(self.features, p.widths, strict=True):
            if w < dim:
                bound = math.sqrt(3 / w)
                self.proj[f.name] = nn.Parameter(torch.empty(w, dim, device=device).uniform_(-bound, bound))

    def _runs(self) -> list[tuple[int, int, bool]]:
        """Adjacent features of one width, each projected or each not: (first feature,
        count, projected). A run of projected features is projected by one batched matrix
        product; one of width ``dim`` is passed through."""
        runs: list[tuple[int, int, bool]] = []
        for i, (f, w) in enumerate(zip(self.features, self.plan.widths, strict=True)):
            p = f.name in self.proj
            if runs and runs[-1][2] == p and self.plan.widths[runs[-1][0]] == w:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1, p)
            else:
                runs.append((i, 1, p))
        return runs

    def combine(self, pooled: KeyedTensor, features: KeyedJaggedTensor) -> KeyedTensor:
        # pooled_values selects by key (a sharded EBC groups its keys by sharding type)
        x = self.pooled_values(pooled).float()
        widths, dim, runs = self.plan.widths, self.dim, self._runs()
        # one split (its backward is one cat; a slice per run would add a zero-filled
        # full-width gradient per run)
        parts = torch.split(x, [g * widths[i0] for i0, g, _ in runs], dim=1)
        cols = []
        for k, (i0, g, projected) in enumerate(runs):  # parts indexed: an fx Proxy cannot be iterated
            xr, w = parts[k], widths[i0]
            if not projected:
                cols.append(xr)
            elif g < MIN_BATCHED:
                one = torch.split(xr, w, dim=1)
                cols += [one[j] @ self.proj[self.features[i0 + j].name] for j in range(g)]
            else:
                proj = torch.stack([self.proj[self.features[i].name] for i in range(i0, i0 + g)])
                # Transposed, [g, dim, w] x [g, w, B]: the batch runs along the long side of
                # every product and the inputs need no copy (the fastest layout measured on CPU).
                y = torch.bmm(proj.transpose(1, 2), xr.reshape(-1, g, w).permute(1, 2, 0))  # [g, dim, B]
                cols.append(y.permute(2, 0, 1).reshape(-1, g * dim))
        return self._keyed(cols[0] if len(cols) == 1 else torch.cat(cols, dim=1))
