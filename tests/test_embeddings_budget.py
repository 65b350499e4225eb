"""Budgets: pure sizing functions, exact bytes, water-filling, minimums, knob errors."""

from __future__ import annotations

import pytest
import torch

from embtables.embeddings import (
    BudgetTooSmall,
    FeatureSpec,
    build,
    full_bytes,
    method_knobs,
    plan_hash,
    plan_mch,
    plan_qr,
    plan_unified,
    resolve_budget,
    split_budget,
)
from embtables.embeddings.mch import FIXED_BYTES_PER_FEATURE

torch.set_num_threads(1)

FEATS = [FeatureSpec("tiny", 3), FeatureSpec("small", 150), FeatureSpec("mid", 4000),
         FeatureSpec("big", 20000)]
COMPRESSING = [("hash", {}), ("qr", {}), ("qr", {"operation": "concat"}), ("qr", {"partitions": 3}),
               ("unified", {}), ("unified", {"probes": 2, "num_tables": 2}), ("mch", {})]


def test_resolve_budget_fraction_and_units():
    assert full_bytes(FEATS, 8) == (3 + 150 + 4000 + 20000) * 8 * 4
    assert resolve_budget(0.5, FEATS, 8) == full_bytes(FEATS, 8) // 2
    assert resolve_budget("1/4", FEATS, 8) == full_bytes(FEATS, 8) // 4
    assert resolve_budget("4MiB", FEATS, 8) == 4 * 2**20
    assert resolve_budget(2048, FEATS, 8) == 2048


def test_split_budget_water_fills():
    caps = [10.0, 1000.0, 1000.0]
    shares = split_budget(600.0, [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], caps)
    assert shares[0] == 10.0  # the small one keeps its full size ...
    # ... the rest shares equally
    assert shares[1] == pytest.approx(295.0) and shares[2] == pytest.approx(295.0)
    assert sum(shares) == pytest.approx(600.0)
    assert split_budget(5000.0, [1, 1, 1], [1, 1, 1], caps) == caps


@pytest.mark.parametrize(("method", "knobs"), COMPRESSING)
@pytest.mark.parametrize("budget", [0.05, 0.25, 0.9])
def test_built_bytes_equal_plan_and_fit_budget(method, knobs, budget):
    mod = build(FEATS, method=method, dim=8, budget=budget, **knobs)
    limit = resolve_budget(budget, FEATS, 8)
    assert mod.memory_bytes() == mod.plan.bytes <= limit
    assert mod.num_parameters() == mod.plan.num_parameters
    if not (method == "qr" and budget > 0.5):
        # the budget is actually used, not ignored (QR cannot: its largest split, radix 2,
        # is ~n/2 rows, and `big` alone is 83% of the full size here)
        assert mod.plan.bytes > 0.5 * limit


@pytest.mark.parametrize(("method", "knobs"), COMPRESSING)
def test_budget_error_names_the_minimum_and_the_minimum_builds(method, knobs):
    with pytest.raises(BudgetTooSmall) as e:
        build(FEATS, method=method, dim=8, budget=16, **knobs)
    minimum = e.value.minimum
    assert str(minimum) in str(e.value)
    mod = build(FEATS, method=method, dim=8, budget=minimum, **knobs)
    assert mod.memory_bytes() <= minimum
    with pytest.raises(BudgetTooSmall):
        build(FEATS, method=method, dim=8, budget=minimum - 1, **knobs)


def test_full_over_budget_names_its_size():
    with pytest.raises(BudgetTooSmall, match=str(full_bytes(FEATS, 8))):
        build(FEATS, method="full", dim=8, budget=0.5)


def test_hash_parameter_formula_and_small_features_stay_collisionless():
    p = plan_hash(FEATS, 16, rows=1000)
    assert p.rows == (3, 150, 1000, 1000) and p.num_parameters == (3 + 150 + 2000) * 16
    assert p.identity == (True, True, False, False)
    b = plan_hash(FEATS, 16, budget_bytes=resolve_budget(0.2, FEATS, 16))
    assert b.identity[:2] == (True, True)  # water-filling keeps the small vocabularies whole
    assert b.rows[3] > b.rows[2] > 150  # sqrt(cardinality) weights: bigger features get more rows


