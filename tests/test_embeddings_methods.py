"""Methods against hand-computed oracles: bags, weights, gradients, sequence faces, DLRM."""

from __future__ import annotations

import logging

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, JaggedTensor, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM

from embtables.embeddings import FeatureSpec, build, list_methods
from embtables.embeddings.hashing import hash_to_rows, salt

torch.set_num_threads(1)
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

FEATS = [FeatureSpec("a", 1000), FeatureSpec("b", 50), FeatureSpec("c", 3000)]
METHODS = [("full", {}), ("hash", {"rows": 300}), ("qr", {"operation": "mult"}), ("qr", {"operation": "add"}),
           ("qr", {"operation": "concat"}), ("qr", {"partitions": 3, "m": 5}),
           ("unified", {"rows": 500, "probes": 2}), ("unified", {"rows": 500, "num_tables": 2, "probes": 2}),
           ("mch", {"rows": 200})]
IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in kn.items())}" for m, kn in METHODS]


def kjt(weights: bool = False, single: bool = False) -> KeyedJaggedTensor:
    """3 features x batch 3; multi-id bags, an empty bag, ids at the vocabulary edge."""
    if single:
        lengths = [1, 1, 1, 1, 1, 1, 1, 1, 1]
        values = [3, 999, 17, 0, 49, 7, 2999, 5, 1234]
    else:
        lengths = [3, 0, 1, 2, 1, 1, 1, 2, 3]
        values = [3, 999, 17, 4, 0, 49, 7, 11, 2999, 5, 6, 1234, 42, 2999]
    w = torch.rand(len(values), generator=torch.Generator().manual_seed(3)) if weights else None
    return KeyedJaggedTensor.from_lengths_sync(["a", "b", "c"], torch.tensor(values), torch.tensor(lengths),
                                               weights=w)


def tables_of(mod) -> dict[str, torch.Tensor]:
    """Physical table name -> weight, for EBC and EC alike."""
    bags = getattr(mod.tables, "embedding_bags", None) or mod.tables.embeddings
    return {k: v.weight for k, v in bags.items()}


def copy_tables(src, dst) -> None:
    with torch.no_grad():
        for k, w in tables_of(dst).items():
            w.copy_(tables_of(src)[k])


def bag_rows(kj: KeyedJaggedTensor, name: str, b: int) -> torch.Tensor:
    jt = kj[name]
    off = jt.offsets()
    return jt.values()[off[b]:off[b + 1]]


# ---- full ----------------------------------------------------------------------------
def test_full_equals_torchrec_ebc_with_same_weights():
    cfgs = [EmbeddingBagConfig(name=f"tbl_{f.name}", num_embeddings=f.cardinality, embedding_dim=8,
                               feature_names=[f.name]) for f in FEATS]
    ebc = EmbeddingBagCollection(tables=cfgs, is_weighted=True)
    mod = build(ebc, method="full", dim=8)  # one-line swap: configs, dims, weightedness from the EBC
    assert mod.is_weighted()
    with torch.no_grad():
        for f in FEATS:
            # the EBC's names
            tables_of(mod)[f"tbl_{f.name}"].copy_(ebc.embedding_bags[f"tbl_{f.name}"].weight)
    x = kjt(weights=True)
    a, b = ebc(x), mod(x)
    assert a.keys() == b.keys() and a.length_per_key() == b.length_per_key()
    torch.testing.assert_close(a.values(), b.values(), rtol=0, atol=0)


# ---- a bag's output equals the hand-computed sum ----------------------------------------
def test_hash_bag_equals_hand_sum_of_hashed_rows_with_weights():
    mod = build(FEATS, method="hash", dim=8, rows=300, weighted=True)
    assert mod.plan.rows == (300, 50, 300) and mod.plan.identity == (False, True, False)
    x = kjt(weights=True)
    out = mod(x).to_dict()
    W = tables_of(mod)
    for name, rows in (("a", 300), ("b", 50), ("c", 300)):
        for b in range(3):
            ids = bag_rows(x, name, b)
            w = x[name].weights()[x[name].offsets()[b]:x[name].offsets()[b + 1]]
            r = ids % rows if name == "b" else hash_to_rows(ids, salt(name, 0), rows)
            want = (W[f"t_{name}"][r] * w[:, None]).sum(0)
            torch.testing.assert_close(out[name][b], want)


