"""Conformance, in one process: every registered method (``list_methods()``, so a method
added later is covered without touching this file) inside TorchRec's own models, under
torch.fx / torchrec.fx tracing and torch.export, with int32/int64 ids, empty batches,
batch size 1, any key order, weighted KJTs, and its id rule. What a method declares it
cannot do (``EmbeddingMethod.capabilities()``) must be refused with a clear error.
The multi-process half (stock DMP, train pipelines, DCP) is test_conformance_dist.py."""

from __future__ import annotations

import logging

import pytest
import torch
import torchrec.fx
from conformance_testing import (
    CONF_FEATURES,
    NUM_DENSE,
    build_conf,
    conf_batch,
    conformance_specs,
    spec_id,
)
from torchrec.models.deepfm import SimpleDeepFMNN
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRM_Projection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embtables.embeddings import FeatureSpec, build, get_method
from embtables.embeddings.base import IdOutOfRange

torch.set_num_threads(1)
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

SPECS = conformance_specs()
IDS = [spec_id(s) for s in SPECS]
FACES = [(s, seq) for s in SPECS for seq in (False, True)]
FACE_IDS = [f"{spec_id(s)}-{'seq' if seq else 'pooled'}" for s, seq in FACES]


def caps(spec):
    return get_method(spec[0]).capabilities()


def supported(spec, sequence: bool) -> bool:
    c = caps(spec)
    return c.sequence if sequence else c.pooled


def _flat(out, emb) -> torch.Tensor:
    if hasattr(out, "to_dict"):
        return torch.cat([out[k] for k in emb.feature_names], dim=1)
    return torch.cat([out[k].to_padded_dense(3).flatten(1) for k in emb.feature_names], dim=1)


def dense(batch: int) -> torch.Tensor:
    return torch.randn(batch, NUM_DENSE, generator=torch.Generator().manual_seed(9))


# ---- build-time refusals --------------------------------------------------------------------
@pytest.mark.parametrize(("spec", "sequence"), FACES, ids=FACE_IDS)
def test_unsupported_face_is_refused_at_build(spec, sequence):
    if supported(spec, sequence):
        emb = build_conf(spec, sequence)
        assert emb.sequence is sequence
    else:
        with pytest.raises(ValueError, match=f"{spec[0]} supports"):
            build_conf(spec, sequence)


# ---- TorchRec's own models ----------------------------------------------------------------
MODELS = {
    "DLRM": lambda emb: DLRM(embedding_bag_collection=emb, dense_in_features=NUM_DENSE,
                             dense_arch_layer_sizes=[8], over_arch_layer_sizes=[8, 1]),
    "DLRM_DCN": lambda emb: DLRM_DCN(embedding_bag_collection=emb, dense_in_features=NUM_DENSE,
                                     dense_arch_layer_sizes=[8], over_arch_layer_sizes=[8, 1],
                                     dcn_num_layers=2, dcn_low_rank_dim=4),
    "DLRM_Projection": lambda emb: DLRM_Projection(
        embedding_bag_collection=emb, dense_in_features=NUM_DENSE, dense_arch_layer_sizes=[8],
        over_arch_layer_sizes=[8, 1], interaction_branch1_layer_sizes=[16, 16],
        interaction_branch2_layer_sizes=[16, 16]),
    "SimpleDeepFMNN": lambda emb: SimpleDeepFMNN(num_dense_features=NUM_DENSE, embedding_bag_collection=emb,
                                                 hidden_layer_size=8, deep_fm_dimension=4),
}


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_torchrec_models_forward_backward_step(spec, model_name):
    if not caps(spec).pooled:
        pytest.skip(f"{spec[0]} has no pooled face (refusal asserted above)")
    emb = build_conf(spec)
    model = MODELS[model_name](emb)
    kjt, labels = conf_batch(0, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    # The table parameters, or a table-free method's (dhe) dense ones: what must train.
    trainable = list(emb.tables.parameters()) if caps(spec).has_tables else list(emb.parameters())
    before = [p.detach().clone() for p in trainable]
    logits = model(dense(8), kjt).squeeze(-1)
    assert logits.shape == (8,)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).backward()
    opt.step()
    trained = any(not torch.equal(p, b) for p, b in zip(trainable, before, strict=True))
    assert trained, "no embedding parameter trained"
    assert torch.isfinite(model(dense(8), kjt)).all()


