"""`unified` with per-feature numbers of probes (the paper's variable widths): the
cardinality rule and the user list by hand, exact sizes (memory_bytes() == plan.bytes <=
budget), the lookup and the projection to `dim` against a hand computation from the
tables, several tables, the sequence face, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import method_feats, method_kjt
from torchrec import KeyedJaggedTensor
from torchrec.models.dlrm import DLRM

from embtables.embeddings import FeatureSpec, build, plan
from embtables.embeddings.budget import BudgetTooSmall
from embtables.embeddings.hashing import hash_to_rows, salt
from embtables.embeddings.unified import probe_counts

FEATS = method_feats()  # a: 1000 ids, b: 50, c: 3000


def tables_of(mod) -> dict[str, torch.Tensor]:
    bags = getattr(mod.tables, "embedding_bags", None) or mod.tables.embeddings
    return {k: v.weight for k, v in bags.items()}


def bag(kj: KeyedJaggedTensor, name: str, b: int) -> torch.Tensor:
    jt = kj[name]
    off = jt.offsets()
    return jt.values()[off[b]:off[b + 1]]


def test_probe_counts_by_cardinality_and_by_name():
    feats = [FeatureSpec("s", 10), FeatureSpec("m", 100), FeatureSpec("l", 1000)]
    # ln(n / 10) / ln(1000 / 10) = 0, 1/2, 1 -> 1 + round(2 * that) = 1, 2, 3
    assert probe_counts(feats, 2, max_probes=3) == [1, 2, 3]
    # max_probes 4: 1 + round(3 * 0.5) = 1 + round(1.5) = 1 + 2 = 3 for m
    assert probe_counts(feats, 2, max_probes=4) == [1, 3, 4]
    assert probe_counts(feats, 2) == [2, 2, 2]
    assert probe_counts(feats, 2, {"s": 4}, max_probes=3) == [4, 2, 3]  # the list wins over the rule
    same = [FeatureSpec("x", 7), FeatureSpec("y", 7)]
    assert probe_counts(same, 2, max_probes=5) == [2, 2]  # one cardinality: no rule to apply
    with pytest.raises(ValueError, match="feature_probes names 'zz', which is not a feature"):
        probe_counts(feats, 1, {"zz": 2})
    with pytest.raises(ValueError, match=r"feature_probes\['s'\] must be an integer >= 1"):
        probe_counts(feats, 1, {"s": 0})


def test_collisionless_sizes_and_projections_by_hand():
    # dim 8, probes 2: probe width 4; a 2 probes (8 wide, no projection), b 1 (4 wide), c 4 (16 wide)
    knobs = {"probes": 2, "feature_probes": {"b": 1, "c": 4}}
    mod = build(FEATS, method="unified", dim=8, **knobs)
    p = mod.plan
    assert p.probes == (2, 1, 4) and p.widths == (8, 4, 16)
    assert sorted(mod.proj.keys()) == ["b", "c"]
    assert tuple(mod.proj["b"].shape) == (4, 8) and tuple(mod.proj["c"].shape) == (16, 8)
    rows = 2 * 1000 + 1 * 50 + 4 * 3000  # every probe its own rows
    assert [c.num_embeddings for c in mod.table_configs()] == [rows]
    assert p.bytes == rows * 4 * 4 + (4 * 8 + 16 * 8) * 4 == mod.memory_bytes()
    assert plan(FEATS, method="unified", dim=8, **knobs).bytes == p.bytes
    assert mod.output_dims() == [8, 8, 8]  # every model sees dim per feature


def test_lookup_concat_and_projection_equal_a_hand_computation():
    mod = build(FEATS, method="unified", dim=8, probes=2, feature_probes={"b": 1, "c": 4})
    x = method_kjt()
    out = mod(x).to_dict()
    (W,) = tables_of(mod).values()
    # collisionless: probes laid out feature by feature, probe by probe: a#0 a#1 b#0 c#0..c#3
    start = {("a", 0): 0, ("a", 1): 1000, ("b", 0): 2000, **{("c", q): 2050 + 3000 * q for q in range(4)}}
    for b in range(3):
        a = torch.cat([W[start[("a", q)] + bag(x, "a", b)].sum(0) for q in range(2)])
        torch.testing.assert_close(out["a"][b], a)
        vb = W[start[("b", 0)] + bag(x, "b", b)].sum(0)
        torch.testing.assert_close(out["b"][b], vb @ mod.proj["b"])
        vc = torch.cat([W[start[("c", q)] + bag(x, "c", b)].sum(0) for q in range(4)])
        torch.testing.assert_close(out["c"][b], vc @ mod.proj["c"])


def test_budgeted_hashed_tables_several_of_them():
    # 2 tables; the projections (4x8 + 16x8 fp32 = 640 bytes) come off the budget first
    budget = 50_640
    mod = build(FEATS, method="unified", dim=8, budget=budget, probes=2, num_tables=2,
                feature_probes={"b": 1, "c": 4})
    rows = math.floor((budget - 640) / (2 * 4 * 4))  # 1562 rows in each of the 2 tables
    assert [c.num_embeddings for c in mod.table_configs()] == [rows, rows]
    assert mod.memory_bytes() == mod.plan.bytes == 2 * rows * 16 + 640 <= budget
    # pairs in order a#0 a#1 b#0 c#0 c#1 c#2 c#3 -> tables 0 1 0 1 0 1 0
    assert [c.feature_names for c in mod.table_configs()] == [
        ["a#0", "b#0", "c#1", "c#3"],
        ["a#1", "c#0", "c#2"],
    ]
    W = tables_of(mod)
    x = method_kjt()
    out = mod(x).to_dict()
    table_of = {"a": [0, 1], "b": [0], "c": [1, 0, 1, 0]}
    for b in range(3):
        for n in ("a", "b", "c"):
            ids = bag(x, n, b)
            v = torch.cat(
                [W[f"u0_{t}"][hash_to_rows(ids, salt(n, q), rows)].sum(0) for q, t in enumerate(table_of[n])]
            )
            want = v @ mod.proj[n] if n in mod.proj else v
            torch.testing.assert_close(out[n][b], want)
    # the minimum: one row of 4 fp32 in each table (32 bytes) plus the projections (640)
    small = {"dim": 8, "probes": 2, "num_tables": 2, "feature_probes": {"b": 1, "c": 4}}
    assert build(FEATS, method="unified", budget=672, **small).memory_bytes() == 672
    with pytest.raises(BudgetTooSmall, match="672"):
        build(FEATS, method="unified", budget=671, **small)


def test_cardinality_rule_builds_and_the_uniform_default_has_no_projection():
    mod = build(FEATS, method="unified", dim=8, budget=0.25, probes=2, max_probes=3)
    # ln(n / 50) / ln(3000 / 50): a 0.732 -> 1 + round(1.46) = 2; b 0 -> 1; c 1 -> 3
    assert mod.plan.probes == (2, 1, 3) and sorted(mod.proj.keys()) == ["b", "c"]
    assert mod.memory_bytes() == mod.plan.bytes <= mod.budget_bytes
    plain = build(FEATS, method="unified", dim=8, budget=0.25, probes=2)
    assert (
        len(plain.proj) == 0 and plain.plan.probes == (2, 2, 2) and plain.memory_bytes() == plain.plan.bytes
    )


def test_sequence_face_projects_each_id():
    mod = build(FEATS, method="unified", dim=8, probes=2, feature_probes={"c": 4}, sequence=True)
    x = method_kjt()
    out = mod(x)
    (W,) = tables_of(mod).values()
    ids = x["c"].values()
    start = 2000 + 2 * 50  # after a#0 a#1 (1000 each) and b#0 b#1 (50 each)
    v = torch.cat([W[start + 3000 * q + ids] for q in range(4)], dim=1)
    torch.testing.assert_close(out["c"].values(), v @ mod.proj["c"])
    assert out["a"].values().shape == (4, 8) and out["c"].values().shape == (6, 8)


def test_dlrm_dot_interaction_gets_equal_widths_and_trains_the_projections():
    mod = build(FEATS, method="unified", dim=8, budget=0.25, probes=2, feature_probes={"b": 1, "c": 4})
    model = DLRM(
        embedding_bag_collection=mod,
        dense_in_features=4,
        dense_arch_layer_sizes=[8, 8],
        over_arch_layer_sizes=[8, 1],
    )
    logits = model(torch.randn(3, 4), method_kjt())
    assert logits.shape == (3, 1)
    logits.sum().backward()
    assert mod.proj["b"].grad is not None and mod.proj["c"].grad.abs().sum() > 0
    assert all(w.grad is not None for w in tables_of(mod).values())