def test_qr_mult_three_id_bag_is_sum_of_per_id_products():
    mod = build(FEATS, method="qr", dim=8, m=40, weighted=True)
    x = kjt(weights=True)
    out = mod(x).to_dict()
    W = tables_of(mod)
    ids = bag_rows(x, "a", 0)
    assert ids.numel() == 3
    w = x["a"].weights()[:3]
    want = sum(w[i] * W["t_a@0"][ids[i] % 40] * W["t_a@1"][ids[i] // 40] for i in range(3))
    torch.testing.assert_close(out["a"][0], want)
    # "b" (50 ids <= threshold 200) is a plain table
    assert "t_b" in W and W["t_b"].shape == (50, 8)
    # a non-linear combine differs from the product of pooled sums
    naive = (w[:, None] * W["t_a@0"][ids % 40]).sum(0) * (w[:, None] * W["t_a@1"][ids // 40]).sum(0)
    assert not torch.allclose(out["a"][0], naive)


def test_qr_mult_unweighted_single_id_fast_path_matches_general_path():
    mod = build(FEATS, method="qr", dim=8, m=40)
    x = kjt(single=True)
    fast = mod(x).values()
    # same ids with an explicit empty bag appended force the scatter path
    y = KeyedJaggedTensor.from_lengths_sync(
        ["a", "b", "c"], x.values(), torch.tensor([1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0]))
    general = mod(y).values()
    torch.testing.assert_close(fast, general[:3])
    assert torch.all(general[3] == 0)


def test_qr_add_and_concat_by_hand():
    for op in ("add", "concat"):
        mod = build(FEATS, method="qr", dim=8, m=40, operation=op)
        x = kjt()
        out = mod(x).to_dict()
        W = tables_of(mod)
        ids = bag_rows(x, "c", 2)
        q, r = W["t_c@1"][ids // 40].sum(0), W["t_c@0"][ids % 40].sum(0)
        want = q + r if op == "add" else torch.cat([r, q])
        torch.testing.assert_close(out["c"][2], want)


def test_qr_concat_width_and_divisibility():
    mod = build(FEATS, method="qr", dim=16, operation="concat")
    assert all(c.embedding_dim == 8 for c in mod.table_configs())
    assert mod(kjt()).values().shape == (3, 48)
    with pytest.raises(ValueError, match="multiple of 4"):
        build(FEATS, method="qr", dim=12, operation="concat")


def test_qr_pairs_are_unique_and_exact_above_2_24():
    n = 2**40 + 12345
    mod = build([FeatureSpec("x", n)], method="qr", dim=4, m=3_000_000, threshold=10)
    (m, top), = mod.plan.radices
    assert (m, top) == (3_000_000, -(-n // 3_000_000))
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.arange(2**24 - 5000, 2**24 + 5000), torch.randint(0, n, (20000,), generator=g),
                     torch.tensor([n - 1, 2**24 + 1, 2**24 + 3])])
    out = mod.remap(KeyedJaggedTensor.from_lengths_sync(["x"], ids, torch.ones_like(ids))).to_dict()
    r, q = out["x@0"].values(), out["x@1"].values()
    assert torch.equal(q * m + r, ids)  # the digits reconstruct the id: (q, r) is a bijection
    assert int(r.max()) < m and int(q.max()) < top
    # exhaustively for a small 3-way mixed radix
    mod3 = build([FeatureSpec("y", 10_007)], method="qr", dim=4, partitions=3, m=7, threshold=10)
    ids = torch.arange(10_007)
    o = mod3.remap(KeyedJaggedTensor.from_lengths_sync(["y"], ids, torch.ones_like(ids))).to_dict()
    digits = torch.stack([o[f"y@{j}"].values() for j in range(3)], 1)
    assert torch.unique(digits, dim=0).shape[0] == 10_007
    assert mod3.plan.radices[0] == (7, 7, -(-10_007 // 49))


def test_qr_init_is_symmetric():
    mod = build([FeatureSpec("x", 100_000)], method="qr", dim=16, m=100, threshold=10)
    for w in tables_of(mod).values():
        assert w.min() < 0 < w.max()


# ---- unified ---------------------------------------------------------------------------
def test_unified_with_room_for_every_id_reproduces_plain_tables():
    mod = build(FEATS, method="unified", dim=8, probes=2)  # no budget: collisionless offsets
    assert [c.num_embeddings for c in mod.table_configs()] == [2 * 4050]
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name=f.name, num_embeddings=f.cardinality,
                                                            embedding_dim=8, feature_names=[f.name])
                                         for f in FEATS])
    W = tables_of(mod)["u0_0"]
    with torch.no_grad():  # table rows: a#0, a#1, b#0, b#1, c#0, c#1 blocks of 4 columns each
        off = 0
        for f in FEATS:
            for p in range(2):
                W[off:off + f.cardinality] = ebc.embedding_bags[f.name].weight[:, 4 * p:4 * p + 4]
                off += f.cardinality
    torch.testing.assert_close(mod(kjt()).values(), ebc(kjt()).values(), rtol=0, atol=0)


def test_unified_probe_rows_and_concat_by_hand():
    mod = build(FEATS, method="unified", dim=8, rows=97, probes=2, num_tables=2)
    assert [c.num_embeddings for c in mod.table_configs()] == [97, 97]
    assert mod.num_parameters() == 2 * 97 * 4
    x = kjt()
    out = mod(x).to_dict()
    W = tables_of(mod)
    ids = bag_rows(x, "c", 2)
    # feature index 2, probe p -> table (2*2 + p) % 2 = p
    want = torch.cat([W[f"u0_{p}"][hash_to_rows(ids, salt("c", p), 97)].sum(0) for p in range(2)])
    torch.testing.assert_close(out["c"][2], want)


def test_unified_parameters_do_not_grow_with_features():
    many = [FeatureSpec(f"f{i}", 10_000) for i in range(20)]
    for feats in (many[:2], many):
        mod = build(feats, method="unified", dim=16, rows=1000, probes=2, num_tables=3)
        assert mod.num_parameters() == 3 * 1000 * 8


def test_unified_groups_multiplex_separately():
    mod = build(FEATS, method="unified", dim=8, rows=100, groups=[["a", "c"], ["b"]])
    assert [(c.name, c.feature_names) for c in mod.table_configs()] == [("u0_0", ["a#0", "c#0"]),
                                                                        ("u1_0", ["b#0"])]
    out = mod(kjt())
    assert out.keys() == ["a", "b", "c"]  # logical order restored
    W = tables_of(mod)
    x = kjt()
    # group ["b"]: 100 rows >= its 50 ids, so it is cut to 50 rows and collisionless (row = id)
    assert W["u1_0"].shape == (50, 8) and W["u0_0"].shape == (100, 8)
    torch.testing.assert_close(out.to_dict()["b"][0], W["u1_0"][bag_rows(x, "b", 0)].sum(0))
    ids = bag_rows(x, "c", 2)
    torch.testing.assert_close(out.to_dict()["c"][2], W["u0_0"][hash_to_rows(ids, salt("c", 0), 100)].sum(0))


# ---- every method ----------------------------------------------------------------------
def _train_mch(mod, x):
    """MCH admits ids only in training mode."""
    mod.train()
    mod(x)


@pytest.mark.parametrize(("method", "knobs"), METHODS, ids=IDS)
def test_gradients_reach_only_looked_up_rows(method, knobs):
    mod = build(FEATS, method=method, dim=8, **knobs)
    x = kjt()
    if method == "mch":
        _train_mch(mod, x)
    mod(x).values().pow(2).sum().backward()
    remapped = mod.remap(x)
    used: dict[str, set[int]] = {}
    for c in mod.table_configs():
        used[c.name] = {int(i) for fn in c.feature_names for i in remapped[fn].values()}
    for name, w in tables_of(mod).items():
        nz = {int(i) for i in torch.nonzero(w.grad.abs().sum(1)).flatten()}
        assert nz <= used[name] and nz, (name, nz - used[name])


@pytest.mark.parametrize(("method", "knobs"), METHODS, ids=IDS)
def test_sequence_variant_agrees_with_pooled_on_single_id_bags(method, knobs):
    torch.manual_seed(0)
    pooled = build(FEATS, method=method, dim=8, **knobs)
    seq = build(FEATS, method=method, dim=8, sequence=True, **knobs)
    copy_tables(pooled, seq)
    x = kjt(single=True)
    if method == "mch":
        seq.load_state_dict(pooled.state_dict(), strict=False)
        _train_mch(pooled, x)
        _train_mch(seq, x)
        pooled.eval()
        seq.eval()
        copy_tables(pooled, seq)
    p, s = pooled(x).to_dict(), seq(x)
    assert list(s) == ["a", "b", "c"]
    for name in s:
        assert s[name].values().shape == (3, 8)
        torch.testing.assert_close(s[name].values(), p[name])


@pytest.mark.parametrize(("method", "knobs"), METHODS, ids=IDS)
def test_plugs_into_torchrec_dlrm(method, knobs):
    mod = build(FEATS, method=method, dim=8, **knobs)
    model = DLRM(embedding_bag_collection=mod, dense_in_features=4, dense_arch_layer_sizes=[8, 8],
                 over_arch_layer_sizes=[8, 1])
    logits = model(torch.randn(3, 4), kjt())
    assert logits.shape == (3, 1)
    logits.sum().backward()
    assert all(w.grad is not None for w in tables_of(mod).values())


@pytest.mark.parametrize(("method", "knobs"), METHODS, ids=IDS)
def test_key_order_and_extra_keys_are_handled_like_an_ebc(method, knobs):
    mod = build(FEATS, method=method, dim=8, **knobs).eval()
    x = kjt()
    d = x.to_dict()
    names = ["c", "extra", "a", "b"]
    d["extra"] = d["a"]
    y = KeyedJaggedTensor.from_jt_dict({k: d[k] for k in names})
    out = mod(y)
    assert out.keys() == ["a", "b", "c"]
    torch.testing.assert_close(out.values(), mod(x).values())


@pytest.mark.parametrize(("method", "knobs"), METHODS, ids=IDS)
def test_fp16_tables_train_on_cpu_and_halve_bytes(method, knobs):
    m32 = build(FEATS, method=method, dim=8, **knobs)
    m16 = build(FEATS, method=method, dim=8, dtype="fp16", weighted=True, **knobs)
    assert all(w.dtype == torch.float16 for w in tables_of(m16).values())
    assert m16.table_bytes() * 2 == m32.table_bytes()
    out = m16(kjt(weights=True))
    assert out.values().dtype == torch.float32
    out.values().sum().backward()
    torch.optim.SGD(m16.parameters(), lr=0.1).step()
    assert all(w.grad is not None and torch.isfinite(w).all() for w in tables_of(m16).values())


def test_weight_flag_mismatch_is_a_clear_error():
    mod = build(FEATS, method="hash", dim=8, rows=100)
    with pytest.raises(ValueError, match="weighted=True"):
        mod(kjt(weights=True))


# ---- mch -------------------------------------------------------------------------------
def test_mch_admits_ids_in_training_and_is_collision_free():
    mod = build(FEATS, method="mch", dim=8, rows=64)
    x = kjt()
    mod.eval()
    fresh = mod.remap(x)
    assert set(fresh["a"].values().tolist()) == {63}  # nothing admitted yet: the shared miss row
    before = mod.memory_bytes()
    assert before == mod.plan.bytes
    mod.train()
    mod(x)
    mod.eval()
    after = mod.remap(x)
    for name in ("a", "b", "c"):
        raw, rows = x[name].values(), after[name].values()
        assert int(rows.max()) < 63  # every (few) id admitted
        # zero collisions: distinct raw ids <-> distinct rows
        assert (len(set(zip(raw.tolist(), rows.tolist(), strict=True)))
                == len(set(raw.tolist())) == len(set(rows.tolist())))
    assert mod.memory_bytes() > before  # the batch-sized history buffer now exists, and is counted


def test_mch_remap_equals_torchrec_own_remap_on_hits_and_misses():
    from torchrec.modules.mc_modules import MCHManagedCollisionModule

    mod = build(FEATS, method="mch", dim=8, rows=5)  # 4 slots + miss row: most ids miss
    mod.train()
    for _ in range(3):
        mod(kjt())
    mod.eval()
    for name, m in mod.remap.mcc._managed_collision_modules.items():
        assert type(m) is not MCHManagedCollisionModule
        x = {name: JaggedTensor(values=torch.tensor([0, 1, 2, 3, 5, 7, 11, 2**40, 4]),
                                lengths=torch.tensor([9]))}
        ours = m.remap(x)[name].values()
        theirs = MCHManagedCollisionModule.remap(m, x)[name].values()
        assert torch.equal(ours, theirs)
        assert (ours == m._output_global_offset + 4).any() and (ours < m._output_global_offset + 4).any()


def test_registry_lists_all_methods():
    assert {"full", "hash", "qr", "unified", "mch"} <= set(list_methods())


def test_one_line_swap_takes_dim_and_sizes_from_the_ebc():
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name=f"t{f.name}", num_embeddings=f.cardinality,
                                                            embedding_dim=32, feature_names=[f.name])
                                         for f in FEATS])
    mod = build(ebc, method="unified", budget=0.1)
    assert mod.output_dims() == [32, 32, 32]
    assert mod.memory_bytes() <= 0.1 * sum(f.cardinality for f in FEATS) * 32 * 4
    assert [(c.feature_names, c.embedding_dim) for c in mod.embedding_bag_configs()] == [
        (c.feature_names, c.embedding_dim) for c in ebc.embedding_bag_configs()]
    assert mod(kjt()).values().shape == ebc(kjt()).values().shape
    mixed = [EmbeddingBagConfig(name="x", num_embeddings=10, embedding_dim=8, feature_names=["a"]),
             EmbeddingBagConfig(name="y", num_embeddings=10, embedding_dim=16, feature_names=["b"])]
    with pytest.raises(ValueError, match="pass dim= explicitly"):
        build(mixed, method="hash")


def test_unified_shared_table_weighted_bag_by_hand():
    mod = build(FEATS, method="unified", dim=8, rows=97, probes=2, weighted=True)
    x = kjt(weights=True)
    out = mod(x).to_dict()
    W = tables_of(mod)["u0_0"]
    ids = bag_rows(x, "a", 0)
    w = x["a"].weights()[:3]
    want = torch.cat([(W[hash_to_rows(ids, salt("a", p), 97)] * w[:, None]).sum(0) for p in range(2)])
    torch.testing.assert_close(out["a"][0], want)


@pytest.mark.parametrize("method", ["full", "hash", "unified"])
def test_mean_pooling_is_kept(method):
    from torchrec.modules.embedding_configs import PoolingType

    feats = [FeatureSpec(f.name, f.cardinality, PoolingType.MEAN) for f in FEATS]
    knobs = {"rows": 100} if method != "full" else {}
    mean = build(feats, method=method, dim=8, **knobs)
    total = build(FEATS, method=method, dim=8, **knobs)
    copy_tables(mean, total)
    x = kjt()
    lengths = x["a"].lengths().clamp(min=1).float()[:, None]
    torch.testing.assert_close(mean(x).to_dict()["a"], total(x).to_dict()["a"] / lengths)


def test_unified_single_id_fast_path_equals_bag_path_with_weights():
    mod = build(FEATS, method="unified", dim=8, rows=97, probes=2, num_tables=2, weighted=True)
    x = kjt(weights=True, single=True)
    fast = mod(x).values()
    # one empty bag per feature appended: forces the embedding_bag path
    y = KeyedJaggedTensor.from_lengths_sync(
        ["a", "b", "c"], x.values(), torch.tensor([1, 1, 1, 0] * 3), weights=x.weights())
    torch.testing.assert_close(fast, mod(y).values()[:3])
    W = tables_of(mod)
    w0 = x["c"].weights()[0]
    want = torch.cat([W[f"u0_{p}"][hash_to_rows(x["c"].values()[:1], salt("c", p), 97)][0] * w0
                      for p in range(2)])
    torch.testing.assert_close(fast[0, 16:24], want)