# ---- fx and export --------------------------------------------------------------------------
class SequenceModel(torch.nn.Module):
    """A minimal model over the sequence face: every feature's per-id vectors, stacked."""

    def __init__(self, emb) -> None:
        super().__init__()
        self.emb = emb

    def forward(self, dense_features: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.Tensor:
        out = self.emb(kjt)
        return torch.cat([out[k].values() for k in self.emb.feature_names], dim=0) * dense_features.mean()


def _model(spec, sequence: bool):
    if sequence:
        return SequenceModel(build_conf(spec, sequence=True)).eval()
    return MODELS["DLRM"](build_conf(spec)).eval()


@pytest.mark.parametrize("tracer", ["torch.fx", "torchrec.fx"])
@pytest.mark.parametrize(("spec", "sequence"), FACES, ids=FACE_IDS)
def test_fx_symbolic_trace_equals_eager(spec, sequence, tracer):
    if not supported(spec, sequence):
        pytest.skip("face not supported (refusal asserted above)")
    model = _model(spec, sequence)
    kjt, _ = conf_batch(1, 8)
    trace = torch.fx.symbolic_trace if tracer == "torch.fx" else torchrec.fx.symbolic_trace
    if not caps(spec).fx_traceable:
        with pytest.raises(NotImplementedError, match=spec[0]):
            trace(model)
        return
    graph = trace(model)
    for step in (1, 2):  # a second batch: nothing of the first was baked into the graph
        kjt, _ = conf_batch(step, 8)
        assert torch.equal(graph(dense(8), kjt), model(dense(8), kjt))


@pytest.mark.parametrize(("spec", "sequence"), FACES, ids=FACE_IDS)
def test_torch_export_eval_equals_eager(spec, sequence):
    if not supported(spec, sequence):
        pytest.skip("face not supported (refusal asserted above)")
    model = _model(spec, sequence)
    kjt, _ = conf_batch(1, 8)
    if not caps(spec).exportable:
        with pytest.raises(NotImplementedError, match=spec[0]):
            torch.export.export(model, (dense(8), kjt), strict=False)
        return
    ep = torch.export.export(model, (dense(8), kjt), strict=False)
    assert torch.allclose(ep.module()(dense(8), kjt), model(dense(8), kjt), atol=1e-6)
    # Other ids, same lengths (the program is shape-specialised): no id of the first batch was baked in.
    kjt2 = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values().flip(0) % 40, lengths=kjt.lengths())
    assert torch.allclose(ep.module()(dense(8), kjt2), model(dense(8), kjt2), atol=1e-6)


# ---- inputs ---------------------------------------------------------------------------------
def _supported_faces():
    return [(s, q) for s, q in FACES if supported(s, q)]


SUP = _supported_faces()
SUP_IDS = [f"{spec_id(s)}-{'seq' if q else 'pooled'}" for s, q in SUP]


@pytest.mark.parametrize(("spec", "sequence"), SUP, ids=SUP_IDS)
def test_int32_ids_and_lengths_equal_int64(spec, sequence):
    emb = build_conf(spec, sequence).eval()
    kjt, _ = conf_batch(3, 8)
    k32 = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values().int(), lengths=kjt.lengths().int())
    assert torch.equal(_flat(emb(k32), emb), _flat(emb(kjt), emb))


@pytest.mark.parametrize(("spec", "sequence"), SUP, ids=SUP_IDS)
@pytest.mark.parametrize("scale", [0.25, 3.0])
def test_init_scale_multiplies_every_vector_at_init(spec, sequence, scale):
    """``embedding.init_scale``: the same module (same seed) with every vector it returns
    multiplied by the scale, whatever its tables, products of tables or decoder."""
    base = build_conf(spec, sequence).eval()
    scaled = build_conf(spec, sequence, init_scale=scale).eval()
    kjt, _ = conf_batch(3, 8)
    want = _flat(base(kjt), base)
    assert want.abs().sum() > 0
    torch.testing.assert_close(_flat(scaled(kjt), scaled), scale * want, rtol=2e-5, atol=1e-7)


