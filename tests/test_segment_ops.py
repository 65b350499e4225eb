"""The SpMM-backed gather / segment sum and the hand-written Dice backward equal the plain
autograd versions they replace (values exactly, gradients to float tolerance)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from embtables.models.segment_ops import GatherPlan, gather, gather_split, segment_sum
from embtables.models.seq_common import Dice


def test_unique_plan_matches_torch_unique():
    torch.manual_seed(0)
    v = torch.randint(0, 50, (1000,)) * 7 - 100
    uniq, plan = GatherPlan.unique(v)
    ref_u, ref_inv = torch.unique(v, return_inverse=True)
    assert torch.equal(uniq, ref_u) and torch.equal(plan.index, ref_inv)
    assert torch.equal(uniq[plan.index], v)


@pytest.mark.parametrize("make", ["lengths", "unique"])
def test_gather_and_segment_sum_equal_index_ops_with_gradients(make):
    torch.manual_seed(1)
    if make == "lengths":
        lengths = torch.tensor([3, 0, 5, 1, 0, 7])  # empty rows included
        plan = GatherPlan.from_lengths(lengths)
        rows = len(lengths)
    else:
        _, plan = GatherPlan.unique(torch.randint(0, 9, (40,)))
        rows = plan.num_rows
    x = torch.randn(rows, 4, dtype=torch.double, requires_grad=True)
    y = gather(x, plan)
    assert torch.equal(y, x.detach().index_select(0, plan.index))
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    ref = torch.zeros(rows, 4, dtype=torch.double).index_add_(0, plan.index, g)
    torch.testing.assert_close(gx, ref)

    vals = torch.randn(len(plan.index), 3, dtype=torch.double, requires_grad=True)
    s = segment_sum(vals, plan)
    torch.testing.assert_close(s, torch.zeros(rows, 3, dtype=torch.double)
                               .index_add_(0, plan.index, vals.detach()))
    gs = torch.randn_like(s)
    (gv,) = torch.autograd.grad(s, vals, gs)
    assert torch.equal(gv, gs[plan.index])
    assert torch.autograd.gradcheck(lambda a: gather(a, plan), (x,))
    assert torch.autograd.gradcheck(lambda a: segment_sum(a, plan), (vals,))


def test_dice_training_backward_equals_batchnorm_autograd():
    torch.manual_seed(2)
    dice = Dice(6).double().train()
    with torch.no_grad():
        dice.alpha.uniform_(-0.8, 0.8)
    x = (torch.randn(200, 6, dtype=torch.double) * 3 + 1).requires_grad_()

    def reference(x):  # eq. 9 through autograd's own BatchNorm backward
        p = torch.sigmoid(F.batch_norm(x, None, None, training=True, eps=dice.bn.eps))
        return p * x + (1 - p) * dice.alpha * x

    y = dice(x)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, dice.alpha), g)
    want = torch.autograd.grad(reference(x), (x, dice.alpha), g)
    torch.testing.assert_close(y, reference(x))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    small = x[:30].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: dice(a), (small,))


def test_interleaved_gather_split_equals_concatenated_lookups():
    torch.manual_seed(3)
    vals = [torch.randint(0, 6, (30,)), torch.randint(0, 4, (30,))]
    plans, tables = [], []
    for v in vals:
        u, p = GatherPlan.unique(v)
        plans.append(p)
        tables.append(torch.randn(len(u), 3, dtype=torch.double, requires_grad=True))
    ref = torch.cat([t.index_select(0, p.index) for t, p in zip(tables, plans, strict=True)], dim=1)
    head, tail = gather_split(torch.cat(tables), GatherPlan.interleave(plans), 6, 7)
    assert torch.equal(head, ref[:7]) and torch.equal(tail, ref[7:])
    g = torch.randn(30, 6, dtype=torch.double)
    want = torch.autograd.grad(ref, tables, g)
    got = torch.autograd.grad((head * g[:7]).sum() + (tail * g[7:]).sum(), tables)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
