"""Synthetic Criteo-style generator: determinism, schema contract, planted difficulty."""

from __future__ import annotations

import gzip

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from embtables.datasets.criteo_format import CAT_NAMES, DENSE_NAMES
from embtables.datasets.schema import load_schema
from embtables.datasets.synth import expected_auc, generate_synth, synth_cardinalities


def _read(root, split):
    s = load_schema(root)
    return pq.read_table([str(f) for f in s.files(root, split)]) if len(s.files(root, split)) > 1 \
        else pq.read_table(s.files(root, split)[0])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    schema = generate_synth(d / "a", 30_000, seed=3, tsv=d / "a.tsv.gz", progress=False)
    return d, schema


def test_schema_contract(small):
    d, schema = small
    root = d / "a"
    assert load_schema(root).to_json() == schema.to_json()
    assert schema.rows == {"train": 24_000, "valid": 3_000, "test": 3_000}
    assert schema.dense == DENSE_NAMES and schema.categorical_names == CAT_NAMES
    assert schema.prob_column == "prob"
    tables = {s: _read(root, s) for s in ("train", "valid", "test")}
    for s, t in tables.items():
        assert t.num_rows == schema.rows[s]
        assert str(t.schema.field("label").type) == "float"
        assert str(t.schema.field("C1").type) == "int64"
    vocab = synth_cardinalities(schema.extra["scale"])
    for k, f in enumerate(schema.categorical):
        ids = np.concatenate([t.column(f.name).to_numpy() for t in tables.values()])
        assert ids.min() >= 0 and ids.max() < f.num_embeddings == vocab[k] + 1
        assert f.cardinality == len(np.unique(ids[ids != 0]))  # distinct ids present (0 = missing)
    # row groups of at most 64k rows; labels 0/1; prob a probability
    for s, t in tables.items():
        y, p = t.column("label").to_numpy(), t.column("prob").to_numpy()
        assert set(np.unique(y)) <= {0.0, 1.0}
        assert ((p > 0) & (p < 1)).all()
        assert schema.extra["oracle_auc"][s] == pytest.approx(roc_auc_score(y, p))


def test_dense_are_log1p_of_nonnegative_counts(small):
    d, _ = small
    x = np.stack([_read(d / "a", "train").column(n).to_numpy() for n in DENSE_NAMES], 1).astype(np.float64)
    counts = np.expm1(x)
    assert (x >= 0).all()
    assert (np.abs(counts - np.round(counts)) <= 1e-3 * np.maximum(counts, 1)).all()
    assert (x == 0).mean() > 0.1  # missing and zero counts present, like Criteo


def test_tsv_is_official_criteo_format(small):
    d, schema = small
    with gzip.open(d / "a.tsv.gz", "rt") as f:
        lines = f.read().splitlines()
    assert len(lines) == 30_000
    first = lines[0].split("\t")
    assert len(first) == 40 and first[0] in ("0", "1")
    t = _read(d / "a", "train")
    for k, name in enumerate(CAT_NAMES):  # hex of the id parses back to the stored id (empty = 0)
        field = first[14 + k]
        assert (int(field, 16) if field else 0) == t.column(name)[0].as_py()
    for j, name in enumerate(DENSE_NAMES):
        field = first[1 + j]
        want = np.float32(np.log1p(max(int(field), 0))) if field else 0.0
        assert t.column(name)[0].as_py() == pytest.approx(want, rel=1e-6)


def test_deterministic_by_seed(tmp_path):
    a = generate_synth(tmp_path / "a", 5_000, seed=7, progress=False)
    b = generate_synth(tmp_path / "b", 5_000, seed=7, progress=False)
    c = generate_synth(tmp_path / "c", 5_000, seed=8, progress=False)
    ta, tb, tc = (_read(tmp_path / x, "train") for x in "abc")
    assert ta.equals(tb)
    assert a.categorical == b.categorical
    assert not ta.equals(tc) and c.rows == a.rows


def test_expected_auc_matches_sampled():
    rng = np.random.default_rng(0)
    p = 1 / (1 + np.exp(-rng.normal(-1.3, 1.5, 200_000)))
    y = rng.random(p.size) < p
    assert expected_auc(p) == pytest.approx(roc_auc_score(y, p), abs=0.005)


@pytest.mark.slow
def test_default_difficulty_is_criteo_like(tmp_path):
    s = generate_synth(tmp_path / "d", 300_000, progress=False)
    assert s.extra["oracle_auc"]["train"] == pytest.approx(0.80, abs=0.01)
    assert s.extra["ctr"]["train"] == pytest.approx(0.25, abs=0.01)
