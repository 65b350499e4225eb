"""OptEmbed's module: row mask, surrogate gradient, dimension sampling, export, sizes."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import embtables.embeddings.optembed as oe
from embtables.embeddings import FeatureSpec, build

torch.set_num_threads(1)

FEATS = [FeatureSpec("a", 40), FeatureSpec("b", 9), FeatureSpec("c", 25)]
DIM = 8


def supernet(seed: int = 0) -> oe.OptEmbed:
    torch.manual_seed(seed)
    return build(FEATS, method="optembed", dim=DIM)


def single_id_kjt(ids: list[list[int]]) -> KeyedJaggedTensor:
    """ids[f][b]: one id per bag, feature-major."""
    flat = [i for per in ids for i in per]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in FEATS], values=torch.tensor(flat),
        lengths=torch.ones(len(flat), dtype=torch.long))


def all_ids_kjt() -> tuple[KeyedJaggedTensor, int]:
    """Every id of every feature, one per bag (shorter features padded with id 0)."""
    n = max(f.cardinality for f in FEATS)
    return single_id_kjt([[i % f.cardinality for i in range(n)] for f in FEATS]), n


def rows_of(m: oe.OptEmbed, name: str, ids: torch.Tensor) -> torch.Tensor:
    return m.table_weight(name).detach()[ids + 1]  # row 0 is the OOV row


def test_nothing_pruned_at_zero_threshold():
    m = supernet().eval()
    assert torch.equal(m.thresholds.detach(), torch.zeros(len(FEATS)))
    kjt, n = all_ids_kjt()
    out = m(kjt).values().view(n, len(FEATS), DIM)
    for i, f in enumerate(FEATS):
        ids = torch.arange(n) % f.cardinality
        torch.testing.assert_close(out[:, i], rows_of(m, f.name, ids))
    assert [k.numel() for k in m.kept_rows()] == [f.cardinality for f in FEATS]


def test_raising_threshold_prunes_monotonically_more():
    m = supernet().eval()
    kjt, n = all_ids_kjt()
    norms = m.table_weight("a").detach()[1:].abs().sum(1)
    counts, zero_bags = [], []
    for t in torch.linspace(0, float(norms.max()) + 0.1, 12):
        with torch.no_grad():
            m.thresholds.fill_(float(t))
        kept = m.kept_rows()[0]
        # Independent oracle: rows whose L1 norm exceeds t.
        assert kept.tolist() == torch.nonzero(norms > t).flatten().tolist()
        counts.append(kept.numel())
        out = m(kjt).values().view(n, len(FEATS), DIM)[:, 0]
        zero_bags.append(int((out.abs().sum(1) == 0).sum()))
    assert counts == sorted(counts, reverse=True) and counts[0] == 40 and counts[-1] == 0
    assert zero_bags == sorted(zero_bags) and zero_bags[-1] == n


def test_step_backward_is_the_surrogate():
    x = torch.tensor([-1.5, -1.0, -0.7, -0.4, -0.1, 0.0, 0.2, 0.4, 0.41, 0.9, 1.0, 1.01, 3.0],
                     requires_grad=True)
    y = oe.BinaryStep.apply(x)
    assert y.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    g = torch.arange(1.0, 14.0)  # distinct upstream gradients
    y.backward(g)
    # Hand-computed: 2 - 4|x| for |x| <= 0.4, 0.4 for 0.4 < |x| <= 1, else 0.
    expected = torch.tensor([0, 0.4, 0.4, 0.4, 1.6, 2.0, 1.2, 0.4, 0.4, 0.4, 0.4, 0, 0]) * g
    torch.testing.assert_close(x.grad, expected)


def test_threshold_gets_surrogate_gradient_through_the_module():
    m = supernet().train()
    m.set_eval_dims([DIM] * len(FEATS))  # no random widths: the gradient is exact
    ids = [[3, 7], [1, 2], [4, 5]]
    kjt = single_id_kjt(ids)
    with torch.no_grad():
        m.thresholds.copy_(torch.tensor([0.0, 0.3, -0.2]))
    m(kjt).values().sum().backward()
    for i, f in enumerate(FEATS):
        e = rows_of(m, f.name, torch.tensor(ids[i]))
        x = e.abs().sum(1) - m.thresholds[i].detach()
        # d/dt sum(mask * e) = -sum_rows surrogate(norm - t) * sum(e)
        expect = -(oe.surrogate_grad(x) * e.sum(1)).sum()
        torch.testing.assert_close(m.thresholds.grad[i], expect)


def test_regularizer_is_alpha_sum_exp_minus_t():
    m = build(FEATS, method="optembed", dim=DIM, alpha=0.5)
    with torch.no_grad():
        m.thresholds.copy_(torch.tensor([0.0, 1.0, 2.0]))
    expect = 0.5 * (1 + torch.exp(torch.tensor(-1.0)) + torch.exp(torch.tensor(-2.0)))
    torch.testing.assert_close(m.regularization_loss(), expect)


def test_dimension_sampling_keeps_exactly_a_prefix():
    m = supernet().train()
    b = 200
    ids = [[i % f.cardinality for i in range(b)] for f in FEATS]
    torch.manual_seed(1)
    out = m(single_id_kjt(ids)).values().detach().view(b, len(FEATS), DIM)
    seen = set()
    for i, f in enumerate(FEATS):
        rows = rows_of(m, f.name, torch.tensor(ids[i]))
        for s in range(b):
            nz = torch.nonzero(out[s, i]).flatten()
            k = int(nz.max()) + 1
            assert k in (4, 8), k  # candidate widths of dim 8, step 4
            assert torch.equal(out[s, i, :k], rows[s, :k]) and not out[s, i, k:].any()
            seen.add(k)
    assert seen == {4, 8}  # both widths get sampled


def test_eval_dims_fix_each_fields_width():
    m = supernet().eval()
    kjt, n = all_ids_kjt()
    m.set_eval_dims([4, 8, 4])
    out = m(kjt).values().view(n, len(FEATS), DIM)
    assert not out[:, 0, 4:].any() and not out[:, 2, 4:].any() and out[:, 1, 4:].abs().sum() > 0


def exported(thresholds=(0.0, 0.0, 0.0), dims=(4, 8, 4), path=None) -> tuple[oe.OptEmbed, oe.OptEmbed]:
    m = supernet()
    with torch.no_grad():
        m.thresholds.copy_(torch.tensor(thresholds))
    return m, m.export(list(dims), path)


def test_parameter_formula_equals_the_exported_tables():
    m, e = exported(thresholds=(1.0, 0.5, 2.0), dims=(4, 8, 4))
    kept = [k.numel() for k in m.kept_rows()]
    assert 0 < sum(kept) < sum(f.cardinality for f in FEATS)
    weights = [e.table_weight(f.name) for f in FEATS]
    assert [tuple(w.shape) for w in weights] == [(k + 1, d) for k, d in zip(kept, (4, 8, 4), strict=True)]
    physical = sum(w.numel() for w in weights)
    assert e.plan.num_parameters == physical == e.num_parameters()
    assert oe.plan_optembed(FEATS, DIM, [4, 8, 4], kept).num_parameters == physical
    buffers = sum(b.numel() * b.element_size() for b in e.buffers())
    assert e.memory_bytes() == physical * 4 + buffers == e.plan.bytes
    assert e.output_dims() == [DIM] * 3


def test_pruned_and_unseen_ids_map_to_the_oov_row():
    m, e = exported(thresholds=(1.0, 0.5, 2.0))
    kept = m.kept_rows()
    ids = [list(range(40)) + [40, 1000, -3], [i % 9 for i in range(43)], [i % 25 for i in range(43)]]
    rows = e.remap(single_id_kjt(ids)).to_dict()
    for i, f in enumerate(FEATS):
        r = rows[f.name].values()
        keep = set(kept[i].tolist())
        for j, x in enumerate(ids[i]):
            if x in keep:
                assert int(r[j]) == kept[i].tolist().index(x) + 1
            else:
                assert int(r[j]) == oe.OOV_ROW
    # The exported module reproduces the masked supernet at the searched widths, and
    # gives zeros (the untrained OOV row) for pruned ids.
    m.eval()
    m.set_eval_dims([4, 8, 4])
    kjt = single_id_kjt([ids[0][:40], ids[1][:40], ids[2][:40]])
    torch.testing.assert_close(e(kjt).values(), m(kjt).values())


def test_multi_id_and_empty_bags_in_the_export():
    _, e = exported()
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b", "c"], values=torch.tensor([1, 2, 3, 0, 4, 5]),
        lengths=torch.tensor([2, 1, 1, 0, 2, 0]))
    out = e(kjt).values().detach().view(2, 3, DIM)
    w = {f.name: e.table_weight(f.name).detach() for f in FEATS}
    torch.testing.assert_close(out[0, 0, :4], w["a"][2] + w["a"][3])
    assert not out[0, 0, 4:].any()
    torch.testing.assert_close(out[1, 0, :4], w["a"][4])
    torch.testing.assert_close(out[0, 2, :4], w["c"][5] + w["c"][6])
    assert not out[1, 1].any() and not out[1, 2].any()


def test_export_gets_no_gradient_to_its_masks():
    _, e = exported(thresholds=(1.0, 0.5, 2.0))
    before = {k: v.clone() for k, v in e.remap.state_dict().items()}
    assert e.dense_parameters() == []  # thresholds are gone: nothing learnable outside the tables
    assert all(not b.requires_grad for b in e.buffers())
    opt = torch.optim.SGD(e.parameters(), lr=1.0)
    kjt, _ = all_ids_kjt()
    e(kjt).values().sum().backward()
    opt.step()
    after = e.remap.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [tuple(e.table_weight(f.name).shape) for f in FEATS][1] == (10, 8)


def test_save_and_load_roundtrip(tmp_path):
    _, e = exported(thresholds=(1.0, 0.5, 2.0), path=tmp_path / "arch.pt")
    e.save(tmp_path / "export.pt")
    loaded = build(FEATS, method="optembed", dim=DIM, artefact=str(tmp_path / "export.pt"))
    again = oe.OptEmbed.from_artefact(tmp_path / "export.pt")
    kjt, _ = all_ids_kjt()
    torch.testing.assert_close(loaded(kjt).values(), e(kjt).values())
    torch.testing.assert_close(again(kjt).values(), e(kjt).values())
    assert loaded.memory_bytes() == e.memory_bytes()
    # Pure sizing through the registry, from the artefact alone.
    from embtables.embeddings import plan

    assert plan(FEATS, "optembed", dim=DIM, artefact=str(tmp_path / "export.pt")).bytes == e.memory_bytes()
    assert plan(FEATS, "optembed", dim=DIM).num_parameters == sum((f.cardinality + 1) * DIM for f in FEATS)
    with pytest.raises(ValueError, match="searched for features"):
        build([FeatureSpec("a", 41), FEATS[1], FEATS[2]], method="optembed", dim=DIM,
              artefact=str(tmp_path / "export.pt"))


def test_knob_errors_name_the_config_key():
    with pytest.raises(ValueError, match="embedding.optembed.dim_step"):
        build(FEATS, method="optembed", dim=DIM, dim_step=3)
    with pytest.raises(ValueError, match="after the search"):
        build(FEATS, method="optembed", dim=DIM, budget=0.5)


def test_search_lookup_cache_gives_the_uncached_output():
    m = supernet().eval()
    with torch.no_grad():
        m.thresholds.copy_(torch.tensor([1.0, 0.5, 2.0]))
    kjt, _ = all_ids_kjt()
    expect = {}
    for dims in ([4, 8, 4], [8, 4, 8]):
        m.set_eval_dims(dims)
        expect[tuple(dims)] = m(kjt).values()
    m.enable_lookup_cache()
    for dims in ([4, 8, 4], [8, 4, 8], [4, 8, 4]):
        m.set_eval_dims(dims)
        torch.testing.assert_close(m(kjt).values(), expect[tuple(dims)])
    assert len(m._lookup_cache) == 1