def test_qr_parameter_formula():
    p = plan_qr(FEATS, 16, m=50)
    # tiny/small <= threshold 200: plain; mid: 50 + 80 rows; big: 50 + 400 rows
    assert p.radices == ((), (), (50, 80), (50, 400))
    assert p.num_parameters == (3 + 150) * 16 + (130 + 450) * 16
    c = plan_qr(FEATS, 16, m=50, operation="concat")
    assert c.num_parameters == (3 + 150) * 16 + (130 + 450) * 8
    k3 = plan_qr([FeatureSpec("x", 10**6)], 16, m=20, partitions=3)
    assert k3.radices == ((20, 20, 2500),)


def test_unified_parameter_formula():
    p = plan_unified(FEATS, 16, budget_bytes=40_000, probes=2, num_tables=2)
    (g,) = p.groups
    assert g.table_rows == (40_000 // (2 * 8 * 4),) * 2
    assert p.num_parameters == 2 * g.table_rows[0] * 8
    assert p.bytes == p.num_parameters * 4 <= 40_000


def test_mch_bytes_formula_counts_state():
    p = plan_mch(FEATS, 8, rows=100)
    assert p.rows == (4, 100, 100, 100)
    assert p.bytes == sum(r * (8 * 4 + 24) + FIXED_BYTES_PER_FEATURE for r in p.rows)


def test_fp16_doubles_rows_for_the_same_budget():
    b32 = plan_hash(FEATS, 16, budget_bytes=100_000)
    b16 = plan_hash(FEATS, 16, budget_bytes=100_000, dtype="fp16")
    assert sum(b16.rows) > 1.9 * sum(b32.rows)
    assert build(FEATS, method="hash", dim=16, budget=100_000, dtype="fp16").memory_bytes() <= 100_000


def test_sizing_is_pure_and_fast_for_huge_vocabularies():
    huge = [FeatureSpec(f"h{i}", 10**10) for i in range(26)]
    for plan in (plan_hash, plan_qr, plan_unified, plan_mch):
        assert plan(huge, 64, budget_bytes=2**31).bytes <= 2**31


def test_unknown_knob_and_method_errors_list_valid_ones():
    with pytest.raises(ValueError, match="valid knobs: operation, partitions, m, threshold"):
        build(FEATS, method="qr", dim=8, collisions=4)
    with pytest.raises(ValueError, match="valid methods: .*hash.*unified"):
        build(FEATS, method="nope", dim=8)
    assert method_knobs("full") == []
    assert "dim" not in method_knobs("hash")


@pytest.mark.parametrize(("method", "knobs"), [("full", {}), *COMPRESSING])
def test_registry_plan_predicts_build_without_building(method, knobs):
    from embtables.embeddings import plan

    budget = None if method == "full" else 0.2
    p = plan(FEATS, method, dim=8, budget=budget, **knobs)
    assert build(FEATS, method=method, dim=8, budget=budget, **knobs).memory_bytes() == p.bytes


def test_schema_is_accepted_as_features():
    from embtables.datasets.schema import CategoricalFeature, DatasetSchema

    schema = DatasetSchema(name="s", dense=["I1"], categorical=[
        CategoricalFeature("C1", 100, num_embeddings=102), CategoricalFeature("C2", 5000, mode="raw")])
    mod = build(schema, method="hash", dim=8, budget=0.5)
    assert [f.cardinality for f in mod.features] == [102, 5000]
    assert mod.memory_bytes() <= 0.5 * (102 + 5000) * 8 * 4


def test_mch_small_features_keep_a_slot_per_id():
    p = plan_mch(FEATS, 8, budget_bytes=resolve_budget(0.3, FEATS, 8))
    assert p.rows[:2] == (4, 151)  # every id + the shared miss row
    assert p.rows[3] > p.rows[2]
