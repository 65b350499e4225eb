"""`unified`: Feature Multiplexing / Unified Embedding (Coleman et al., 2023).

All features of a group share T tables (default 1) of B rows x d columns, d = dim / probes
(the probe width). Feature f makes c_f lookups ("probes"); probe p hashes the id with the
salt of (feature name, p), the group's (feature, probe) pairs go round-robin over its
tables, and the c_f vectors are concatenated: feature f is c_f * d wide, as in the paper.
Parameters are T*B*d per group whatever the number of features. One TorchRec table serves
several physical features (``EmbeddingBagConfig(feature_names=[...])``), which TorchRec
shards as any other table.

Probes per feature: every feature makes ``probes`` (then every feature is ``dim`` wide),
unless ``max_probes`` gives the cardinality rule, c_f = 1 + round((max_probes - 1) *
ln(n_f / n_min) / ln(n_max / n_min)) (the smallest vocabulary 1 probe, the largest
``max_probes``, log-linear between), and ``feature_probes`` ({name: c}) sets features by
name over either. Every model here takes ``dim`` per feature (DLRM's dot interaction
needs equal widths), so a feature whose c_f * d differs from ``dim`` goes through its own
linear projection (c_f * d x dim, fp32, data-parallel, counted in ``memory_bytes()`` and
in the budget before the rows are sized): the paper's variable widths, projected to the
model's width. Pooling is linear, so the projection after pooling equals one per id.

When the tables can hold every probe's vocabulary (no budget, or a budget >= full), the
hash is replaced by disjoint offsets: collisionless, exactly a plain table per feature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from embtables.embeddings.base import EmbeddingMethod, TableSpec, is_tracing, split_features
from embtables.embeddings.budget import DTYPE_BYTES, BudgetTooSmall, split_budget
from embtables.embeddings.hashing import hash_to_rows, salt
from embtables.embeddings.registry import Knobs, register
from embtables.embeddings.spec import FeatureSpec
from embtables.embeddings.table_init import RowBlock, SeededInit, feature_init


class UnifiedKnobs(Knobs):
    """``embedding.unified``."""

    probes: int = Field(1, ge=1, description="lookups per id, each dim / probes wide")
    num_tables: int = Field(1, ge=1, description="T, shared tables per group")
    rows: int | None = Field(None, ge=1, description="B, rows per shared table; null: from the budget, "
                             "collisionless without a budget")
    groups: list[list[str]] | None = Field(None, description="null: all features in one group; e.g. "
                                           "[[C1, C2], [C3]] multiplexes groups separately")
    feature_probes: dict[str, int] | None = Field(
        None, description="probes per feature by name (overrides max_probes); a feature's width is its "
        "probes x dim/probes, projected to dim when different")
    max_probes: int | None = Field(
        None, ge=1, description="cardinality rule: 1 + round((N-1) ln(n/n_min) / ln(n_max/n_min)) probes")


@dataclass(frozen=True)
class UnifiedGroup:
    features: tuple[str, ...]
    table_rows: tuple[int, ...]                  # rows of each of the group's T tables
    assignment: tuple[tuple[str, int, int], ...]  # (feature, probe, table index) in feature/probe order
    offsets: tuple[int, ...] | None  # per assignment row offset (collisionless mode) or None (hashed)


PROJ_BYTES = 4  # projections are fp32 dense parameters whatever the table dtype


@dataclass(frozen=True)
class UnifiedPlan:
    groups: tuple[UnifiedGroup, ...]
    probe_dim: int
    bytes: int  # tables + projections
    probes: tuple[int, ...] = ()  # per feature, in the features' order
    dim: int = 0

    @property
    def widths(self) -> tuple[int, ...]:
        """Concatenated width per feature (before its projection to ``dim``)."""
        return tuple(c * self.probe_dim for c in self.probes)

    @property
    def projection_params(self) -> int:
        return sum(w * self.dim for w in self.widths if w != self.dim)

    @property
    def num_parameters(self) -> int:
        return sum(sum(g.table_rows) for g in self.groups) * self.probe_dim + self.projection_params


def probe_counts(
    features: list[FeatureSpec],
    probes: int = 1,
    feature_probes: dict[str, int] | None = None,
    max_probes: int | None = None,
) -> list[int]:
    """Probes per feature: ``probes`` each; with ``max_probes`` the cardinality rule (module
    docstring); then ``feature_probes`` by name."""
    names = [f.name for f in features]
    counts = [probes] * len(features)
    if max_probes is not None:
        if max_probes < 1:
            raise ValueError(f"unified: knob max_probes must be >= 1, got {max_probes}")
        lo, hi = min(f.cardinality for f in features), max(f.cardinality for f in features)
        if hi > lo:
            counts = [
                1 + round((max_probes - 1) * math.log(f.cardinality / lo) / math.log(hi / lo))
                for f in features
            ]
    for name, c in (feature_probes or {}).items():
        if name not in names:
            raise ValueError(
                f"unified: knob feature_probes names {name!r}, which is not a feature ({', '.join(names)})"
            )
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise ValueError(f"unified: knob feature_probes[{name!r}] must be an integer >= 1, got {c!r}")
        counts[names.index(name)] = c
    return counts


def plan_unified(
    features: list[FeatureSpec],
    dim: int,
    budget_bytes: int | None = None,
    dtype: str = "fp32",
    probes: int = 1,
    num_tables: int = 1,
    rows: int | None = None,
    groups: list[list[str]] | None = None,
    feature_probes: dict[str, int] | None = None,
    max_probes: int | None = None,
) -> UnifiedPlan:
    """Pure sizing. Each group gets T tables of B rows x d (d = dim / probes). B is the
    ``rows`` knob, else the group's share of the budget left after the projections /
    (T * d * bytes) (groups share it in proportion to their summed probe vocabulary), else
    (no budget) large enough to be collisionless. If B covers every table's probe
    vocabulary the tables are cut to exactly that and the remap uses offsets instead of
    hashes."""
    if probes < 1 or dim % probes or (dim // probes) % 4:
        raise ValueError(
            f"unified: knob probes={probes} must divide dim={dim} into probe widths that are "
            "multiples of 4 (FBGEMM)"
        )
    if num_tables < 1:
        raise ValueError(f"unified: knob num_tables must be >= 1, got {num_tables}")
    d, b = dim // probes, DTYPE_BYTES[dtype]
    by_name = {f.name: f for f in features}
    if groups is None:
        groups = [[f.name for f in features]]
    seen = [n for g in groups for n in g]
    if sorted(seen) != sorted(by_name) or len(set(seen)) != len(seen):
        raise ValueError(
            f"unified: knob groups must list every feature exactly once; features {sorted(by_name)}, "
            f"groups {groups}"
        )
    if any(len({by_name[n].pooling for n in g}) > 1 for g in groups):
        raise ValueError("unified: features multiplexed in one group must share a pooling type")
    counts = probe_counts(features, probes, feature_probes, max_probes)
    count = {f.name: c for f, c in zip(features, counts, strict=True)}
    proj_bytes = sum(count[f.name] * d * dim for f in features if count[f.name] * d != dim) * PROJ_BYTES
    # Round-robin (feature, probe) pairs over the group's tables; vocabulary per table.
    assigns, needed = [], []
    for g in groups:
        pairs = [(n, p) for n in g for p in range(count[n])]
        a = [(n, p, k % num_tables) for k, (n, p) in enumerate(pairs)]
        need = [0] * num_tables
        for n, _, t in a:
            need[t] += by_name[n].cardinality
        assigns.append(a)
        needed.append(need)
    T = num_tables
    if rows is not None:
        if rows < 1:
            raise ValueError(f"unified: knob rows must be >= 1, got {rows}")
        B = [rows] * len(groups)
        exact = [rows >= max(need) for need in needed]
    elif budget_bytes is None:
        B = [max(need) for need in needed]
        exact = [True] * len(groups)
    else:
        minimum = len(groups) * T * d * b + proj_bytes
        if budget_bytes < minimum:
            why = f"1 row in each of {T} table(s) per group" + (
                f" and {proj_bytes} bytes of projections to dim" if proj_bytes else ""
            )
            raise BudgetTooSmall("unified", minimum, budget_bytes, why)
        # A group is collisionless once its share holds every table's exact vocabulary (the
        # tables may differ in size: T * the largest would ask for more than `full` holds).
        caps = [sum(need) * d * b for need in needed]
        shares = split_budget(
            budget_bytes - proj_bytes, [float(sum(need)) for need in needed], [T * d * b] * len(groups), caps
        )
        B = [max(1, math.floor(s / (T * d * b) + 1e-9)) for s in shares]
        exact = [s >= c for s, c in zip(shares, caps, strict=True)]
    out = []
    for g, a, need, bg, ex in zip(groups, assigns, needed, B, exact, strict=True):
        if ex:  # collisionless: every probe gets its own rows
            offs, run = [], [0] * T
            for n, _, t in a:
                offs.append(run[t])
                run[t] += by_name[n].cardinality
            out.append(UnifiedGroup(tuple(g), tuple(need), tuple(a), tuple(offs)))
        else:
            out.append(UnifiedGroup(tuple(g), (bg,) * T, tuple(a), None))
    nbytes = sum(sum(g.table_rows) for g in out) * d * b + proj_bytes
    if budget_bytes is not None and nbytes > budget_bytes:
        raise BudgetTooSmall(
            "unified",
            len(groups) * T * d * b + proj_bytes,
            budget_bytes,
            f"rows={rows} needs {nbytes} bytes; lower `rows` or drop it to size from the budget",
        )
    return UnifiedPlan(tuple(out), d, nbytes, tuple(counts), dim)


class UnifiedRemap(nn.Module):
    """Raw ids -> one row id per probe (physical feature ``f#p``) in its shared table."""

    def __init__(
        self,
        names: list[str],
        cards: dict[str, int],
        plan: UnifiedPlan,
        probes: list[int],
        weighted: bool = False,
    ) -> None:
        super().__init__()
        self.names, self.probes, self.weighted = names, list(probes), weighted
        how: dict[tuple[str, int], tuple[int, int, int | None]] = {}  # (f, p) -> (salt, rows, offset)
        for g in plan.groups:
            for j, (n, p, t) in enumerate(g.assignment):
                off = None if g.offsets is None else g.offsets[j]
                how[(n, p)] = (salt(n, p), g.table_rows[t], off)
        self.how = [[how[(n, p)] for p in range(c)] for n, c in zip(names, self.probes, strict=True)]
        self.cards = [cards[n] for n in names]
        self.physical = [f"{n}#{p}" for n, c in zip(names, self.probes, strict=True) for p in range(c)]
        # Emit physical features table by table (the EBC's own order), so a shared table's
        # features are adjacent in the KJT and the unsharded lookup slices instead of permuting.
        order = [
            f"{n}#{p}"
            for g in plan.groups
            for t in range(len(g.table_rows))
            for n, p, tt in g.assignment
            if tt == t
        ]
        pos = {pf: i for i, pf in enumerate(self.physical)}
        self.emit = [pos[pf] for pf in order]

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        vals, lens, ws, lpk = split_features(kjt, self.names, self.weighted)
        ov, ol, ow, olpk = [], [], [], []
        for i, v in enumerate(vals):
            for s, r, off in self.how[i]:
                ov.append(hash_to_rows(v, s, r) if off is None else v.to(torch.int64) % self.cards[i] + off)
                ol.append(lens[i])
                if ws is not None:
                    ow.append(ws[i])
                if lpk is not None:  # from the input: no data-dependent size (torch.export)
                    olpk.append(lpk[i])
        e = self.emit
        return KeyedJaggedTensor(
            keys=[self.physical[i] for i in e],
            values=torch.cat([ov[i] for i in e]),
            lengths=torch.cat([ol[i] for i in e]),
            weights=torch.cat([ow[i] for i in e]) if ws is not None else None,
            length_per_key=[olpk[i] for i in e] if lpk is not None else None,
        )


@register("unified", knobs=UnifiedKnobs, plan=plan_unified)
class UnifiedEmbedding(EmbeddingMethod):
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
        probes: int = 1,
        num_tables: int = 1,
        rows: int | None = None,
        groups: list[list[str]] | None = None,
        feature_probes: dict[str, int] | None = None,
        max_probes: int | None = None,
    ) -> None:
        super().__init__(
            features,
            dim=dim,
            budget_bytes=budget_bytes,
            dtype=dtype,
            sequence=sequence,
            device=device,
            weighted=weighted,
        )
        self.plan = plan_unified(
            self.features,
            dim,
            budget_bytes,
            dtype,
            probes=probes,
            num_tables=num_tables,
            rows=rows,
            groups=groups,
            feature_probes=feature_probes,
            max_probes=max_probes,
        )
        self.probes = list(self.plan.probes)
        cards = {f.name: f.cardinality for f in self.features}
        pooling = {f.name: f.pooling for f in self.features}
        self.remap = UnifiedRemap(self.feature_names, cards, self.plan, self.probes, weighted)
        tables = []
        for gi, g in enumerate(self.plan.groups):
            for t, r in enumerate(g.table_rows):
                feats = [f"{n}#{p}" for n, p, tt in g.assignment if tt == t]
                if not feats:
                    continue
                tables.append(
                    TableSpec(f"u{gi}_{t}", r, self.plan.probe_dim, tuple(feats), self._init(gi, g, t, r),
                              pooling[g.features[0]])
                )
        self._make_tables(tables, device)
        # Column order of the EBC output (table by table) -> logical order (feature, probe).
        order = [pf for c in self.table_configs() for pf in c.feature_names]
        pos = {pf: i for i, pf in enumerate(order)}
        d = self.plan.probe_dim
        perm = [pos[pf] * d + j for pf in self.remap.physical for j in range(d)]
        self._perm = None if perm == list(range(len(perm))) else perm
        self._perm_t: torch.Tensor | None = None
        # Features wider or narrower than dim: a projection each; init keeps a plain table's
        # variance (entries of variance 1/width: the projected vector has the row's variance).
        self.proj = nn.ParameterDict()
        for f, w in zip(self.features, self.plan.widths, strict=True):
            if w != dim:
                bound = math.sqrt(3 / w)
                self.proj[f.name] = nn.Parameter(torch.empty(w, dim, device=device).uniform_(-bound, bound))

    def _init(self, gi: int, g: UnifiedGroup, t: int, rows: int) -> SeededInit:
        """Collisionless: each probe's rows are its column slice of `full`'s rows of that
        feature, U(+-sqrt(1/cardinality)) (of rows as wide as the feature, c_f * d, when
        that is not ``dim``). Hashed: like a plain table of the multiplexed vocabulary,
        U(+-sqrt(1/rows))."""
        d = self.plan.probe_dim
        if g.offsets is None:
            return feature_init(f"u{gi}_{t}", rows, d)
        card = {f.name: f.cardinality for f in self.features}
        width = {f.name: w for f, w in zip(self.features, self.plan.widths, strict=True)}
        return SeededInit(
            tuple(
                RowBlock(n, off, card[n], width[n], math.sqrt(1 / card[n]), p * d)
                for (n, p, tt), off in zip(g.assignment, g.offsets, strict=True)
                if tt == t
            )
        )

    def combine(self, pooled: KeyedTensor, features: KeyedJaggedTensor) -> KeyedTensor:
        values = self.pooled_values(pooled)
        if self._perm is not None:  # several tables or reordered groups: gather columns once
            if is_tracing():  # no cache test on a traced device
                idx = torch.tensor(self._perm, device=values.device)
            else:
                if self._perm_t is None or self._perm_t.device != values.device:
                    self._perm_t = torch.tensor(self._perm, device=values.device)
                idx = self._perm_t
            values = values.index_select(1, idx)
        if len(self.proj):
            parts = torch.split(values, list(self.plan.widths), dim=1)
            cols = []
            for i, f in enumerate(self.features):  # indexed, not iterated: an fx Proxy cannot be
                v = parts[i].float()
                cols.append(v @ self.proj[f.name] if f.name in self.proj else v)
            values = torch.cat(cols, dim=1)
        return self._keyed(values)

    def combine_sequence(
        self, seq: dict[str, JaggedTensor], features: KeyedJaggedTensor
    ) -> dict[str, JaggedTensor]:
        out = {}
        for n, c in zip(self.feature_names, self.probes, strict=True):
            parts = [seq[f"{n}#{p}"] for p in range(c)]
            v = parts[0].values() if c == 1 else torch.cat([jt.values() for jt in parts], dim=1)
            if n in self.proj:
                v = v.float() @ self.proj[n]
            out[n] = JaggedTensor(values=v, lengths=parts[0].lengths(), offsets=parts[0].offsets())
        return out
