"""Serving artefacts: a trained run's tables as TorchRec's quantized inference modules.

Oracles: row sizes computed by hand from FBGEMM's documented row layout
(``[scale fp16 | bias fp16 | codes]``, padded to the row alignment, tables to 128 bytes);
the stored rows decoded here by hand and compared with the fp32 weights (within half a
quantization step); every registered method's quantized forward against its fp32 forward
on the hand-decoded weights; AUC by scikit-learn against the fp32 run's own predictions.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conformance_testing import build_conf, conf_batch, conformance_specs, spec_id
from conftest import method_feats, method_kjt, tiny_overrides
from sklearn.metrics import roc_auc_score

from embtables.cli import main
from embtables.datasets.schema import load_schema
from embtables.embeddings import FeatureSpec, build, get_method
from embtables.embeddings.budget import full_bytes
from embtables.embeddings.hash import HashEmbedding
from embtables.embeddings.quantize import (
    BITS,
    NotQuantizable,
    is_quantized,
    quantization_step,
    quantize_tables,
    row_bytes,
    stored_rows,
)
from embtables.embeddings.spec import features_from_schema
from embtables.experiments import run
from embtables.experiments.export import (
    MANIFEST,
    PROGRAM_FILE,
    ExportError,
    _export_program,
    embedding_modules,
    example_batch,
    export_run,
    load_artefact,
    quantize_model,
    score,
)
from embtables.experiments.predict import predict

DTYPES = ("fp16", "int8", "int4", "int2")


def decode(rows: torch.Tensor, dim: int, dtype: str) -> torch.Tensor:
    """Stored uint8 rows -> fp32 values, by hand: fp16 rows are the halves themselves; an
    n-bit row is an fp16 scale, an fp16 bias, then the codes, lowest bits first in a byte."""
    if dtype == "fp16":
        return rows[:, :2 * dim].contiguous().view(torch.float16).float()
    sb = rows[:, :4].contiguous().view(torch.float16).float()
    bits = BITS[dtype]
    codes = rows[:, 4:4 + dim * bits // 8].long()
    q = torch.stack([(codes >> (bits * j)) & (2**bits - 1) for j in range(8 // bits)], dim=2)
    return q.reshape(len(rows), dim) * sb[:, :1] + sb[:, 1:2]


# ---- bytes -----------------------------------------------------------------------------------
# (dim, dtype, alignment) -> bytes of one row, by hand: fp16 2*dim; int-n dim*n/8 + 4
# (scale, bias), rounded up to the alignment.
ROWS_BY_HAND = {
    (16, "fp16", 16): 32, (16, "int8", 16): 32, (16, "int4", 16): 16, (16, "int2", 16): 16,
    (16, "fp16", 4): 32, (16, "int8", 4): 20, (16, "int4", 4): 12, (16, "int2", 4): 8,
    (64, "fp16", 16): 128, (64, "int8", 16): 80, (64, "int4", 16): 48, (64, "int2", 16): 32,
    (64, "int8", 4): 68, (64, "int4", 4): 36, (64, "int2", 4): 20,
}


@pytest.mark.parametrize(("dim", "dtype", "align"), list(ROWS_BY_HAND), ids=[f"{d}-{t}-a{a}" for d, t, a in
                                                                             ROWS_BY_HAND])
def test_memory_bytes_are_the_stored_rows(dim, dtype, align):
    m = build([FeatureSpec("a", 64), FeatureSpec("b", 5)], method="full", dim=dim).eval()
    q = quantize_tables(m, dtype, row_alignment=align)
    rb = ROWS_BY_HAND[(dim, dtype, align)]
    assert row_bytes(dim, dtype, align) == rb
    rows = stored_rows(q.tables)
    assert {n: tuple(r.shape) for n, r in rows.items()} == {"t_a": (64, rb), "t_b": (5, rb)}
    # 64 rows fill whole 128-byte lines at every size above; 5 rows are padded to one line more.
    by_hand = 64 * rb + -(-5 * rb // 128) * 128
    assert q.memory_bytes() == q.table_bytes() == by_hand


def test_int8_takes_fp16s_bytes_at_dim16_and_a_smaller_alignment_saves():
    assert row_bytes(16, "int8") == row_bytes(16, "fp16") and row_bytes(16, "int2") == row_bytes(16, "int4")
    assert row_bytes(16, "int8", 4) < row_bytes(16, "fp16", 4)
    with pytest.raises(ValueError, match="row-alignment"):
        quantize_tables(build([FeatureSpec("a", 8)], method="full", dim=8), "int8", row_alignment=3)


# ---- values ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_stored_rows_are_within_half_a_step_of_the_fp32_weights(dtype):
    m = build([FeatureSpec("a", 64), FeatureSpec("b", 5)], method="full", dim=16).eval()
    w = {n: b.weight.detach().clone() for n, b in m.tables.embedding_bags.items()}
    q = quantize_tables(copy.deepcopy(m), dtype)
    for name, rows in stored_rows(q.tables).items():
        err = (decode(rows, 16, dtype) - w[name]).abs().amax(dim=1)
        # half a step, plus the fp16 rounding of the scale and bias (relative 2^-11 each)
        slack = (w[name].abs().amax(dim=1) + (w[name].amax(1) - w[name].amin(1))) * 2.0**-10
        assert bool((err <= quantization_step(w[name], dtype) / 2 + slack).all()), (name, dtype)
        assert not torch.equal(decode(rows, 16, dtype), w[name])  # it was quantized


SPECS = conformance_specs()


@pytest.mark.parametrize("spec", SPECS, ids=[spec_id(s) for s in SPECS])
def test_every_method_serves_its_own_quantized_rows(spec):
    """The quantized module's output equals the fp32 module's output on the hand-decoded
    stored rows: remap and combine unchanged, the tables read only through TorchRec."""
    emb = build_conf(spec).eval()
    kjt, _ = conf_batch(1, 8)
    q = quantize_model(emb, "int4")
    if not emb.has_tables:  # table-free (dhe): nothing quantized, identical module and bytes
        assert torch.equal(q(kjt).values(), emb(kjt).values())
        assert q.memory_bytes() == emb.memory_bytes()
        return
    ref = copy.deepcopy(emb)
    mods = getattr(ref.tables, "embedding_bags", None) or ref.tables.embeddings
    with torch.no_grad():
        for name, rows in stored_rows(q.tables).items():
            mods[name].weight.copy_(decode(rows, mods[name].weight.shape[1], "int4"))
    got, want = q(kjt).values(), ref(kjt).values()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    assert not torch.allclose(got, emb(kjt).values(), atol=1e-7)  # and the rows did change
    # bytes: each table's rows at their own width, padded by hand (tiny or 4-wide tables can
    # take more than fp32: 4 scale/bias bytes per row and a 128-byte line per table)
    by_hand = sum(-(-c.num_embeddings * row_bytes(c.embedding_dim, "int4") // 128) * 128
                  for c in emb.table_configs())
    assert q.table_bytes() == by_hand
    assert q.memory_bytes() == by_hand + emb.memory_bytes() - emb.table_bytes()


def test_narrow_tables_are_refused_for_bit_widths_fbgemm_cannot_pack():
    # FBGEMM packs a row's codes in 2-byte units: a 4-wide table fits int4 (16 bits) but not
    # int2 (8 bits). The refusal names the width and the dtypes that work; nothing is changed.
    emb = build(method_feats(), method="full", dim=4)
    before = copy.deepcopy(emb.state_dict())
    with pytest.raises(NotQuantizable, match=r"tables 4 wide cannot be stored as int2.*--dtype int8 or int4"):
        quantize_tables(emb, "int2")
    assert type(emb.tables).__name__ == "EmbeddingBagCollection"
    assert all(torch.equal(v, emb.state_dict()[k]) for k, v in before.items())
    quantize_tables(emb, "int4")  # 4 x 4 bits = 16: fits
    assert is_quantized(emb.tables)


def test_a_method_declaring_unquantizable_tables_is_refused_by_name():
    class Opaque(HashEmbedding):
        method_name = "opaque"
        quantizable_tables = False

    emb = Opaque(method_feats(), dim=8, budget_bytes=None)
    before = copy.deepcopy(emb.state_dict())

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = emb

    with pytest.raises(NotQuantizable, match="opaque"):
        quantize_model(Model(), "int8", inplace=True)
    assert type(emb.tables).__name__ == "EmbeddingBagCollection"  # untouched
    assert all(torch.equal(v, emb.state_dict()[k]) for k, v in before.items())
    assert get_method("hash").quantizable_tables and emb(method_kjt()).values().dtype == torch.float32


# ---- a trained run, exported -------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_synth, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    rd = tmp / "run"
    over = {"embedding.method": "hash", "embedding.budget": 0.5, "train.max_steps": 15}
    run("quickstart", overrides=tiny_overrides(tiny_synth, **over), run_dir=rd, quiet=True)
    fp32 = tmp / "fp32.parquet"
    predict(rd, tiny_synth, fp32, split="test")
    return rd, tiny_synth, pq.read_table(fp32).to_pandas(), tmp


@pytest.mark.parametrize(("dtype", "prob_tol", "auc_tol"), [("fp16", 1e-3, 1e-3), ("int8", 5e-3, 5e-3)])
def test_exported_run_scores_like_the_fp32_run(trained, dtype, prob_tol, auc_tol):
    rd, data, fp32, tmp = trained
    art = tmp / f"art-{dtype}"
    manifest = export_run(rd, dtype, art)
    p = tmp / f"{dtype}.parquet"
    predict(art, data, p, split="test")
    got = pq.read_table(p).to_pandas()
    assert np.array_equal(got["label"], fp32["label"])
    assert np.abs(got["prob"] - fp32["prob"]).max() < prob_tol
    auc, auc32 = roc_auc_score(got["label"], got["prob"]), roc_auc_score(fp32["label"], fp32["prob"])
    assert abs(auc - auc32) < auc_tol
    # predict is the exported module's forward, exactly
    model, _ = load_artefact(art)
    probs, _ = score(model, data, "test", 1024)
    assert np.array_equal(got["prob"].to_numpy(), probs.astype(np.float32))
    # the manifest's bytes are the module's, and serving holds fewer than training's fp32 tables
    (mod,) = embedding_modules(model).values()
    assert manifest["modules"]["embedding"]["memory_bytes"] == mod.memory_bytes() == manifest["serving_bytes"]
    assert manifest["serving_bytes"] < manifest["fp32_bytes"] == manifest["training"]["embedding_bytes"]
    assert manifest["training"]["optimizer_state_bytes"] > 0
    assert mod.serving_dtype == dtype and all(p.dtype == torch.float32 for p in model.parameters())


def test_exported_program_equals_the_module(trained):
    rd, data, _, tmp = trained
    art = tmp / "art-int4"
    manifest = export_run(rd, "int4", art)
    assert manifest["program"]["saved"], manifest["program"]
    ep = torch.export.load(str(art / PROGRAM_FILE))
    model, _ = load_artefact(art)
    b = example_batch(data, "test", manifest["program"]["batch_size"])
    with torch.no_grad():
        assert torch.allclose(ep.module()(b.dense_features, b.sparse_features),
                              model(b.dense_features, b.sparse_features), atol=1e-6)


def test_artefact_needs_no_run_directory(trained):
    rd, data, fp32, tmp = trained
    copy_rd = tmp / "run-copy"
    shutil.copytree(rd, copy_rd)
    art = tmp / "art-moved"
    export_run(copy_rd, "int8", art, program=False)
    shutil.rmtree(copy_rd)
    p = tmp / "moved.parquet"
    assert main(["predict", str(art), str(data), "--split", "test", "--out", str(p)]) == 0
    assert len(pq.read_table(p)) == len(fp32)
    assert json.loads((art / MANIFEST).read_text())["program"]["saved"] is False


def test_a_method_that_does_not_export_is_skipped_with_its_reason(tmp_path):
    class NotExportable(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = build(method_feats(), method="optembed", dim=8)

    out = _export_program(NotExportable(), None, tmp_path / PROGRAM_FILE)
    assert out["saved"] is False and "optembed" in out["skipped"] and "exportable" in out["skipped"]
    assert not (tmp_path / PROGRAM_FILE).exists()


# ---- bad input: a clear error, nothing written --------------------------------------------------
def _nothing_at(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_bad_run_dir_is_refused(trained, tmp_path, capsys):
    out = tmp_path / "art"
    with pytest.raises(ExportError, match="RUN_DIR .*no such directory"):
        export_run(tmp_path / "missing", "int8", out)
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--dtype", "int8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "RUN_DIR" in err and "not a run directory" in err
    _nothing_at(out)


def test_bad_dtype_is_refused(trained, tmp_path, capsys):
    rd, _, _, _ = trained
    out = tmp_path / "art"
    with pytest.raises(ExportError, match="--dtype must be one of fp32, fp16, int8, int4, int2, got 'int3'"):
        export_run(rd, "int3", out)
    with pytest.raises(SystemExit):
        main(["export", str(rd), "--dtype", "int3", "--out", str(out)])
    assert "--dtype" in capsys.readouterr().err
    _nothing_at(out)


def test_existing_out_is_never_overwritten(trained, tmp_path):
    rd, _, _, _ = trained
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="--out .* exists"):
        export_run(rd, "int8", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".art.")]


# ---- embedding.serve_dtype: a budget met at serving precision -------------------------------------
@pytest.mark.parametrize("spec", [s for s in conformance_specs() if get_method(s[0]).quantizable_tables
                                  and get_method(s[0]).has_tables], ids=spec_id)
def test_serving_bytes_are_the_quantized_modules_bytes(spec):
    """``serving_bytes(dtype)`` (from the table shapes, before quantizing) is what the
    quantized module's storage holds, for every method with quantizable tables."""
    for dtype in ("fp16", "int8", "int4"):
        emb = build_conf(spec)
        want = emb.serving_bytes(dtype)
        try:
            quantize_tables(emb, dtype)
        except NotQuantizable:  # a bit width its narrow tables cannot pack: refused elsewhere
            continue
        assert emb.memory_bytes() == want, dtype


