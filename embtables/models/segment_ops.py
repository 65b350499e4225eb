"""Gathers and segment sums whose backward is a sparse-matrix product, not a scatter.

Behaviour models expand small tables to one row per history position and reduce back:
``x.index_select(0, index)`` (each distinct id's embedding to every position holding
it; each target row's query to its behaviours) and ``sum over each row's behaviours``.
On CPU, autograd's backward of a gather is ``index_add_``, which runs serially: with
~80k behaviours per batch it was ~30% of a DIN step. The same reduction written as a
CSR matrix (one row per output row, one column per position) times the gradient is a
parallel SpMM, 4-15x faster here. The forward results are identical; the gradients
equal ``index_add_``'s up to float summation order.

:class:`GatherPlan` holds the CSR matrix for one index and is built once per batch.
"""

from __future__ import annotations

import warnings

import torch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def offsets_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


def row_index(lengths: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Row id of every jagged value: ``[0]*l0 + [1]*l1 + ...``."""
    return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths,
                                   output_size=total)


class GatherPlan:
    """``index [N]`` into ``num_rows`` rows, with its CSR reduction matrix ``[num_rows, N]``."""

    def __init__(self, index: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, num_rows: int) -> None:
        self.index = index
        self.num_rows = num_rows
        self._crow, self._col = crow, col
        self._csr: dict[torch.dtype, torch.Tensor] = {}

    def csr(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._csr:
            n = self.index.numel()
            self._csr[dtype] = torch.sparse_csr_tensor(
                self._crow, self._col, torch.ones(n, dtype=dtype, device=self.index.device),
                size=(self.num_rows, n), check_invariants=False)
        return self._csr[dtype]

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor, total: int | None = None) -> GatherPlan:
        """Row ``r`` repeated ``lengths[r]`` times (jagged values in row order)."""
        n = int(lengths.sum()) if total is None else total
        return cls(row_index(lengths, n), offsets_from_lengths(lengths),
                   torch.arange(n, device=lengths.device),
                   len(lengths))

    @classmethod
    def unique(cls, values: torch.Tensor) -> tuple[torch.Tensor, GatherPlan]:
        """``torch.unique(values, return_inverse=True)`` as (distinct values, plan of the
        inverse), from a single sort."""
        srt, perm = torch.sort(values, stable=True)
        uniq, inv_sorted, counts = torch.unique_consecutive(srt, return_inverse=True, return_counts=True)
        inverse = torch.empty_like(inv_sorted).scatter_(0, perm, inv_sorted)
        crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        return uniq, cls(inverse, crow, perm, len(uniq))


    @classmethod
    def interleave(cls, plans: list[GatherPlan]) -> GatherPlan:
        """K plans over the same n positions, into K stacked tables (table k's rows follow
        tables 0..k-1), as one plan over ``n * K`` positions ordered (position, k):
        gathering with it and viewing ``[n, K * d]`` concatenates the K lookups per
        position without a ``torch.cat`` (and its copies in both directions)."""
        if len(plans) == 1:
            return plans[0]
        k, n = len(plans), plans[0].index.numel()
        offs = [0]
        for p in plans[:-1]:
            offs.append(offs[-1] + p.num_rows)
        index = torch.stack([p.index + o for p, o in zip(plans, offs, strict=True)], dim=1).reshape(-1)
        crow = torch.cat([plans[0]._crow[:1]] + [p._crow[1:] + i * n for i, p in enumerate(plans)])
        col = torch.cat([p._col * k + i for i, p in enumerate(plans)])
        return cls(index, crow, col, offs[-1] + plans[-1].num_rows)


class _GatherSplit(torch.autograd.Function):
    """``x[plan.index]`` viewed ``[n, width]`` and split at row ``at``, as two tensors whose
    backward is one SpMM (slicing one gathered tensor instead would zero-fill a full-size
    gradient per slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: GatherPlan, width: int, at: int):  # type: ignore[override]
        ctx.plan, ctx.d = plan, x.shape[1]
        per_row = width // x.shape[1]
        head, tail = plan.index[: at * per_row], plan.index[at * per_row:]
        return x.index_select(0, head).view(-1, width), x.index_select(0, tail).view(-1, width)

    @staticmethod
    def backward(ctx, g_head: torch.Tensor, g_tail: torch.Tensor):  # type: ignore[override]
        g = torch.cat([g_head.reshape(-1, ctx.d), g_tail.reshape(-1, ctx.d)])
        return ctx.plan.csr(g.dtype) @ g, None, None, None


def gather_split(x: torch.Tensor, plan: GatherPlan, width: int, at: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.index_select(0, plan.index).view(-1, width)`` split into rows ``[:at]`` and
    ``[at:]``, with an SpMM backward."""
    return _GatherSplit.apply(x, plan, width, at)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: GatherPlan) -> torch.Tensor:  # type: ignore[override]
        ctx.plan = plan
        return x.index_select(0, plan.index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return ctx.plan.csr(grad.dtype) @ grad.contiguous(), None


class _SegmentSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: torch.Tensor, plan: GatherPlan) -> torch.Tensor:  # type: ignore[override]
        ctx.plan = plan
        return plan.csr(values.dtype) @ values.contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad.index_select(0, ctx.plan.index), None


def gather(x: torch.Tensor, plan: GatherPlan) -> torch.Tensor:
    """``x.index_select(0, plan.index)`` with an SpMM backward."""
    if x.dim() != 2:
        return x.index_select(0, plan.index)
    return _Gather.apply(x, plan)


def segment_sum(values: torch.Tensor, plan: GatherPlan) -> torch.Tensor:
    """``out[r] = sum of values[i] with plan.index[i] == r`` (``[plan.num_rows, D]``)."""
    if values.dim() != 2 or values.shape[0] == 0:
        out = values.new_zeros((plan.num_rows, *values.shape[1:]))
        return out.index_add_(0, plan.index, values)
    return _SegmentSum.apply(values, plan)


def segment_softmax(scores: torch.Tensor, plan: GatherPlan) -> torch.Tensor:
    """Softmax of jagged scores ``[N]`` within each row of ``plan`` (rows with no values
    produce nothing)."""
    if scores.numel() == 0:
        return scores
    row = plan.index
    mx = scores.new_full((plan.num_rows,), float("-inf")).scatter_reduce(0, row, scores.detach(), "amax")
    e = torch.exp(scores - mx[row])
    return e / segment_sum(e, plan)[row]
