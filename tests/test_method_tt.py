"""`tt` (TT-Rec) against hand-computed tensor-train products, its sizing rule and TorchRec's DLRM."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import EmbWrap, method_feats, method_kjt
from torchrec import KeyedJaggedTensor
from torchrec.models.dlrm import DLRM as TorchRecDLRM

from embtables.embeddings import BudgetTooSmall, FeatureSpec, build, full_bytes, plan
from embtables.embeddings.tt import chunk_width, core_widths, plan_tt, tt_dims, tt_shape
from embtables.models.dlrm import DLRM, DLRMConfig

FEATS = method_feats()
kjt = method_kjt


def weights_of(mod) -> dict[str, torch.Tensor]:
    return {k: v.weight for k, v in mod.tables.embeddings.items()}


def test_factorisations():
    assert tt_dims(16) == (2, 2, 4) and tt_dims(8) == (2, 2, 2) and tt_dims(64) == (4, 4, 4)
    for n in (1, 7, 8, 9, 1000, 1001, 506561, 2**40 + 3):
        n1, n2, n3 = tt_shape(n)
        assert n1 * n2 * n3 >= n and n1 == n2 and (n1 - 1) ** 3 < n
    assert chunk_width((2, 2, 4), 16, 16) == 16 and chunk_width((2, 2, 4), 2, 16) == 4
    # other core counts: balanced widths, smallest in the middle; n1 = ... = n(k-1) = ceil(n^(1/k))
    assert tt_dims(16, 2) == (4, 4) and tt_dims(8, 2) == (2, 4) and tt_dims(16, 4) == (2, 2, 2, 2)
    assert tt_dims(16, 3) == tt_dims(16)
    assert tt_shape(100, 2) == (10, 10) and tt_shape(101, 2) == (11, 10) and tt_shape(17, 4) == (3, 3, 3, 1)
    for k in (2, 3, 4):
        for n in (1, 7, 1000, 1001, 2**40 + 3):
            s = tt_shape(n, k)
            assert len(s) == k and math.prod(s) >= n and (s[0] - 1) ** k < n
            assert math.prod(s[:-1]) * (s[-1] - 1) < n  # the last factor is the fewest that cover n
    assert core_widths((2, 2, 4), 3) == (6, 18, 12) and core_widths((4, 4), 3) == (12, 12)


def test_tt_product_on_2x2_cores_by_hand():
    # dim 8 = 2*2*2 at rank 2: G1[i1] is 2x2, G2[i2] is 2x(2x2), G3[i3] is 2x2; chunk width 4.
    mod = build([FeatureSpec("a", 1000)], method="tt", dim=8, rank=2, threshold=10, weighted=True)
    assert mod.plan.shapes == ((10, 10, 10),) and mod.plan.chunk == 4
    W = weights_of(mod)
    assert W["t_a@0"].shape == (10, 4) and W["t_a@1"].shape == (20, 4) and W["t_a@2"].shape == (10, 4)
    with torch.no_grad():
        for w in W.values():
            w.zero_()
        # id 123 -> digits (3, 2, 1)
        W["t_a@0"][3] = torch.tensor([1.0, 2, 0, 1])  # G1[a, p]: a=0 [1, 2], a=1 [0, 1]
        W["t_a@1"][4] = torch.tensor([1.0, 0, 0, 1])  # G2[p=0, b, q]
        W["t_a@1"][5] = torch.tensor([2.0, 1, 1, 0])  # G2[p=1, b, q]
        W["t_a@2"][1] = torch.tensor([1.0, -1, 2, 3])  # G3[q, c]: q=0 [1, -1], q=1 [2, 3]
    # E[a,b,c] = sum_pq G1[a,p] G2[p,b,q] G3[q,c], by hand:
    want_123 = torch.tensor([9.0, 1, 4, 1, 4, 1, 1, -1])
    x = KeyedJaggedTensor.from_lengths_sync(
        ["a"], torch.tensor([123]), torch.tensor([1]), weights=torch.tensor([1.0])
    )
    torch.testing.assert_close(mod(x).values()[0], want_123, rtol=0, atol=0)

    # a two-id weighted bag: per-id products, then the weighted sum (id 456 -> digits (6, 5, 4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        W["t_a@0"][6] = torch.randn(4, generator=g)
        W["t_a@1"][10:12] = torch.randn(2, 4, generator=g)
        W["t_a@2"][4] = torch.randn(4, generator=g)
    e456 = torch.einsum(
        "ap,pbq,qc->abc",
        W["t_a@0"][6].view(2, 2),
        W["t_a@1"][10:12].reshape(2, 2, 2),
        W["t_a@2"][4].view(2, 2),
    ).reshape(-1)
    y = KeyedJaggedTensor.from_lengths_sync(
        ["a"], torch.tensor([123, 456]), torch.tensor([2]), weights=torch.tensor([0.5, 2.0])
    )
    out = mod(y).values()[0]
    torch.testing.assert_close(out, 0.5 * want_123 + 2.0 * e456)
    # not the product of pooled cores (the contraction is per id)
    naive = torch.einsum(
        "ap,pbq,qc->abc",
        (0.5 * W["t_a@0"][3] + 2 * W["t_a@0"][6]).view(2, 2),
        (0.5 * W["t_a@1"][4:6] + 2 * W["t_a@1"][10:12]).reshape(2, 2, 2),
        (0.5 * W["t_a@2"][1] + 2 * W["t_a@2"][4]).view(2, 2),
    ).reshape(-1)
    assert not torch.allclose(out, naive)
    out.sum().backward()
    rows = W["t_a@1"].grad.abs().sum(1).nonzero().flatten().tolist()
    assert rows == [4, 5, 10, 11]


def test_two_cores_product_on_2x2_cores_by_hand():
    # cores=2, dim 4 = 2*2 at rank 2: G1[i1] is 2x2 (d1 x r), G2[i2] is 2x2 (r x d2): E = G1 @ G2.
    mod = build([FeatureSpec("a", 100)], method="tt", dim=4, rank=2, threshold=10, cores=2)
    assert mod.plan.shapes == ((10, 10),) and mod.plan.dims == (2, 2) and mod.plan.chunk == 4
    W = weights_of(mod)
    assert set(W) == {"t_a@0", "t_a@1"} and W["t_a@0"].shape == (10, 4) and W["t_a@1"].shape == (10, 4)
    with torch.no_grad():
        for w in W.values():
            w.zero_()
        # id 37 -> digits (7, 3)
        W["t_a@0"][7] = torch.tensor([1.0, 2, 3, 4])  # G1[a, p]: a=0 [1, 2], a=1 [3, 4]
        W["t_a@1"][3] = torch.tensor([5.0, 6, 7, 8])  # G2[p, c]: p=0 [5, 6], p=1 [7, 8]
    # [[1, 2], [3, 4]] @ [[5, 6], [7, 8]] = [[19, 22], [43, 50]], by hand
    x = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([37, 38]), torch.tensor([1, 1]))
    out = mod(x).values()
    torch.testing.assert_close(out[0], torch.tensor([19.0, 22, 43, 50]), rtol=0, atol=0)
    assert torch.all(out[1] == 0)  # id 38 -> digits (8, 3): G1[8] is zero
    out[0].sum().backward()
    assert W["t_a@1"].grad.abs().sum(1).nonzero().flatten().tolist() == [3]


def test_four_cores_equal_an_einsum_of_the_slices():
    mod = build([FeatureSpec("a", 5000)], method="tt", dim=16, rank=2, threshold=10, cores=4)
    n1, n2, n3, n4 = mod.plan.shapes[0]
    assert mod.plan.dims == (2, 2, 2, 2) and n1 == n2 == n3 == 9 and n4 == 7
    W = weights_of(mod)
    m = [w // mod.plan.chunk for w in core_widths(mod.plan.dims, 2)]  # chunk rows per core row
    ids = torch.tensor([0, 4999, 1234, 9 * 9 * 9 * 5 + 9 * 9 * 8 + 9 * 2 + 5])
    digits = [(int(v) % 9, int(v) // 9 % 9, int(v) // 81 % 9, int(v) // 729) for v in ids]
    assert digits[-1] == (5, 2, 8, 5)

    def core(k: int, i: int) -> torch.Tensor:
        return W[f"t_a@{k}"][i * m[k] : (i + 1) * m[k]].reshape(-1)

    want = torch.stack(
        [
            torch.einsum(
                "ap,pbq,qcs,sd->abcd",
                core(0, i).view(2, 2),
                core(1, j).view(2, 2, 2),
                core(2, k).view(2, 2, 2),
                core(3, t).view(2, 2),
            ).reshape(-1)
            for i, j, k, t in digits
        ]
    )
    out = mod(KeyedJaggedTensor.from_lengths_sync(["a"], ids, torch.ones(4, dtype=torch.int64))).values()
    torch.testing.assert_close(out, want.detach())


def test_cores_knob_sizing_and_refusals():
    for k in (2, 3, 4):
        p = plan(FEATS, "tt", dim=16, rank=4, cores=k)
        assert p.cores == k and all(s is None or len(s) == k for s in p.shapes)
        w = core_widths(p.dims, 4)
        want = sum(
            n * 16 if s is None else sum(a * b for a, b in zip(s, w, strict=True))
            for s, n in zip(p.shapes, p.cardinalities, strict=True)
        )
        assert p.bytes == 4 * want
        mod = build(FEATS, method="tt", dim=16, rank=4, cores=k, budget=1 / 8)
        assert mod.memory_bytes() == plan(FEATS, "tt", dim=16, rank=4, cores=k, budget=1 / 8).bytes
        assert mod(kjt()).values().shape == (3, 48)
    with pytest.raises(BudgetTooSmall, match="2 cores") as e:
        build(FEATS, method="tt", dim=16, cores=2, budget=1000)
    build(FEATS, method="tt", dim=16, cores=2, budget=e.value.minimum)  # the named minimum builds
    with pytest.raises(BudgetTooSmall):
        build(FEATS, method="tt", dim=16, cores=2, budget=e.value.minimum - 1)
    for bad in (1, 5):  # the knobs model refuses it, with the key path, before any sizing
        with pytest.raises(ValueError, match=r"embedding\.tt\.cores: Input should be"):
            plan(FEATS, "tt", dim=16, cores=bad)
        with pytest.raises(ValueError, match="knob cores must be in"):  # the sizing function alone
            plan_tt(FEATS, 16, None, "fp32", cores=bad)


def test_digits_are_exact_and_unique_above_2_24():
    n = 2**40 + 12345
    mod = build([FeatureSpec("x", n)], method="tt", dim=16, rank=2, threshold=10)
    n1, n2, n3 = mod.plan.shapes[0]
    ids = torch.tensor([0, 1, n - 1, 2**24 + 1, 2**24 + 2, n1 * n2 * 5 + n1 * 7 + 3])
    r = mod.remap(KeyedJaggedTensor.from_lengths_sync(["x"], ids, torch.ones(6, dtype=torch.int64))).to_dict()
    m = [w // mod.plan.chunk for w in (2 * 2, 2 * 2 * 2, 2 * 4)]
    d = [r[f"x@{k}"].values().view(-1, m[k])[:, 0] // m[k] for k in range(3)]
    got = list(zip(*(t.tolist() for t in d), strict=True))
    want = [(int(v) % n1, (int(v) // n1) % n2, int(v) // (n1 * n2)) for v in ids]
    assert got == want and got[-1] == (3, 7, 5)
    assert len(set(got)) == len(got)


def test_sizing_rank_budget_and_minimum():
    full = full_bytes(FEATS, 16)
    p = plan(FEATS, "tt", dim=16)
    assert p.rank == 16 and p.shapes[1] is None and p.shapes[0] == (10, 10, 10)  # "b" (50 ids) stays plain
    d1, d2, d3 = p.dims
    assert (
        p.bytes
        == (
            10 * d1 * 16
            + 10 * 16 * d2 * 16
            + 10 * 16 * d3
            + 50 * 16
            + 15 * d1 * 16
            + 15 * 16 * d2 * 16
            + 14 * 16 * d3
        )
        * 4
    )
    for budget in (1.0, 1 / 4, 1 / 16, 20_000, 6_000):
        q = plan(FEATS, "tt", dim=16, budget=budget)
        mod = build(FEATS, method="tt", dim=16, budget=budget)
        cap = int(budget * full) if isinstance(budget, float) else budget
        assert mod.memory_bytes() == q.bytes <= cap
        assert mod(kjt()).values().shape == (3, 48)
    assert plan(FEATS, "tt", dim=16, budget=1.0).shapes == (None, None, None)  # budget >= full: plain tables
    assert plan(FEATS, "tt", dim=16, budget=20_000).rank < 16  # rank lowered to fit
    with pytest.raises(BudgetTooSmall) as e:
        build(FEATS, method="tt", dim=16, budget=1000)
    build(FEATS, method="tt", dim=16, budget=e.value.minimum)  # the named minimum builds
    with pytest.raises(BudgetTooSmall):
        build(FEATS, method="tt", dim=16, budget=e.value.minimum - 1)


def test_init_matches_a_plain_tables_variance():
    n = 200_000
    mod = build([FeatureSpec("x", n)], method="tt", dim=16)
    assert mod.plan.shapes[0] is not None
    ids = torch.randint(0, n, (20_000,), generator=torch.Generator().manual_seed(1))
    out = mod(KeyedJaggedTensor.from_lengths_sync(["x"], ids, torch.ones_like(ids))).values()
    var = out.var().item()
    assert 0.6 / (3 * n) < var < 1.6 / (3 * n)


def test_sequence_face_equals_pooled_on_single_id_bags_and_mean_pooling():
    pooled = build(FEATS, method="tt", dim=16, rank=4)
    seq = build(FEATS, method="tt", dim=16, rank=4, sequence=True)
    seq.load_state_dict(pooled.state_dict())
    x = KeyedJaggedTensor.from_lengths_sync(
        ["a", "b", "c"], torch.tensor([5, 7, 9, 1, 2, 3, 100, 200, 300]), torch.ones(9, dtype=torch.int64)
    )
    s, p = seq(x), pooled(x).to_dict()
    for n in ("a", "b", "c"):
        torch.testing.assert_close(s[n].values(), p[n])
    mean = build(
        [FeatureSpec("a", 1000, pooling=__import__("torchrec").PoolingType.MEAN)], method="tt", dim=16, rank=4
    )
    mean.load_state_dict({k: v for k, v in pooled.state_dict().items() if "t_a@" in k})
    y = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([5, 7, 9]), torch.tensor([3, 0]))
    torch.testing.assert_close(mean(y).values()[0], p["a"][:3].mean(0))
    assert torch.all(mean(y).values()[1] == 0)


def test_int32_ids_equal_int64_and_weighted_bags():
    mod = build(FEATS, method="tt", dim=16, weighted=True)
    a = mod(kjt(weights=True)).values()
    b = mod(kjt(weights=True, dtype=torch.int32)).values()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_key_order_and_extra_keys_like_an_ebc():
    mod = build(FEATS, method="tt", dim=16).eval()
    x = kjt()
    d = x.to_dict()
    d["extra"] = d["a"]
    y = KeyedJaggedTensor.from_jt_dict({k: d[k] for k in ["c", "extra", "a", "b"]})
    torch.testing.assert_close(mod(y).values(), mod(x).values())


def test_inside_torchrec_and_embtables_dlrm():
    mod = build(FEATS, method="tt", dim=16, budget=1 / 16)
    model = TorchRecDLRM(
        embedding_bag_collection=mod,
        dense_in_features=4,
        dense_arch_layer_sizes=[8, 16],
        over_arch_layer_sizes=[8, 1],
    )
    model(torch.randn(3, 4), kjt()).sum().backward()
    assert all(w.grad is not None for w in weights_of(mod).values())
    ours = DLRM(build(FEATS, method="tt", dim=16), 4, DLRMConfig(bottom_mlp=[8], top_mlp=[8]))
    logits = ours(torch.randn(3, 4), kjt())
    assert logits.shape == (3,)
    logits.sum().backward()
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in ours.state_dict().items() if "tables" in k)


@pytest.mark.parametrize("pair_table, cores", [(True, 3), (False, 3), (True, 4), (False, 2)])
def test_unsharded_fast_path_equals_torchrec_chunk_lookup_and_per_id_contraction(
    pair_table, cores, monkeypatch
):
    """Unsharded lookups compute per-id vectors from the weights (G1 x G2 for every digit
    pair, or per id); sharded ones go through TorchRec's EmbeddingCollection on the chunk
    rows and contract per id in combine. Both must give the same outputs and gradients."""
    import embtables.embeddings.tt as tt

    if not pair_table:
        monkeypatch.setattr(tt, "PAIR_TABLE_FLOATS", 0)
    mod = build(FEATS, method="tt", dim=16, rank=4, weighted=True, cores=cores)
    # core widths 8, 32, 16 (cores=3), 16, 16 (cores=2), 8, 32, 32, 8 (cores=4); plain width 16
    assert mod.plan.chunk == {2: 16, 3: 8, 4: 8}[cores]
    remapped = mod.remap(kjt(weights=True))
    fast = mod._per_id(mod.lookup(remapped), computed=True)
    # TorchRec's own EmbeddingCollection forward on the chunk rows, contracted per id
    slow = mod._per_id(mod.tables(remapped), computed=False)
    assert set(fast) == set(slow) == {"a", "b", "c"}
    params = list(mod.tables.parameters())
    loss_fast, loss_slow = (sum((v**2).sum() for v in d.values()) for d in (fast, slow))
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-6, atol=1e-7)
    g_fast = torch.autograd.grad(loss_fast, params)
    g_slow = torch.autograd.grad(loss_slow, params)
    for a, b in zip(g_fast, g_slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_dmp_shards_the_tables_and_matches_unsharded(one_rank):
    from torchrec.distributed.model_parallel import DistributedModelParallel

    mod = build(FEATS, method="tt", dim=16, budget=1 / 16, weighted=True)
    x = kjt(weights=True)
    ref = mod(x).values().detach().clone()
    saved = {f"emb.{k}": v.clone() for k, v in mod.state_dict().items()}
    dmp = DistributedModelParallel(EmbWrap(mod), device=torch.device("cpu"))
    dmp.load_state_dict(saved, strict=False)  # DMP does not copy weights into shards on CPU
    assert type(dmp.module.emb.tables).__name__.startswith("Sharded")
    out = dmp(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.sum().backward()