def test_init_scale_must_be_positive():
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="init_scale must be a positive number"):
            build(CONF_FEATURES, method="hash", dim=8, budget=0.3, init_scale=bad)


@pytest.mark.parametrize(("spec", "sequence"), SUP, ids=SUP_IDS)
def test_any_key_order_and_extra_keys(spec, sequence):
    emb = build_conf(spec, sequence).eval()
    kjt, _ = conf_batch(4, 8)
    d = kjt.to_dict()
    d["unused"] = d["f0"]
    shuffled = KeyedJaggedTensor.from_jt_dict({k: d[k] for k in ["f2", "unused", "f0", "f1"]})
    assert torch.equal(_flat(emb(shuffled), emb), _flat(emb(kjt), emb))


@pytest.mark.parametrize(("spec", "sequence"), SUP, ids=SUP_IDS)
def test_empty_batch_and_batch_size_one(spec, sequence):
    emb = build_conf(spec, sequence).eval()
    names = [f.name for f in CONF_FEATURES]
    empty = KeyedJaggedTensor(keys=names, values=torch.zeros(0, dtype=torch.long),
                              lengths=torch.zeros(3 * 4, dtype=torch.long))
    out = _flat(emb(empty), emb)
    assert out.shape[0] == 4 and torch.count_nonzero(out) == 0  # empty bags pool to zeros
    one = KeyedJaggedTensor(keys=names, values=torch.tensor([5, 7, 9]), lengths=torch.tensor([1, 1, 1]))
    kjt, _ = conf_batch(5, 8)
    d = kjt.to_dict()
    both = KeyedJaggedTensor.from_jt_dict(
        {n: type(d[n])(values=torch.cat([one.to_dict()[n].values(), d[n].values()]),
                       lengths=torch.cat([torch.tensor([1]), d[n].lengths()])) for n in names})
    assert _flat(emb(one), emb).shape[0] == 1
    # Row 0 does not see the rest: a table lookup is bitwise the same; a table-free method's
    # MLP (dhe) goes through matrix products whose blocking depends on the batch size.
    alone, among = _flat(emb(one), emb)[0], _flat(emb(both), emb)[0]
    if caps(spec).has_tables:
        assert torch.equal(alone, among)
    else:
        assert torch.allclose(alone, among, rtol=0, atol=1e-6)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_weighted_kjt_with_unit_weights_equals_unweighted(spec):
    if not (caps(spec).pooled and caps(spec).weighted):
        pytest.skip("no weighted pooled face")
    plain, weighted = build_conf(spec).eval(), build_conf(spec, weighted=True).eval()
    weighted.load_state_dict(plain.state_dict())
    kjt, _ = conf_batch(6, 8)
    ones = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(),
                             weights=torch.ones(kjt.values().numel()))
    assert torch.allclose(_flat(weighted(ones), weighted), _flat(plain(kjt), plain), atol=1e-6)
    twice = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(),
                              weights=torch.full((kjt.values().numel(),), 2.0))
    assert torch.allclose(_flat(weighted(twice), weighted), 2 * _flat(plain(kjt), plain), atol=1e-5)
    with pytest.raises(ValueError, match="weighted=False"):
        plain(twice)
    with pytest.raises(ValueError, match="has no per-id weights"):
        weighted(kjt)


# ---- the id rule ----------------------------------------------------------------------------
@pytest.mark.parametrize(("spec", "sequence"), SUP, ids=SUP_IDS)
def test_ids_out_of_range_are_refused_naming_feature_and_id(spec, sequence):
    emb = build_conf(spec, sequence)
    bounded = caps(spec).bounded_ids
    card = {f.name: f.cardinality for f in CONF_FEATURES}
    for bad in (-1, card["f1"]):
        kjt = KeyedJaggedTensor(keys=["f0", "f1", "f2"], values=torch.tensor([3, 2, bad, 1]),
                                lengths=torch.tensor([1, 2, 1]))
        if bad < 0 or bounded:
            with pytest.raises(IdOutOfRange, match=f"feature 'f1' got id {bad}"):
                emb(kjt)
        else:
            emb(kjt)  # any id >= 0 (mch takes raw ids)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_unbounded_feature_accepts_any_nonnegative_id(spec):
    name, knobs = spec
    if name == "full":
        with pytest.raises(ValueError, match="bounded=False"):
            build([FeatureSpec("f0", 10, bounded=False)], method="full", dim=8)
        return
    feats = [FeatureSpec(f.name, f.cardinality, bounded=False) for f in CONF_FEATURES]
    try:
        emb = build(feats, method=name, dim=8, budget=1e4 if name not in ("mch", "optembed") else None,
                    **{"rows": 30, **knobs} if name == "mch" else knobs)
    except ValueError as e:
        pytest.skip(f"{name} does not build on unbounded features: {e}")
    big = KeyedJaggedTensor(keys=["f0", "f1", "f2"], values=torch.tensor([2**40, 7, 2**33]),
                            lengths=torch.tensor([1, 1, 1]))
    assert torch.isfinite(_flat(emb(big), emb)).all()
    with pytest.raises(IdOutOfRange, match="ids must be >= 0"):
        emb(KeyedJaggedTensor(keys=["f0", "f1", "f2"], values=torch.tensor([1, -5, 2]),
                              lengths=torch.tensor([1, 1, 1])))


