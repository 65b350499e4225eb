"""`mde` (mixed-dimension embeddings) against hand-computed widths and projections."""

from __future__ import annotations

import pytest
import torch
from conftest import EmbWrap, method_feats, method_kjt
from torchrec import KeyedJaggedTensor, PoolingType
from torchrec.models.dlrm import DLRM as TorchRecDLRM

from embtables.embeddings import BudgetTooSmall, FeatureSpec, build, full_bytes, plan
from embtables.embeddings.hashing import hash_to_rows, salt
from embtables.models.dlrm import DLRM, DLRMConfig

FEATS = method_feats()
kjt = method_kjt


def weights_of(mod) -> dict[str, torch.Tensor]:
    return {k: v.weight for k, v in mod.tables.embedding_bags.items()}


def test_power_law_widths_by_hand():
    # no budget: lam = dim * n_min^alpha (the smallest feature gets dim), d = lam * n^-alpha
    p = plan(FEATS, "mde", dim=16, alpha=0.3)
    # a: 16 * (50/1000)^0.3 = 6.52 -> 8; c: 16 * (50/3000)^0.3 = 4.67 -> 4; b: 16
    assert p.widths == (8, 16, 4)
    assert p.bytes == (1000 * 8 + 50 * 16 + 3000 * 4) * 4 + (8 * 16 + 4 * 16) * 4
    assert plan(FEATS, "mde", dim=16, alpha=0.0).widths == (16, 16, 16)  # alpha 0: one width


def test_projection_by_hand_with_weights():
    mod = build(FEATS, method="mde", dim=16, weighted=True)
    W = weights_of(mod)
    assert W["t_a"].shape == (1000, 8) and W["t_b"].shape == (50, 16) and W["t_c"].shape == (3000, 4)
    assert set(mod.proj) == {"a", "c"} and mod.proj["a"].shape == (8, 16)
    x = kjt(weights=True)
    out = mod(x).to_dict()
    for name in ("a", "b", "c"):
        for b in range(3):
            o = x[name].offsets()
            ids, w = x[name].values()[o[b] : o[b + 1]], x[name].weights()[o[b] : o[b + 1]]
            row = (W[f"t_{name}"][ids] * w[:, None]).sum(0)
            want = row @ mod.proj[name] if name in mod.proj else row
            torch.testing.assert_close(out[name][b], want)
    out["a"].sum().backward()
    assert mod.proj["a"].grad is not None and mod.proj["a"].grad.abs().sum() > 0


def test_budget_regimes_bytes_and_minimum():
    full = full_bytes(FEATS, 16)
    for budget in (1.0, 0.5, 1 / 4, 1 / 16, 1 / 64):
        p = plan(FEATS, "mde", dim=16, budget=budget)
        mod = build(FEATS, method="mde", dim=16, budget=budget)
        assert mod.memory_bytes() == p.bytes <= int(budget * full)
        assert mod(kjt()).values().shape == (3, 48)
    assert plan(FEATS, "mde", dim=16, budget=1.0).widths == (16, 16, 16)
    half = plan(FEATS, "mde", dim=16, budget=0.5)
    assert len(set(half.widths)) > 1 and half.rows == (1000, 50, 3000)  # mixed widths, no hashing
    # below every feature at width 4: width 4, rows hashed like `hash`
    small = build(FEATS, method="mde", dim=16, budget=1 / 16)
    assert small.plan.widths == (4, 4, 4) and small.plan.rows[2] < 3000
    x = kjt()
    rows_c = hash_to_rows(x["c"].values(), salt("c", 0), small.plan.rows[2])
    want = weights_of(small)["t_c"][rows_c[:1]].sum(0) @ small.proj["c"]
    torch.testing.assert_close(small(x).to_dict()["c"][0], want)
    with pytest.raises(BudgetTooSmall) as e:
        build(FEATS, method="mde", dim=16, budget=500)
    assert e.value.minimum == 3 * 4 * 4 + 3 * 4 * 16 * 4
    build(FEATS, method="mde", dim=16, budget=e.value.minimum)


def test_sequence_is_refused_clearly():
    # TorchRec's EmbeddingCollection takes one width; the refusal comes from the declaration
    # (on the conformance branch) or from TorchRec's own one-width check.
    with pytest.raises(ValueError, match="pooled features only|embedding_dim"):
        build(FEATS, method="mde", dim=16, sequence=True)


def test_int32_ids_key_order_and_mean_pooling():
    mod = build(FEATS, method="mde", dim=16).eval()
    torch.testing.assert_close(mod(kjt()).values(), mod(kjt(dtype=torch.int32)).values(), rtol=0, atol=0)
    d = kjt().to_dict()
    y = KeyedJaggedTensor.from_jt_dict({k: d[k] for k in ["c", "a", "b"]})
    torch.testing.assert_close(mod(y).values(), mod(kjt()).values())
    mean = build([FeatureSpec("a", 1000, PoolingType.MEAN)], method="mde", dim=16, alpha=0.0, budget=0.5)
    z = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1, 2, 3]), torch.tensor([3]))
    W = weights_of(mean)["t_a"]
    want = W[[1, 2, 3]].mean(0)
    want = want @ mean.proj["a"] if "a" in mean.proj else want
    torch.testing.assert_close(mean(z).values()[0], want)


def test_inside_torchrec_and_embtables_dlrm():
    mod = build(FEATS, method="mde", dim=16, budget=1 / 4)
    model = TorchRecDLRM(
        embedding_bag_collection=mod,
        dense_in_features=4,
        dense_arch_layer_sizes=[8, 16],
        over_arch_layer_sizes=[8, 1],
    )
    model(torch.randn(3, 4), kjt()).sum().backward()
    assert all(w.grad is not None for w in weights_of(mod).values())
    ours = DLRM(build(FEATS, method="mde", dim=16), 4, DLRMConfig(bottom_mlp=[8], top_mlp=[8]))
    logits = ours(torch.randn(3, 4), kjt())
    assert logits.shape == (3,)
    logits.sum().backward()
    assert all(p.grad is not None for p in ours.embedding.proj.values())


def test_dmp_shards_the_tables_and_matches_unsharded(one_rank):
    from torchrec.distributed.model_parallel import DistributedModelParallel

    mod = build(FEATS, method="mde", dim=16, budget=1 / 16, weighted=True)
    x = kjt(weights=True)
    ref = mod(x).values().detach().clone()
    saved = {f"emb.{k}": v.clone() for k, v in mod.state_dict().items()}
    dmp = DistributedModelParallel(EmbWrap(mod), device=torch.device("cpu"))
    dmp.load_state_dict(saved, strict=False)  # DMP does not copy weights into shards on CPU
    assert type(dmp.module.emb.tables).__name__.startswith("Sharded")
    out = dmp(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.sum().backward()
