"""`optembed`: learned row pruning and per-field dimension search (Lyu et al., CIKM 2022).

One module, two forms, both remap -> TorchRec tables -> combine:

* **supernet** (``artefact=None``; stage 1 of the pipeline in
  ``embtables/experiments/optembed_pipeline.py``): one table per field at the full width
  ``dim`` (an EmbeddingCollection: the row mask is not linear in the lookups, so ids are
  looked up unpooled, masked per id, then pooled). A row is kept when its L1 norm exceeds
  its field's learnable threshold, ``mask = step(|e|_1 - t_f)``, trained through the
  paper's piecewise-linear surrogate gradient; ``regularization_loss`` is
  ``alpha * sum_f exp(-t_f)``, which the trainer adds to the BCE. In training each
  (sample, field) keeps a random prefix of ``k`` dims, ``k`` drawn from the candidate
  widths, so every candidate width is trained at once. ``set_eval_dims`` fixes the width
  per field for the evolutionary search; plain evaluation uses full widths + row mask.
* **exported** (``artefact=PATH``): pruned rows are physically gone. The remap sends
  kept ids to their row and pruned, unseen or out-of-range ids to one shared OOV row
  (row 0 of each field's table); each field's table has its searched width and
  ``combine`` zero-pads it back to ``dim``. It is linear in the lookups, so it is a
  pooled EmbeddingBagCollection that takes multi-id bags and per-id weights. The
  id->row map is a sorted array of kept keys (``field offset + id``) searched with
  ``torch.searchsorted``; it is a buffer and counts in ``memory_bytes()``.

Sizes are pure functions (``plan_optembed``): rows kept and widths in, parameters and
bytes out, so the search can price a candidate without building it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from embtables.embeddings.base import EmbeddingMethod, TableSpec, is_tracing, select_features
from embtables.embeddings.budget import DTYPE_BYTES, BudgetTooSmall
from embtables.embeddings.registry import Knobs, register
from embtables.embeddings.spec import FeatureSpec

ARTEFACT_FORMAT = "embtables.optembed/1"
OOV_ROW = 0  # every field's table starts with the shared OOV row
INT32_MAX = 2**31 - 1


class OptEmbedKnobs(Knobs):
    """``embedding.optembed``: the module's knobs. The three-stage experiment reads its
    search and retrain settings from the same section (``experiments.stages``)."""

    SIZING = ("artefact",)

    artefact: str | Path | dict[str, Any] | None = Field(
        None, description="set: build the exported table from this file (RUN_DIR/optembed/export.pt), "
        "no supernet")
    alpha: float = Field(1e-4, gt=0, description="weight of the threshold regulariser sum_f exp(-t_f) "
                         "(larger: more rows pruned)")
    dim_step: int = Field(4, description="candidate widths are its multiples: a multiple of 4 (FBGEMM) "
                          "that divides embedding.dim")

    @field_validator("dim_step")
    @classmethod
    def _multiple_of_4(cls, v: int) -> int:
        if v < 4 or v % 4:
            raise ValueError(f"must be a multiple of 4 (FBGEMM table widths), got {v}")
        return v


# ---- the row mask ---------------------------------------------------------------------


def surrogate_grad(x: torch.Tensor) -> torch.Tensor:
    """d step(x)/dx as OptEmbed trains it: 2 - 4|x| for |x| <= 0.4, 0.4 for
    0.4 < |x| <= 1, else 0 (a piecewise-linear bump around the threshold)."""
    a = x.abs()
    return torch.where(a <= 0.4, 2 - 4 * a,
                       torch.where(a <= 1.0, torch.full_like(a, 0.4), torch.zeros_like(a)))


class BinaryStep(torch.autograd.Function):
    """Forward: 1 where x > 0 (the row's norm exceeds the threshold), else 0.
    Backward: the surrogate gradient above."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        (x,) = ctx.saved_tensors
        return grad * surrogate_grad(x)


def row_mask(norms: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """step(norm - t) with the surrogate gradient (to norms and thresholds)."""
    return BinaryStep.apply(norms - thresholds)


def candidate_dims(dim: int, step: int) -> list[int]:
    """Widths the search may give a field: step, 2*step, ..., dim."""
    return list(range(step, dim + 1, step))


# ---- sizing (pure) ----------------------------------------------------------------------


def key_dtype(cardinalities: list[int]) -> torch.dtype:
    """Keys are ``field offset + id``: int32 while they fit, else int64."""
    return torch.int32 if sum(cardinalities) <= INT32_MAX else torch.int64


@dataclass(frozen=True)
class OptEmbedPlan:
    cardinalities: tuple[int, ...]
    kept: tuple[int, ...]   # rows kept per field (the OOV row comes on top)
    dims: tuple[int, ...]   # searched width per field
    dim: int                # output width per field (zero-padded)
    dtype: str

    @property
    def num_parameters(self) -> int:
        """sum_f (kept_f + 1) * dims_f: the +1 is the field's shared OOV row."""
        return sum((k + 1) * d for k, d in zip(self.kept, self.dims, strict=True))

    @property
    def table_bytes(self) -> int:
        return self.num_parameters * DTYPE_BYTES[self.dtype]

    @property
    def remap_bytes(self) -> int:
        """Sorted kept keys (int32 or int64) + three int64 per field (key offset,
        cardinality, start of the field's keys)."""
        kb = torch.empty(0, dtype=key_dtype(list(self.cardinalities))).element_size()
        return sum(self.kept) * kb + 3 * 8 * len(self.kept)

    @property
    def bytes(self) -> int:
        return self.table_bytes + self.remap_bytes

    @property
    def rows_pruned_share(self) -> float:
        return 1.0 - sum(self.kept) / max(1, sum(self.cardinalities))


def plan_optembed(features: list[FeatureSpec], dim: int, dims: list[int] | None = None,
                  kept: list[int] | None = None, dtype: str = "fp32") -> OptEmbedPlan:
    """Size of the exported table: ``kept`` rows (default: all) at ``dims`` (default: dim)."""
    card = tuple(f.cardinality for f in features)
    dims = tuple(dims) if dims is not None else (dim,) * len(card)
    kept = tuple(kept) if kept is not None else card
    if len(dims) != len(card) or len(kept) != len(card):
        raise ValueError(f"optembed: {len(card)} features but {len(dims)} dims and {len(kept)} kept counts")
    for f, d, k in zip(features, dims, kept, strict=True):
        if not 1 <= d <= dim or d % 4:
            raise ValueError(f"optembed: feature {f.name!r}: width {d} must be a multiple of 4 in [4, {dim}]")
        if not 0 <= k <= f.cardinality:
            raise ValueError(f"optembed: feature {f.name!r}: {k} kept rows, cardinality {f.cardinality}")
    return OptEmbedPlan(card, kept, dims, dim, dtype)


def plan_optembed_method(features: list[FeatureSpec], dim: int, budget_bytes: int | None = None,
                         dtype: str = "fp32",
                         artefact: str | Path | dict[str, Any] | None = None) -> OptEmbedPlan:
    """``registry.plan(..., method="optembed")``: the exported table an artefact
    describes, or without one the supernet (every row at ``dim``)."""
    if artefact is None:
        if budget_bytes is not None:
            raise ValueError("optembed: a budget is met by the exported table after the search; "
                             "size a searched table with artefact=RUN_DIR/optembed/export.pt")
        return plan_optembed(features, dim, dtype=dtype)
    art = load_artefact(artefact)
    p = plan_optembed(features, dim, art["dims"], art["kept"], dtype)
    if budget_bytes is not None and p.bytes > budget_bytes:
        raise BudgetTooSmall("optembed", p.bytes, budget_bytes, f"the table searched in {artefact}")
    return p


# ---- remap ------------------------------------------------------------------------------


class KeptRowRemap(nn.Module):
    """id -> row: ``1 + rank of the id among its field's kept ids``, or OOV_ROW (0) for a
    pruned, unseen, negative or out-of-range id. ``kept_keys is None`` keeps every id
    (the supernet: row = id + 1). Vectorised: one searchsorted for all fields."""

    def __init__(self, names: list[str], cards: list[int], kept_keys: torch.Tensor | None) -> None:
        super().__init__()
        self.names = list(names)
        cards_t = torch.tensor(cards, dtype=torch.int64)
        self.register_buffer("cards", cards_t)
        self.all_kept = kept_keys is None
        if kept_keys is not None:
            offsets = torch.cumsum(cards_t, 0) - cards_t
            self.register_buffer("key_offsets", offsets)
            keys = kept_keys.to(key_dtype(cards))
            self.register_buffer("kept_keys", keys)
            self.register_buffer("field_start",
                                 torch.searchsorted(keys, offsets.to(keys.dtype)).to(torch.int64))

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        if is_tracing():
            raise NotImplementedError("optembed cannot be fx-traced or exported: its id->row remap sizes "
                                      "tensors from the batch (use the model in eager mode)")
        kjt = select_features(kjt, self.names)
        ids = kjt.values()
        lpk = kjt.length_per_key()
        field = torch.repeat_interleave(torch.arange(len(self.names), device=ids.device),
                                        torch.tensor(lpk, device=ids.device))
        ok = (ids >= 0) & (ids < self.cards[field])
        if self.all_kept:
            rows = torch.where(ok, ids + 1, OOV_ROW)
        elif self.kept_keys.numel() == 0:
            rows = torch.full_like(ids, OOV_ROW)
        else:
            keys = torch.where(ok, ids + self.key_offsets[field], -1).to(self.kept_keys.dtype)
            pos = torch.searchsorted(self.kept_keys, keys)
            hit = ok & (self.kept_keys[pos.clamp(max=self.kept_keys.numel() - 1)] == keys)
            rows = torch.where(hit, pos.to(torch.int64) - self.field_start[field] + 1, OOV_ROW)
        return KeyedJaggedTensor(keys=self.names, values=rows, lengths=kjt.lengths(),
                                 weights=kjt.weights_or_none(), stride=kjt.stride(), length_per_key=lpk)


# ---- the module -----------------------------------------------------------------------------


@register("optembed", knobs=OptEmbedKnobs, plan=plan_optembed_method)
class OptEmbed(EmbeddingMethod):
    """Knobs: ``artefact`` (exported form), ``alpha`` and ``dim_step`` (supernet). The
    search and retrain settings belong to the experiment's stages."""
    # Pooled only: the exported tables have one width per field, and an EmbeddingCollection
    # shards only tables of one width.
    supports_sequence = False
    # The remap and the supernet's combine size tensors from data (torch.tensor(lpk),
    # per-field counts): neither fx-traceable nor exportable today; refused under tracing.
    fx_traceable = False
    exportable = False
    pipelineable = False  # the supernet's search forward branches on Python state

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
        artefact: str | Path | dict[str, Any] | None = None,
        alpha: float = 1e-4,
        dim_step: int = 4,
    ) -> None:
        super().__init__(features, dim=dim, budget_bytes=budget_bytes, dtype=dtype, sequence=sequence,
                         device=device, weighted=weighted)
        if dim % dim_step:
            raise ValueError(f"embedding.optembed.dim_step: must divide embedding.dim={dim} (got {dim_step})")
        self.alpha, self.dim_step = alpha, dim_step
        self.artefact = artefact if not isinstance(artefact, dict) else "<artefact dict>"
        cards = [f.cardinality for f in self.features]
        if artefact is None:
            self._init_supernet(cards, device)
        else:
            self._init_exported(load_artefact(artefact), device)

    # ---- the two forms -----------------------------------------------------------------
    def _init_supernet(self, cards: list[int], device: torch.device | None) -> None:
        if self.budget_bytes is not None:
            raise ValueError(
                "optembed: a budget is met by the exported table, after the search: run the three-stage "
                "experiment (`embtables run` with embedding.method: optembed and embedding.budget), or build "
                "the searched table with artefact=RUN_DIR/optembed/export.pt")
        self.searching = True
        self.plan = plan_optembed(self.features, self.dim, dtype=self.dtype)
        self.remap = KeptRowRemap(self.feature_names, cards, None)
        # Thresholds start at 0: a row with any non-zero entry is kept, nothing is pruned.
        self.thresholds = nn.Parameter(torch.zeros(len(cards), device=device))
        self.register_buffer("_choices", torch.tensor(candidate_dims(self.dim, self.dim_step)),
                             persistent=False)
        self.eval_dims: torch.Tensor | None = None
        self._lookup_cache: dict | None = None
        # Row 0 is the OOV row of ids outside [0, cardinality); the rest one per id.
        self._make_tables([TableSpec(f"t_{f.name}", f.cardinality + 1, self.dim, (f.name,))
                           for f in self.features], device, unpooled=True)
        with torch.no_grad():  # a zero OOV row is always masked, like a pruned row after export
            for f in self.features:
                self.table_weight(f.name)[OOV_ROW].zero_()

    def _init_exported(self, art: dict[str, Any], device: torch.device | None) -> None:
        names = [n for n, _ in art["features"]]
        if (names != self.feature_names
                or [c for _, c in art["features"]] != [f.cardinality for f in self.features]):
            raise ValueError(f"optembed: artefact {self.artefact} was searched for features "
                             f"{art['features']}, not {[(f.name, f.cardinality) for f in self.features]}")
        if art["dim"] != self.dim:
            raise ValueError(f"optembed: artefact {self.artefact} pads to dim {art['dim']}, "
                             f"but embedding.dim is {self.dim}")
        self.searching = False
        self._lookup_cache = None
        self.plan = plan_optembed(self.features, self.dim, art["dims"], art["kept"], self.dtype)
        self.remap = KeptRowRemap(self.feature_names, list(self.plan.cardinalities), art["kept_keys"])
        self._make_tables([TableSpec(f"t_{f.name}", k + 1, d, (f.name,), pooling=f.pooling)
                           for f, k, d in zip(self.features, self.plan.kept, self.plan.dims, strict=True)],
                          device)
        if art.get("tables") is not None:
            with torch.no_grad():
                for f, w in zip(self.features, art["tables"], strict=True):
                    self.table_weight(f.name).copy_(w)
        self.check_budget()

    def physical_tables(self) -> list[tuple[str, str, int, int]]:
        """(table name, feature, rows, width) per field; valid after DMP shards ``tables``."""
        if self.searching:
            return [(f"t_{f.name}", f.name, f.cardinality + 1, self.dim) for f in self.features]
        return [(f"t_{f.name}", f.name, k + 1, d)
                for f, k, d in zip(self.features, self.plan.kept, self.plan.dims, strict=True)]

    def table_weight(self, name: str) -> torch.Tensor:
        """The (unsharded) weight of feature ``name``'s table."""
        coll = self.tables.embedding_bags if not self.searching else self.tables.embeddings
        return coll[f"t_{name}"].weight

    # ---- combine ---------------------------------------------------------------------------
    def combine(self, looked, features: KeyedJaggedTensor) -> KeyedTensor:
        if self.searching:
            return self._combine_supernet(looked, features)
        values = looked.values()
        if all(d == self.dim for d in self.plan.dims):
            return self._keyed(values)
        cols, c = [], 0
        for d in self.plan.dims:  # DESIGN.md Widths: each field zero-padded back to dim
            cols.append(values[:, c:c + d])
            if d < self.dim:
                cols.append(values.new_zeros(values.shape[0], self.dim - d))
            c += d
        return self._keyed(torch.cat(cols, dim=1))

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        cache = self._lookup_cache
        if cache is None or self.training or not self.searching or self.eval_dims is None:
            return super().forward(features)
        # Search: the masked full-width lookups of a validation batch do not depend on
        # the candidate, and a fixed prefix per field commutes with pooling; so look
        # each batch up once and only re-mask the widths per candidate.
        key = (features.values().data_ptr(), features.values().numel(), features.stride())
        full = cache.get(key)
        if full is None:
            dims, self.eval_dims = self.eval_dims, None
            full = cache[key] = super().forward(features).values().detach()
            self.eval_dims = dims
        nf, stride = len(self.features), features.stride()
        keep = (torch.arange(self.dim, device=full.device).unsqueeze(0)
                < self.eval_dims.to(full.device).unsqueeze(1))
        return self._keyed(full * keep.to(full.dtype).reshape(1, nf * self.dim).expand(stride, -1))

    def enable_lookup_cache(self, on: bool = True) -> None:
        """Search only (eval mode, ``set_eval_dims``): cache masked lookups per batch."""
        self._lookup_cache = {} if on else None

    def _combine_supernet(self, looked: dict[str, JaggedTensor], features: KeyedJaggedTensor) -> KeyedTensor:
        """Per id: row mask (threshold), dim mask (prefix of k dims), weight; then pool."""
        names, nf, dim = self.feature_names, len(self.features), self.dim
        stride = features.stride()
        jts = [looked[n] for n in names]
        vals = torch.cat([jt.values() for jt in jts]) if nf > 1 else jts[0].values()
        lengths = torch.cat([jt.lengths() for jt in jts]) if nf > 1 else jts[0].lengths()
        dev = vals.device
        per_field = torch.tensor([jt.values().shape[0] for jt in jts], device=dev)
        field = torch.repeat_interleave(torch.arange(nf, device=dev), per_field)
        bag = torch.repeat_interleave(torch.arange(nf * stride, device=dev), lengths)  # field * B + sample
        norms = vals.float().abs().sum(1)
        vals = vals * row_mask(norms, self.thresholds[field]).to(vals.dtype).unsqueeze(1)
        k = self._dims_per_bag(stride, dev)
        if k is not None:
            keep = torch.arange(dim, device=dev).unsqueeze(0) < k[bag].unsqueeze(1)
            vals = vals * keep.to(vals.dtype)
        if self.weighted:
            w = select_features(features, names).weights()
            vals = vals * w.to(vals.dtype).unsqueeze(1)
        if vals.shape[0] == nf * stride and bool((lengths == 1).all()):
            pooled = vals  # fast path: every bag holds exactly one id
        else:
            pooled = vals.new_zeros(nf * stride, dim).index_add(0, bag, vals)
            mean = torch.tensor([f.pooling == PoolingType.MEAN for f in self.features], device=dev)
            if bool(mean.any()):
                div = torch.where(mean.repeat_interleave(stride), lengths.clamp(min=1), 1).to(vals.dtype)
                pooled = pooled / div.unsqueeze(1)
        return self._keyed(pooled.view(nf, stride, dim).transpose(0, 1).reshape(stride, nf * dim))

    def _dims_per_bag(self, stride: int, dev: torch.device) -> torch.Tensor | None:
        """Width kept per (field, sample) bag, field-major; None = all ``dim``."""
        nf = len(self.features)
        if self.eval_dims is not None:
            return self.eval_dims.to(dev).repeat_interleave(stride)
        if not self.training:
            return None
        # Uniform dimension sampling: every (sample, field) draws its own candidate width.
        idx = torch.randint(0, self._choices.numel(), (nf * stride,), device=dev)
        return self._choices.to(dev)[idx]

    # ---- supernet API ----------------------------------------------------------------------
    def regularization_loss(self, features: KeyedJaggedTensor | None = None) -> torch.Tensor:
        """alpha * sum_f exp(-t_f): pushes thresholds up (prunes more) against the BCE."""
        if not self.searching:
            return torch.zeros(())
        return self.alpha * torch.exp(-self.thresholds).sum()

    def set_eval_dims(self, dims: list[int] | tuple[int, ...] | None) -> None:
        """Fix each field's width (a search candidate); None: full widths."""
        if not self.searching:
            raise RuntimeError("set_eval_dims is for the supernet (optembed built without artefact)")
        if dims is not None and len(dims) != len(self.features):
            raise ValueError(f"set_eval_dims: {len(dims)} widths for {len(self.features)} features")
        self.eval_dims = None if dims is None else torch.tensor(list(dims), dtype=torch.int64)

    def kept_rows(self) -> list[torch.Tensor]:
        """Per field, the ids (rows minus the OOV row) whose L1 norm exceeds the threshold
        (unsharded module; the pipeline computes the same from sharded tables)."""
        if not self.searching:
            raise RuntimeError("kept_rows is for the supernet")
        out = []
        with torch.no_grad():
            for i, f in enumerate(self.features):
                norms = self.table_weight(f.name)[1:].float().abs().sum(1)
                out.append(torch.nonzero(norms > self.thresholds[i]).flatten())
        return out

    def export(self, dims: list[int], path: str | Path | None = None, *,
               with_weights: bool = True) -> OptEmbed:
        """The exported table of this (unsharded) supernet at ``dims``: kept rows, their
        first ``dims_f`` columns, a zero OOV row. Saved to ``path`` if given."""
        kept = self.kept_rows()
        tables = None
        if with_weights:
            tables = [gather_rows(self.table_weight(f.name), ids, d)
                      for f, ids, d in zip(self.features, kept, dims, strict=True)]
        art = make_artefact(self.features, self.dim, dims, kept, tables,
                            thresholds=self.thresholds.detach().tolist())
        path = Path(path) if path is not None else None
        if path is not None:
            save_artefact(art, path)
        return OptEmbed.from_artefact(art, dtype=self.dtype, weighted=self.weighted)

    # ---- artefacts -----------------------------------------------------------------------
    @classmethod
    def from_artefact(cls, artefact: str | Path | dict[str, Any], *, dtype: str = "fp32",
                      weighted: bool = False, device: torch.device | None = None) -> OptEmbed:
        """The exported module saved at ``artefact`` (or from an artefact dict)."""
        art = load_artefact(artefact)
        feats = [FeatureSpec(n, int(c)) for n, c in art["features"]]
        return cls(feats, dim=art["dim"], dtype=dtype, device=device, weighted=weighted, artefact=art)

    def save(self, path: str | Path) -> None:
        """Save the exported module (remap + table weights) for ``build(..., artefact=path)``."""
        if self.searching:
            raise RuntimeError("save() is for the exported table; a supernet exports with export(dims, path)")
        kept, start = [], self.remap.field_start.tolist() + [self.remap.kept_keys.numel()]
        for i in range(len(self.features)):
            kept.append(self.remap.kept_keys[start[i]:start[i + 1]].to(torch.int64)
                        - self.remap.key_offsets[i])
        tables = [self.table_weight(f.name).detach().clone() for f in self.features]
        save_artefact(make_artefact(self.features, self.dim, list(self.plan.dims), kept, tables), Path(path))

    def extra_repr(self) -> str:
        form = "supernet" if self.searching else f"exported, rows pruned {self.plan.rows_pruned_share:.1%}"
        return f"{super().extra_repr()}, {form}"


def gather_rows(weight: torch.Tensor, ids: torch.Tensor, width: int) -> torch.Tensor:
    """[OOV row (zeros); rows 1 + ids] x first ``width`` columns of a supernet table."""
    w = weight.detach()
    return torch.cat([w.new_zeros(1, width), w[ids + 1, :width]])


def make_artefact(features: list[FeatureSpec], dim: int, dims: list[int], kept: list[torch.Tensor],
                  tables: list[torch.Tensor] | None, **extra: Any) -> dict[str, Any]:
    """Kept ids per field (sorted) -> global sorted keys (field offset + id)."""
    cards = [f.cardinality for f in features]
    offsets = [sum(cards[:i]) for i in range(len(cards))]
    keys = [ids.to(torch.int64).sort().values + off for ids, off in zip(kept, offsets, strict=True)]
    art = {
        "format": ARTEFACT_FORMAT,
        "features": [[f.name, f.cardinality] for f in features],
        "dim": int(dim),
        "dims": [int(d) for d in dims],
        "kept": [int(k.numel()) for k in kept],
        "kept_keys": torch.cat(keys) if keys else torch.zeros(0, dtype=torch.int64),
        "tables": None if tables is None else [t.detach().float().contiguous() for t in tables],
    }
    art.update(extra)
    return art


def save_artefact(art: dict[str, Any], path: Path) -> None:
    """Atomic: written to PATH.tmp, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(art, tmp)
    tmp.replace(path)


def load_artefact(artefact: str | Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(artefact, dict):
        art = artefact
    else:
        p = Path(artefact)
        if not p.exists():
            raise FileNotFoundError(f"embedding.optembed.artefact: {p} does not exist "
                                    "(an OptEmbed run writes RUN_DIR/optembed/export.pt)")
        art = torch.load(p, weights_only=True, map_location="cpu")
    if art.get("format") != ARTEFACT_FORMAT:
        raise ValueError(f"embedding.optembed.artefact: {artefact} is not an OptEmbed artefact "
                         f"(format {art.get('format')!r}, expected {ARTEFACT_FORMAT!r})")
    return art