def test_full_refuses_an_id_beyond_its_table_like_an_ebc():
    emb = build(CONF_FEATURES, method="full", dim=8)
    with pytest.raises(IdOutOfRange, match=r"feature 'f2' got id 220: ids must be in \[0, 220\)"):
        emb(KeyedJaggedTensor(keys=["f0", "f1", "f2"], values=torch.tensor([0, 0, 220]),
                              lengths=torch.tensor([1, 1, 1])))


# ---- sizes and names ------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_feature_tables_map_covers_every_physical_table(spec):
    emb = build_conf(spec, sequence=not caps(spec).pooled)
    mapping = emb.feature_tables()
    assert sorted(mapping) == sorted(emb.feature_names)
    assert sorted({t for ts in mapping.values() for t in ts}) == sorted(c.name for c in emb.table_configs())


# ---- checkpoints interchange with TorchRec ---------------------------------------------------
def _plain_ebc(seed: int):
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    torch.manual_seed(seed)
    configs = [EmbeddingBagConfig(name=f"tbl_{f.name}", num_embeddings=f.cardinality, embedding_dim=8,
                                  feature_names=[f.name]) for f in CONF_FEATURES]
    return EmbeddingBagCollection(tables=configs)


def test_full_state_dict_interchanges_with_a_plain_ebc_both_ways():
    kjt, _ = conf_batch(7, 8)
    ebc_model, full_model = MODELS["DLRM"](_plain_ebc(0)), MODELS["DLRM"](build(_plain_ebc(1), method="full"))
    assert sorted(full_model.state_dict()) == sorted(ebc_model.state_dict())  # the EBC's own keys
    full_model.load_state_dict(ebc_model.state_dict())  # strict
    assert torch.equal(full_model(dense(8), kjt), ebc_model(dense(8), kjt))
    other = MODELS["DLRM"](_plain_ebc(2))
    other.load_state_dict(full_model.state_dict())  # and a plain EBC loads full's
    assert torch.equal(other(dense(8), kjt), full_model(dense(8), kjt))


def test_full_loads_state_dicts_written_before_the_torchrec_layout():
    a, b = build(CONF_FEATURES, method="full", dim=8), build(CONF_FEATURES, method="full", dim=8)
    old = {f"tables.{k}": v for k, v in a.state_dict().items()}  # the layout of earlier run dirs
    assert all(k.startswith("tables.embedding_bags.") for k in old)
    b.load_state_dict(old)
    kjt, _ = conf_batch(8, 8)
    assert torch.equal(_flat(b(kjt), b), _flat(a(kjt), a))


@pytest.mark.parametrize(("spec", "sequence"), SUP, ids=SUP_IDS)
def test_state_dict_round_trip_into_a_fresh_module(spec, sequence):
    a, b = build_conf(spec, sequence, seed=0).eval(), build_conf(spec, sequence, seed=4).eval()
    kjt, _ = conf_batch(9, 8)
    if torch.equal(_flat(a(kjt), a), _flat(b(kjt), b)):
        pytest.fail("two seeds built identical modules: the round trip below would prove nothing")
    b.load_state_dict(a.state_dict())  # strict: same keys both ways
    assert torch.equal(_flat(b(kjt), b), _flat(a(kjt), a))