def test_serve_dtype_sizes_for_serving_and_scores_the_quantized_model(tiny_synth, tmp_path):
    """At the same budget, `hash` with serve_dtype int4 holds more rows than plain `hash`
    (its rows cost their int4 bytes), its served tables fit the budget, and the summary's AUC
    is the int4 model's: the same as exporting the run at int4 and scoring it (sklearn)."""
    over = {"embedding.method": "hash", "embedding.budget": 0.25, "train.max_steps": 12}
    plain = run("quickstart", overrides=tiny_overrides(tiny_synth, **over), run_dir=tmp_path / "plain",
                quiet=True)
    over4 = {**over, "embedding.serve_dtype": "int4"}
    served = run("quickstart", overrides=tiny_overrides(tiny_synth, **over4), run_dir=tmp_path / "int4",
                 quiet=True)
    budget = plain["embedding_bytes"]  # hash fills the budget: its bytes are (within a row of) it
    whole = full_bytes(features_from_schema(load_schema(tiny_synth)), 8)
    assert plain["embedding_bytes"] <= 0.25 * whole and served["embedding_bytes"] <= 0.25 * whole
    # an int4 row at dim 8 is 4 bytes of codes + 4 of scale and bias, padded to 16; fp32's is 32
    ratio = 8 * 4 / row_bytes(8, "int4")
    assert ratio == 2 and 0.95 * ratio * budget < served["training_embedding_bytes"] <= ratio * budget
    assert served["serving"]["dtype"] == "int4" and served["serving"]["trained"]["embedding_bytes"] > budget
    art = tmp_path / "art"
    export_run(tmp_path / "int4", "int4", art)
    p = tmp_path / "p.parquet"
    predict(art, tiny_synth, p, split="test")
    got = pq.read_table(p).to_pandas()
    want = roc_auc_score(got["label"], got["prob"])
    assert served["test_auc"] == served["auc"] == pytest.approx(want, abs=1e-6)
    assert served["serving"]["trained"]["auc"] != served["auc"]  # the headline is the quantized model's


