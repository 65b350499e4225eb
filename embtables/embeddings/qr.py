"""`qr`: compositional embeddings from complementary partitions (Shi et al. 2020).

An id x < n is written in mixed radix: x = d_0 + m*(d_1 + m*(d_2 + ...)), digits
d_0..d_{k-2} in [0, m) and a top digit (the quotient) in [0, ceil(n / m^(k-1))). Each
digit indexes its own table; distinct ids < n get distinct digit tuples, so the
partitions are complementary. k=2 is the classic quotient/remainder trick. The k
lookups are combined by ``mult`` (element-wise product), ``add`` or ``concat`` (each
table dim/k wide, so the output stays ``dim``). Integer floor division only: exact for
any int64 id (floats would merge ids above 2^24).

``mult`` is not linear in the lookups, so it looks ids up unpooled (an
EmbeddingCollection), multiplies per id and then pools; a bag holding exactly one
id skips the pooling scatter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from pydantic import Field
from torch import nn
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from embtables.embeddings.base import EmbeddingMethod, TableSpec, is_tracing, split_features
from embtables.embeddings.budget import DTYPE_BYTES, BudgetTooSmall, feature_weights, split_budget
from embtables.embeddings.registry import Knobs, register
from embtables.embeddings.spec import FeatureSpec
from embtables.embeddings.table_init import RowBlock, SeededInit, feature_init

Operation = Literal["mult", "add", "concat"]
OPERATIONS: tuple[str, ...] = get_args(Operation)


class QRKnobs(Knobs):
    """``embedding.qr``."""

    operation: Operation = Field("mult", description="how the digit embeddings combine: element-wise "
                                 "product, sum, or concatenation of dim/k-wide parts")
    partitions: int = Field(2, ge=2, description="k, the number of digits (tables) per feature")
    m: int | None = Field(None, ge=2, description="radix = rows of each remainder table; null: from the "
                          "budget, 4 without a budget (DLRM's qr_collisions)")
    threshold: int = Field(200, ge=0, description="features with at most this many ids stay plain tables")


def qr_radices(n: int, k: int, m: int) -> tuple[int, ...]:
    """Table sizes (low digits first, quotient last) for cardinality n, k partitions, radix m."""
    return (m,) * (k - 1) + (-(-n // m ** (k - 1)),)


def qr_rows(n: int, k: int, m: int) -> int:
    return sum(qr_radices(n, k, m))


def best_radix(n: int, k: int) -> int:
    """The radix m >= 2 minimising the total rows (about n ** (1/k))."""
    guess = max(2, round(n ** (1.0 / k)))
    cands = range(max(2, guess - 3), guess + 4)
    return min(cands, key=lambda m: (qr_rows(n, k, m), m))


def radix_for_rows(n: int, k: int, max_rows: int) -> int | None:
    """Smallest radix m >= 2 whose tables fit in ``max_rows`` (None if none does).
    Small m = a big quotient table = closer to a full table."""
    hi = best_radix(n, k)
    if qr_rows(n, k, hi) > max_rows:
        return None
    lo = 2
    while lo < hi:  # qr_rows is non-increasing on [2, best_radix] up to rounding; fix up below
        mid = (lo + hi) // 2
        if qr_rows(n, k, mid) <= max_rows:
            hi = mid
        else:
            lo = mid + 1
    while qr_rows(n, k, lo) > max_rows:
        lo += 1
    return lo


@dataclass(frozen=True)
class QRPlan:
    radices: tuple[tuple[int, ...], ...]  # per feature; () = plain table (one row per id)
    cardinalities: tuple[int, ...]
    dim: int
    width: int                            # width of each partition table
    operation: Operation
    bytes: int

    @property
    def num_parameters(self) -> int:
        return sum(n * self.dim if not r else sum(r) * self.width
                   for r, n in zip(self.radices, self.cardinalities, strict=True))


def plan_qr(
    features: list[FeatureSpec], dim: int, budget_bytes: int | None = None, dtype: str = "fp32",
    operation: Operation = "mult", partitions: int = 2, m: int | None = None, threshold: int = 200,
) -> QRPlan:
    """Pure sizing. Features with cardinality <= ``threshold`` (or where QR would not
    save memory) stay plain. ``m`` fixes the radix (rows of each remainder table);
    otherwise the budget is water-filled (weights sqrt(cardinality), each feature
    between its smallest QR size and its full size) and each feature takes the
    smallest radix that fits its share; with neither, m = 4 (DLRM's qr_collisions)."""
    if operation not in OPERATIONS:
        raise ValueError(f"qr: knob operation must be one of {OPERATIONS}, got {operation!r}")
    k = partitions
    if k < 2:
        raise ValueError(f"qr: knob partitions must be >= 2, got {k}")
    width = dim // k if operation == "concat" else dim
    if operation == "concat" and (dim % k or width % 4):
        raise ValueError(f"qr: concat splits dim={dim} into {k} tables of dim/{k}; "
                         f"that must be a multiple of 4 (FBGEMM), "
                         f"so use dim a multiple of {4 * k} or operation='mult'/'add'")
    b = DTYPE_BYTES[dtype]
    card = [f.cardinality for f in features]
    full_cost = [n * dim * b for n in card]

    def compressible(n: int) -> bool:
        return n > threshold and qr_rows(n, k, best_radix(n, k)) * width < n * dim

    def cost(n: int, rad: tuple[int, ...]) -> int:
        return n * dim * b if not rad else sum(rad) * width * b

    radices: list[tuple[int, ...]] = []
    if m is not None or budget_bytes is None:
        mm = 4 if m is None else m
        if mm < 2:
            raise ValueError(f"qr: knob m must be >= 2, got {m}")
        for n in card:
            rad = qr_radices(n, k, mm) if compressible(n) else ()
            radices.append(rad if rad and sum(rad) * width < n * dim else ())
    else:
        mins = [cost(n, qr_radices(n, k, best_radix(n, k))) if compressible(n) else c
                for n, c in zip(card, full_cost, strict=True)]
        if sum(mins) > budget_bytes:
            raise BudgetTooSmall("qr", sum(mins), budget_bytes,
                                 f"{k} partitions at radix ~n^(1/{k}), features <= {threshold} rows plain")
        shares = split_budget(budget_bytes, feature_weights(card), mins, full_cost)
        for n, s, c in zip(card, shares, full_cost, strict=True):
            if not compressible(n) or s >= c:
                radices.append(())
            else:
                mm = radix_for_rows(n, k, math.floor(s / (width * b) + 1e-9))
                assert mm is not None  # s >= the minimum by construction
                radices.append(qr_radices(n, k, mm))
        _spend_leftover(radices, card, k, width, b, dim, budget_bytes - sum(cost(n, r) for n, r in
                                                                           zip(card, radices, strict=True)))
    nbytes = sum(cost(n, r) for n, r in zip(card, radices, strict=True))
    if budget_bytes is not None and nbytes > budget_bytes:
        mins = sum(cost(n, qr_radices(n, k, best_radix(n, k))) if compressible(n) else n * dim * b
                   for n in card)
        raise BudgetTooSmall("qr", mins, budget_bytes,
                             f"m={m} needs {nbytes} bytes; drop m to size from the budget")
    return QRPlan(tuple(radices), tuple(card), dim, width, operation, nbytes)


def _spend_leftover(radices: list[tuple[int, ...]], card: list[int], k: int, width: int, b: int, dim: int,
                    left: int) -> None:
    """QR sizes are discrete (the largest QR table, radix 2, is ~n/2^(k-1) rows), so the
    water-filled shares can leave budget unused: turn the features that fit back into
    plain tables (cheapest upgrade first), then shrink radices with what is left."""
    def cost(i: int) -> int:
        return card[i] * dim * b if not radices[i] else sum(radices[i]) * width * b

    for i in sorted((i for i, r in enumerate(radices) if r), key=lambda i: card[i] * dim * b - cost(i)):
        delta = card[i] * dim * b - cost(i)
        if delta <= left:
            radices[i], left = (), left - delta
    for i in sorted((i for i, r in enumerate(radices) if r), key=lambda i: -card[i]):
        old = cost(i)
        mm = radix_for_rows(card[i], k, (old + left) // (width * b))
        if mm is not None and mm < radices[i][0]:
            radices[i] = qr_radices(card[i], k, mm)
            left -= cost(i) - old


class QRRemap(nn.Module):
    """Raw ids -> one digit per partition (physical features ``f@0..f@k-1``), or the id
    itself for plain features (concat: the id offset into each of k column slices)."""

    def __init__(self, names: list[str], cards: list[int], radices: list[tuple[int, ...]], k: int,
                 concat: bool, weighted: bool = False) -> None:
        super().__init__()
        self.names, self.cards, self.radices, self.k, self.concat = names, cards, radices, k, concat
        self.weighted = weighted
        self.physical: list[str] = []
        for n, r in zip(names, radices, strict=True):
            self.physical += [f"{n}@{j}" for j in range(k)] if (r or concat) else [n]

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        vals, lens, ws, lpk = split_features(kjt, self.names, self.weighted)
        ov, ol, ow, olpk = [], [], [], []
        for i, (v, n, rad) in enumerate(zip(vals, self.cards, self.radices, strict=True)):
            v = v.to(torch.int64)
            if rad:
                div = 1
                for r in rad:
                    # floor division and remainder on int64: exact for every id; the top
                    # digit wraps modulo its table for ids of an unbounded feature.
                    ov.append((v // div) % r if div > 1 else v % r)
                    div *= r
            elif self.concat:  # `% n`: a no-op for checked ids, wraps those of an unbounded feature
                base = v % n
                ov += [base + j * n for j in range(self.k)]
            else:
                ov.append(v % n)
            reps = len(rad) if rad else (self.k if self.concat else 1)
            ol += [lens[i]] * reps
            if ws is not None:
                ow += [ws[i]] * reps
            if lpk is not None:  # from the input: no data-dependent size (torch.export)
                olpk += [lpk[i]] * reps
        return KeyedJaggedTensor(
            keys=self.physical, values=torch.cat(ov), lengths=torch.cat(ol),
            weights=torch.cat(ow) if ws is not None else None,
            length_per_key=olpk if lpk is not None else None,
        )


@register("qr", knobs=QRKnobs, plan=plan_qr)
class QREmbedding(EmbeddingMethod):
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
        operation: Operation = "mult",
        partitions: int = 2,
        m: int | None = None,
        threshold: int = 200,
    ) -> None:
        super().__init__(features, dim=dim, budget_bytes=budget_bytes, dtype=dtype, sequence=sequence,
                         device=device, weighted=weighted)
        self.plan = p = plan_qr(self.features, dim, budget_bytes, dtype, operation=operation,
                                partitions=partitions, m=m, threshold=threshold)
        self.operation, self.k = operation, partitions
        concat = operation == "concat"
        self.remap = QRRemap(self.feature_names, list(p.cardinalities), list(p.radices), partitions,
                             concat, weighted)
        k = partitions
        tables = []
        for f, rad in zip(self.features, p.radices, strict=True):
            n = f.cardinality
            if operation == "mult" and f.pooling != PoolingType.SUM:
                raise ValueError(f"qr: feature {f.name!r}: operation='mult' supports SUM pooling only")
            if not rad and not concat:  # plain: exactly `full`'s table and rows
                tables.append(TableSpec(f"t_{f.name}", n, dim, (f.name,), feature_init(f.name, n, dim),
                                        f.pooling))
            elif not rad:  # plain feature as k column slices of one table: every table is dim/k wide
                slices = tuple(RowBlock(f.name, j * n, n, dim, math.sqrt(1 / n), j * p.width)
                               for j in range(k))
                parts = tuple(f"{f.name}@{j}" for j in range(k))
                tables.append(TableSpec(f"t_{f.name}", k * n, p.width, parts, SeededInit(slices), f.pooling))
            else:
                # Symmetric init scaled so the combined vector has the variance of a
                # plain table's default init U(+-sqrt(1/n)), i.e. var 1/(3n).
                if operation == "mult":
                    bound = math.sqrt(3) * (1 / (3 * n)) ** (1 / (2 * k))
                elif operation == "add":
                    bound = math.sqrt(1 / (k * n))
                else:
                    bound = math.sqrt(1 / n)
                tables += [TableSpec(f"t_{f.name}@{j}", r, p.width, (f"{f.name}@{j}",),
                                     feature_init(f"{f.name}@{j}", r, p.width, bound), f.pooling,
                                     product_of=k if operation == "mult" else 1)
                           for j, r in enumerate(rad)]
        self._make_tables(tables, device, unpooled=sequence or operation == "mult")
        self.weighted = weighted

    # ---- combine ----------------------------------------------------------------------
    def _per_id(self, looked: dict[str, JaggedTensor], i: int) -> tuple[torch.Tensor, JaggedTensor]:
        """Per-id vectors [N_f, dim] of logical feature i, and one physical JT (lengths)."""
        f, rad = self.features[i], self.plan.radices[i]
        if not rad and self.operation != "concat":
            jt = looked[f.name]
            return jt.values(), jt
        parts = [looked[f"{f.name}@{j}"] for j in range(self.k)]
        vals = [jt.values() for jt in parts]
        if not rad or self.operation == "concat":
            out = torch.cat(vals, dim=1)
        elif self.operation == "add":
            out = torch.stack(vals).sum(0)
        else:
            out = vals[0]
            for v in vals[1:]:
                out = out * v
        return out, parts[0]

    def combine_sequence(self, seq: dict[str, JaggedTensor],
                         features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        out = {}
        for i, f in enumerate(self.features):
            v, jt = self._per_id(seq, i)
            out[f.name] = JaggedTensor(values=v, lengths=jt.lengths(), offsets=jt.offsets())
        return out

    def combine(self, looked, features: KeyedJaggedTensor) -> KeyedTensor:
        if self.operation == "mult":
            return self._combine_mult(looked, features)
        values = self.pooled_values(looked)
        if self.operation == "concat":
            return self._keyed(values)  # each feature's k slices of dim/k are already adjacent
        # add. torch.split, not slicing: each slice's backward would zero-fill a full
        # [B, total width] gradient (26 of them made `add` 4x slower).
        widths = [self.dim * (self.k if rad else 1) for rad in self.plan.radices]
        parts = torch.split(values, widths, dim=1)  # indexed, not iterated: an fx Proxy cannot be
        cols = [parts[i] if not rad else parts[i].view(-1, self.k, self.dim).sum(1)
                for i, rad in enumerate(self.plan.radices)]
        return self._keyed(torch.cat(cols, dim=1))

    def _combine_mult(self, looked: dict[str, JaggedTensor], features: KeyedJaggedTensor) -> KeyedTensor:
        ws = None
        if self.weighted:
            _, _, ws, _ = split_features(features, self.feature_names, True)
        cols = []
        tracing = is_tracing()
        for i in range(len(self.features)):
            v, jt = self._per_id(looked, i)
            if ws is not None:
                v = v * ws[i].to(v.dtype).unsqueeze(1)
            lengths = jt.lengths()
            stride = lengths.numel()
            if not tracing and v.shape[0] == stride and bool((lengths == 1).all()):
                pooled = v  # fast path (eager only: a data-dependent branch): every bag holds one id
            else:
                bag = torch.repeat_interleave(torch.arange(stride, device=v.device), lengths,
                                              output_size=v.shape[0])
                pooled = v.new_zeros((stride, v.shape[1])).index_add(0, bag, v)
            cols.append(pooled)
        return self._keyed(torch.cat(cols, dim=1))
