"""`tt`: TT-Rec, tensor-train embedding tables (Yin et al., MLSys 2021).

A large feature's vocabulary is factored n <= n1*...*nk (k = ``cores``, default 3) and its
width dim = d1*...*dk. The id's mixed-radix digits (i1, ..., ik) (exact integer arithmetic,
like `qr`) pick one slice of each core, G1[i1]: d1 x r, Gj[ij]: r x dj x r, Gk[ik]: r x dk,
and the id's vector is their contraction, for k = 3 E[a, b, c] = sum_pq G1[a, p] G2[p, b, q]
G3[q, c] (k - 1 batched matrix products per id). The contraction is not linear in the
lookups, so ids are looked up unpooled, contracted per id, then pooled (DESIGN.md, Pooling).

Tables: TorchRec's EmbeddingCollection needs one width for all its tables, and the
cores are d1*r, r*dj*r and r*dk wide. So every table is stored in ``chunk``-wide rows
(chunk = gcd of all the widths and dim, a multiple of 4): core row i of width m*chunk is
rows i*m .. i*m+m-1 of its table, and the remap asks for those m rows. Bytes are exactly
the cores'; every table is a plain TorchRec table that DMP shards table-, row- or
column-wise. Features that TT would not shrink (or that fit the budget whole) stay plain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from embtables.embeddings.base import EmbeddingMethod, TableSpec, is_tracing, split_features
from embtables.embeddings.budget import DTYPE_BYTES, BudgetTooSmall
from embtables.embeddings.registry import Knobs, register
from embtables.embeddings.spec import FeatureSpec
from embtables.embeddings.table_init import ReshapedFeatureInit


class TTKnobs(Knobs):
    """``embedding.tt``."""

    rank: int = Field(16, ge=1, description="TT rank r, the upper bound; the sizing function lowers it when "
                      "the budget needs it (a middle core's row holds r*d2*r floats)")
    threshold: int = Field(200, ge=0, description="features with at most this many ids stay plain tables")
    cores: int = Field(3, ge=2, le=4, description="k, tensor-train cores per large feature: the vocabulary "
                       "is factored n <= n1...nk and dim = d1...dk")


# Unsharded forward: contract G1 x G2 for every digit pair when that table is at most this
# many floats (16 MiB); larger vocabularies contract per id.
PAIR_TABLE_FLOATS = 2**22
# ATen's CPU bmm runs a scalar loop when rows x columns x inner size of the matrices is below
# 400 and a vectorised kernel above; per-id TT products (4 x 16 x 4 at rank 16) fall below
# it, so they are zero-padded across it (2-3x faster per product on CPU, same sums).
BMM_SCALAR_LIMIT = 400
MAX_CORES = 4


def tt_dims(dim: int, cores: int = 3) -> tuple[int, ...]:
    """dim = d1*...*dk (k = ``cores``), as balanced as possible, the smallest factors in the
    middle (a middle core's row holds r*d*r floats, the costliest lookups per id)."""

    def splits(m: int, k: int) -> list[tuple[int, ...]]:
        if k == 1:
            return [(m,)]
        return [(a, *rest) for a in range(1, m + 1) if m % a == 0 for rest in splits(m // a, k - 1)]

    return min(splits(dim, cores), key=lambda t: (max(t) - min(t), t[1:-1], t[0]))


def tt_shape(n: int, cores: int = 3) -> tuple[int, ...]:
    """n <= n1*...*nk with n1 = ... = n(k-1) = ceil(n^(1/k)) (exact integer root) and nk the
    fewest rows that cover the rest."""
    n1 = max(1, round(n ** (1 / cores)))
    while n1**cores < n:
        n1 += 1
    while n1 > 1 and (n1 - 1) ** cores >= n:
        n1 -= 1
    head = n1 ** (cores - 1)
    return (n1,) * (cores - 1) + (-(-n // head),)


def tt_ranks(cores: int, r: int) -> tuple[int, ...]:
    """TT ranks r0..rk: 1 at both ends, ``r`` between cores."""
    return (1,) + (r,) * (cores - 1) + (1,)


def core_widths(dims: tuple[int, ...], r: int) -> tuple[int, ...]:
    """Floats per row of each core: r(j-1) * dj * rj."""
    rk = tt_ranks(len(dims), r)
    return tuple(rk[j] * d * rk[j + 1] for j, d in enumerate(dims))


def chunk_width(dims: tuple[int, ...], r: int, dim: int) -> int:
    return math.gcd(*core_widths(dims, r), dim)


@dataclass(frozen=True)
class TTPlan:
    shapes: tuple[tuple[int, ...] | None, ...]  # per feature (n1, ..., nk), None = plain table
    cardinalities: tuple[int, ...]
    dims: tuple[int, ...]  # (d1, ..., dk), product dim
    rank: int
    chunk: int  # width of every physical table
    dim: int
    bytes: int

    @property
    def cores(self) -> int:
        return len(self.dims)

    @property
    def num_parameters(self) -> int:
        w = core_widths(self.dims, self.rank)
        return sum(
            n * self.dim if s is None else sum(a * b for a, b in zip(s, w, strict=True))
            for s, n in zip(self.shapes, self.cardinalities, strict=True)
        )


def plan_tt(
    features: list[FeatureSpec],
    dim: int,
    budget_bytes: int | None = None,
    dtype: str = "fp32",
    rank: int = 16,
    threshold: int = 200,
    cores: int = 3,
) -> TTPlan:
    """Pure sizing. Features above ``threshold`` whose TT cores are smaller than a plain
    table get ``cores`` cores of TT rank r; the rest stay plain. With a budget, r is the
    largest rank <= ``rank`` whose tables fit (ranks whose core widths leave no
    multiple-of-4 chunk are skipped), then the leftover turns TT features back into plain
    tables, smallest vocabulary first (a budget >= full gives plain tables: exactly `full`)."""
    if rank < 1:
        raise ValueError(f"tt: knob rank must be >= 1, got {rank}")
    if not 2 <= cores <= MAX_CORES:
        raise ValueError(f"tt: knob cores must be in [2, {MAX_CORES}], got {cores}")
    dims = tt_dims(dim, cores)
    ranks = [r for r in range(rank, 0, -1) if chunk_width(dims, r, dim) % 4 == 0]
    if not ranks:
        raise ValueError(
            f"tt: no TT rank <= {rank} gives core widths {dims} x rank that share a multiple-of-4 "
            f"chunk at dim={dim} (FBGEMM); raise the knob rank (even ranks work at dim 16)"
        )
    b = DTYPE_BYTES[dtype]
    card = [f.cardinality for f in features]

    def tt_cost(n: int, r: int) -> int:
        return sum(a * w for a, w in zip(tt_shape(n, cores), core_widths(dims, r), strict=True)) * b

    def layout(r: int) -> list[tuple[int, ...] | None]:
        return [
            tt_shape(n, cores) if n > threshold and tt_cost(n, r) < n * dim * b else None for n in card
        ]

    def cost(shapes: list, r: int) -> int:
        return sum(n * dim * b if s is None else tt_cost(n, r) for s, n in zip(shapes, card, strict=True))

    r = ranks[0]
    shapes = layout(r)
    if budget_bytes is not None:
        for r in ranks:
            shapes = layout(r)
            if cost(shapes, r) <= budget_bytes:
                break
        else:
            minimum = cost(layout(ranks[-1]), ranks[-1])
            raise BudgetTooSmall(
                "tt",
                minimum,
                budget_bytes,
                f"TT rank {ranks[-1]}, {cores} cores for features > {threshold} ids, the rest plain",
            )
        left = budget_bytes - cost(shapes, r)
        for i in sorted((i for i, s in enumerate(shapes) if s is not None), key=lambda i: card[i]):
            delta = card[i] * dim * b - tt_cost(card[i], r)
            if delta <= left:
                shapes[i], left = None, left - delta
    return TTPlan(tuple(shapes), tuple(card), dims, r, chunk_width(dims, r, dim), dim, cost(shapes, r))


def _chunk_rows(rows: torch.Tensor, m: int) -> torch.Tensor:
    """Row ids of a ``m``-chunk-wide logical row -> the m physical rows, id-major."""
    if m == 1:
        return rows
    return (rows.unsqueeze(1) * m + torch.arange(m, device=rows.device)).reshape(-1)


def tt_digits(v: torch.Tensor, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Mixed-radix digits of int64 ids: i1 = v % n1, i2 = (v // n1) % n2, ... (exact)."""
    out, q = [], v
    for j, n in enumerate(shape):
        out.append(q % n)
        if j + 1 < len(shape):
            q = q // n
    return out


class TTRemap(nn.Module):
    """Raw ids -> the chunk rows of each core slice (physical features ``f@0..f@k-1``), or
    of the plain row (``f``). Parameter-free; integer floor division and remainders only."""

    def __init__(self, names: list[str], plan: TTPlan) -> None:
        super().__init__()
        self.names = list(names)
        self.shapes, self.cards = list(plan.shapes), list(plan.cardinalities)
        w = core_widths(plan.dims, plan.rank)
        self.core_chunks = [x // plan.chunk for x in w]
        self.plain_chunks = plan.dim // plan.chunk
        self.physical: list[str] = []
        self.chunks: dict[str, int] = {}  # physical feature -> chunk rows per id
        for n, s in zip(names, self.shapes, strict=True):
            if s is None:
                self.physical.append(n)
                self.chunks[n] = self.plain_chunks
            else:
                self.physical += [f"{n}@{k}" for k in range(len(s))]
                self.chunks.update({f"{n}@{k}": m for k, m in enumerate(self.core_chunks)})

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        # split_features: works on fx Proxies too (TorchRec's pipeline traces the model);
        # ids per key come from the input, so no data-dependent size (torch.export).
        vals, lens, _, lpk = split_features(kjt, self.names, False)
        ov, ol, olpk = [], [], []
        for i, (v, ln, s, n) in enumerate(zip(vals, lens, self.shapes, self.cards, strict=True)):
            v = v.to(torch.int64)
            if s is None:
                digits, chunks = [v % n], [self.plain_chunks]  # `% n`: wraps ids of an unbounded feature
            else:
                digits, chunks = tt_digits(v, s), self.core_chunks
            for digit, m in zip(digits, chunks, strict=True):
                ov.append(_chunk_rows(digit, m))
                ol.append(ln * m)
                if lpk is not None:
                    olpk.append(lpk[i] * m)
        return KeyedJaggedTensor(
            keys=self.physical,
            values=torch.cat(ov),
            lengths=torch.cat(ol),
            length_per_key=olpk if lpk is not None else None,
        )


def small_bmm(a: torch.Tensor, b: torch.Tensor, x: int, q: int, c: int) -> torch.Tensor:
    """``torch.bmm(a, b)`` of [N, x, q] by [N, q, c] (sizes given: static under fx); below
    ATen's scalar-loop limit, b's columns are zero-padded across it and the padding dropped
    (the forward and both backward products then take the vectorised kernel: they all
    multiply the same three sizes)."""
    if x * q * c >= BMM_SCALAR_LIMIT:
        return torch.bmm(a, b)
    pad = c * (-(-BMM_SCALAR_LIMIT // (x * q * c))) - c
    return torch.bmm(a, nn.functional.pad(b, (0, pad)))[:, :, :c]


def contract(first: torch.Tensor, cores: list[torch.Tensor], dims: tuple[int, ...], r: int) -> torch.Tensor:
    """Per-id TT product. ``first``: [N, d1*...*dj, r], the product of the first j cores;
    ``cores``: the remaining k - j slices, [N, r * di * ri] each (ri = 1 for the last).
    Returns [N, dim]: E[a, b, ...] = sum over the ranks of G1[a, p] G2[p, b, q] ...,
    row-major in (a, b, ...)."""
    m, ranks = first, tt_ranks(len(dims), r)
    j0 = len(dims) - len(cores)
    for j, g in zip(range(j0, len(dims)), cores, strict=True):
        rows, q, c = math.prod(dims[:j]), ranks[j], dims[j] * ranks[j + 1]
        m = small_bmm(m, g.reshape(-1, q, c), rows, q, c)
        m = m.reshape(-1, rows * dims[j], ranks[j + 1])
    return m.reshape(-1, math.prod(dims))


def pool_per_id(
    vec: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor | None, mean: bool
) -> torch.Tensor:
    """Per-id vectors [N, d] -> bags [len(lengths), d]: the sum of each bag's ids (times
    their weights), divided by the bag's length for MEAN pooling (TorchRec's rule). One
    segment sum (index_add over each id's bag number): its backward is a gather, no sort.
    In eager mode, bags of exactly one id each skip the sum (the same numbers); traced
    (fx, export) it always runs, with no data-dependent branch."""
    lengths = lengths.to(torch.int64)
    if not is_tracing() and vec.shape[0] == lengths.shape[0] and bool((lengths == 1).all()):
        return vec if weights is None else vec * weights.to(vec.dtype).unsqueeze(1)
    bag = torch.repeat_interleave(
        torch.arange(lengths.shape[0], device=vec.device), lengths, output_size=vec.shape[0]
    )
    if weights is not None:
        vec = vec * weights.to(vec.dtype).unsqueeze(1)
    out = vec.new_zeros((lengths.shape[0], vec.shape[1])).index_add(0, bag, vec)
    if mean:
        out = out / lengths.clamp(min=1).unsqueeze(1).to(out.dtype)
    return out


@register("tt", knobs=TTKnobs, plan=plan_tt)
class TTEmbedding(EmbeddingMethod):
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
        rank: int = 16,
        threshold: int = 200,
        cores: int = 3,
    ) -> None:
        super().__init__(features, dim=dim, budget_bytes=budget_bytes, dtype=dtype, sequence=sequence,
                         device=device, weighted=weighted)
        self.plan = p = plan_tt(self.features, dim, budget_bytes, dtype, rank=rank, threshold=threshold,
                                cores=cores)
        self.remap = TTRemap(self.feature_names, p)
        widths = core_widths(p.dims, p.rank)
        tables = []
        for f, s in zip(self.features, p.shapes, strict=True):
            n = f.cardinality
            if s is None:  # full's rows of this feature, U(+-sqrt(1/n)), reshaped into chunk-wide rows
                tables.append(
                    TableSpec(f"t_{f.name}", n * (dim // p.chunk), p.chunk, (f.name,),
                              ReshapedFeatureInit(f.name, n, dim))
                )
                continue
            # The paper's sampled-Gaussian init: k N(0, s^2) cores give products of
            # variance r^(k-1) s^(2k) (r^(k-1) terms per element); match the plain table's 1/(3n).
            k = len(s)
            std = (1 / (3 * n * p.rank ** (k - 1))) ** (1 / (2 * k))
            tables += [
                TableSpec(f"t_{f.name}@{j}", s[j] * (widths[j] // p.chunk), p.chunk, (f"{f.name}@{j}",),
                          _normal(std), product_of=k)
                for j in range(k)
            ]
        self._make_tables(tables, device, unpooled=True)

    def lookup(self, kjt: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        """Sharded tables (DMP replaced ``self.tables``): TorchRec's forward on the chunk
        rows, contracted per id in ``combine``. Unsharded: the per-id vectors themselves
        (keyed by the logical feature), computed from the weights directly: with three or
        more cores G1 x G2 is contracted once for all n1*n2 digit pairs (one GEMM; batched
        d1 x r x r products per id cost more on CPU), each id gathers its pair's rows and
        small products with the remaining cores finish it. Same values (up to summation
        order) and gradients."""
        t = self.tables
        if not self._contracts_in_lookup():
            return super().lookup(kjt)
        dims, r = self.plan.dims, self.plan.rank
        pv, pl, _, _ = split_features(kjt, self.remap.physical, False)  # fx Proxies too
        vals, lens = (
            dict(zip(self.remap.physical, pv, strict=True)),
            dict(zip(self.remap.physical, pl, strict=True)),
        )

        def rows(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            """(one row index per id, the weight viewed as one logical row per index)."""
            m, w = self.remap.chunks[name], t.embeddings[f"t_{name}"].weight
            v = vals[name]
            return (v if m == 1 else v.view(-1, m)[:, 0] // m), w.view(-1, m * w.shape[1])

        def gather(name: str) -> torch.Tensor:
            idx, w = rows(name)
            return w.index_select(0, idx).float()  # backward: index_add, no sort

        out = {}
        for f, s in zip(self.features, self.plan.shapes, strict=True):
            names = [f.name] if s is None else [f"{f.name}@{k}" for k in range(len(s))]
            lengths = lens[names[0]] // self.remap.chunks[names[0]]
            if s is None:
                out[f.name] = JaggedTensor(values=gather(f.name), lengths=lengths)
                continue
            d1, d2 = dims[0], dims[1]
            if len(s) > 2 and s[0] * s[1] * d1 * d2 * r <= PAIR_TABLE_FLOATS:
                n1, n2 = s[0], s[1]
                (i1, w1), (i2, w2) = rows(names[0]), rows(names[1])
                g2 = w2.float().view(n2, r, d2 * r).transpose(0, 1).reshape(r, n2 * d2 * r)
                pairs = (w1.float().view(n1 * d1, r) @ g2).view(n1 * d1 * n2, d2 * r)  # rows (i1, a, i2)
                a = torch.arange(d1, device=i1.device)
                pair_rows = (((i1 * d1).unsqueeze(1) + a) * n2 + i2.unsqueeze(1)).reshape(-1)
                first = pairs.index_select(0, pair_rows).view(-1, d1 * d2, r)
                rest = names[2:]
            else:
                first, rest = gather(names[0]).view(-1, d1, r), names[1:]
            vec = contract(first, [gather(n) for n in rest], dims, r)
            out[f.name] = JaggedTensor(values=vec, lengths=lengths)
        return out

    def _contracts_in_lookup(self) -> bool:
        """Unsharded tables: lookup() returns per-id vectors (eager and traced alike, so a
        trace equals eager exactly). Sharded (DMP replaced the tables): core slices."""
        return type(self.tables) is EmbeddingCollection

    def _per_id(
        self, looked: dict[str, JaggedTensor], computed: bool | None = None
    ) -> dict[str, torch.Tensor]:
        """Logical feature -> per-id vectors [N, dim] (fp32): ``looked`` holds them already
        (``computed``; default: the tables are unsharded, see ``lookup``), or it holds the
        core slices (sharded tables), contracted here per id."""
        dims, r = self.plan.dims, self.plan.rank
        if computed is None:
            computed = self._contracts_in_lookup()
        out = {}
        for f, s in zip(self.features, self.plan.shapes, strict=True):
            if s is None or computed:
                out[f.name] = looked[f.name].values().float().reshape(-1, self.dim)
                continue
            g = [looked[f"{f.name}@{k}"].values().float() for k in range(len(s))]
            out[f.name] = contract(g[0].reshape(-1, dims[0], r), g[1:], dims, r)
        return out

    def combine(self, looked: dict[str, JaggedTensor], features: KeyedJaggedTensor) -> KeyedTensor:
        vecs = self._per_id(looked)
        _, lens, ws, _ = split_features(features, self.feature_names, self.weighted)
        cols = [
            pool_per_id(vecs[f.name], lens[i], ws[i] if ws is not None else None, f.pooling.value == "MEAN")
            for i, f in enumerate(self.features)
        ]
        return self._keyed(torch.cat(cols, dim=1))

    def combine_sequence(
        self, seq: dict[str, JaggedTensor], features: KeyedJaggedTensor
    ) -> dict[str, JaggedTensor]:
        vecs = self._per_id(seq)
        _, lens, _, _ = split_features(features, self.feature_names, False)
        return {
            f.name: JaggedTensor(values=vecs[f.name], lengths=lens[i]) for i, f in enumerate(self.features)
        }


def _normal(std: float):
    def init(w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return w.normal_(0.0, std)

    return init