def test_serve_dtype_refusals(tiny_synth, tmp_path):
    from embtables.experiments.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="serve_dtype needs train.checkpoint: true"):
        load_config("quickstart", overrides={"embedding.serve_dtype": "int4", "train.checkpoint": False})
    with pytest.raises(ConfigError, match="embedding.serve_dtype"):
        load_config("quickstart", overrides={"embedding.serve_dtype": "int3"})
    over = {"embedding.method": "dhe", "embedding.budget": 0.25, "embedding.serve_dtype": "int8"}
    with pytest.raises(ValueError, match="dhe has no tables to serve quantized"):
        run("quickstart", overrides=tiny_overrides(tiny_synth, **over), run_dir=tmp_path / "r", quiet=True)
    assert not (tmp_path / "r").exists()
    over = {"embedding.method": "optembed", "embedding.serve_dtype": "int8"}
    with pytest.raises(ValueError, match="optembed runs its own stages, which do not score a served model"):
        run("quickstart", overrides=tiny_overrides(tiny_synth, **over), run_dir=tmp_path / "r", quiet=True)
    assert not (tmp_path / "r").exists()
    over = {"embedding.method": "hash", "embedding.dim": 4, "embedding.budget": 0.25,
            "embedding.serve_dtype": "int2"}  # FBGEMM packs int2 codes in 2-byte units: 8 wide at least
    with pytest.raises(ValueError, match="serve_dtype=int2: hash: tables 4 wide cannot be stored as int2"):
        run("quickstart", overrides=tiny_overrides(tiny_synth, **over), run_dir=tmp_path / "r", quiet=True)
    assert not (tmp_path / "r").exists()
