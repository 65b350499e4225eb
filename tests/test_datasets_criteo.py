"""Criteo converter: real sample vs pandas oracle, synth round trip, bad rows, vocab, splits."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from embtables.cli import main as cli_main
from embtables.datasets.criteo import BadRowError, CriteoOptions, convert_criteo
from embtables.datasets.criteo_format import CAT_NAMES, DENSE_NAMES
from embtables.datasets.schema import load_schema
from embtables.datasets.synth import generate_synth

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo-sample" / "criteo_sample.csv"
SMALL_BLOCK = 0.07  # MB: several blocks even for small files


def _all(root) -> pd.DataFrame:
    s = load_schema(root)
    return pd.concat([pq.read_table(f).to_pandas() for sp in s.splits for f in s.files(root, sp)],
                     ignore_index=True)


def _split(root, split) -> pd.DataFrame:
    s = load_schema(root)
    files = s.files(root, split)
    if not files:
        return pd.DataFrame()
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("crit")
    generate_synth(d / "direct", 12_000, seed=11, tsv=d / "synth.tsv", progress=False)
    return d


@pytest.fixture(scope="module")
def sample_df():
    if not SAMPLE.exists():
        pytest.skip(f"Criteo sample not found at {SAMPLE} (only in the development checkout)")
    return pd.read_csv(SAMPLE, dtype=str, keep_default_na=False)


@pytest.mark.parametrize("mode", ["raw", "vocab"])
def test_real_sample_against_pandas(sample_df, tmp_path, mode):
    s = convert_criteo([SAMPLE], tmp_path / "o", cat_mode=mode, progress=False)
    assert s.rows == {"train": 160, "valid": 20, "test": 20}
    got = _all(tmp_path / "o")
    assert len(got) == len(sample_df) == 200
    for k, name in enumerate(CAT_NAMES):
        col = sample_df[name]
        assert s.categorical[k].cardinality == col[col != ""].nunique(), name
    np.testing.assert_array_equal(got["label"].to_numpy(), sample_df["label"].astype(float).to_numpy())
    for name in DENSE_NAMES:
        x = pd.to_numeric(sample_df[name].replace("", np.nan)).fillna(0).clip(lower=0)
        np.testing.assert_allclose(got[name].to_numpy(), np.log1p(x).to_numpy(), rtol=1e-6)
    if mode == "raw":
        for name in CAT_NAMES:
            want = sample_df[name].map(lambda v: int(v, 16) if v else 0).to_numpy()
            np.testing.assert_array_equal(got[name].to_numpy(), want)
        assert all(c.num_embeddings is None and c.mode == "raw" for c in s.categorical)
    else:
        for k, name in enumerate(CAT_NAMES):
            nonmissing = sample_df[name][sample_df[name] != ""]
            assert s.categorical[k].num_embeddings == 2 + nonmissing.nunique()
            assert got[name].max() < s.categorical[k].num_embeddings


def test_vocab_min_count_oov_and_order(sample_df, tmp_path):
    s = convert_criteo([SAMPLE], tmp_path / "v", cat_mode="vocab", min_count=3, progress=False)
    got = _all(tmp_path / "v")
    for k, name in enumerate(CAT_NAMES):
        raw = sample_df[name]
        vc = raw[raw != ""].value_counts()
        kept = vc[vc >= 3]
        assert s.categorical[k].num_embeddings == 2 + len(kept)
        ids = got[name].to_numpy()
        assert (ids[(raw == "").to_numpy()] == 1).all()  # missing
        rare = raw.isin(vc[vc < 3].index).to_numpy()
        assert (ids[rare] == 0).all()  # OOV
        for v in kept.index:  # one id per kept value, more frequent -> smaller id
            these = np.unique(ids[(raw == v).to_numpy()])
            assert len(these) == 1 and these[0] >= 2
        by_count = kept.sort_values(ascending=False, kind="stable").index
        order = [np.unique(ids[(raw == v).to_numpy()])[0] for v in by_count]
        counts_by_id = {i: (ids == i).sum() for i in order}
        assert [counts_by_id[i] for i in sorted(order)] == sorted(counts_by_id.values(), reverse=True)


def test_vocab_from_maps_consistently(synth, tmp_path):
    lines = (synth / "synth.tsv").read_bytes().splitlines(keepends=True)
    (tmp_path / "a.tsv").write_bytes(b"".join(lines[:6000]))
    (tmp_path / "b.tsv").write_bytes(b"".join(lines[6000:9000]))
    a = convert_criteo([tmp_path / "a.tsv"], tmp_path / "A", cat_mode="vocab", min_count=2, split=(1, 0, 0),
                       progress=False)
    b = convert_criteo([tmp_path / "b.tsv"], tmp_path / "B", cat_mode="vocab", vocab_from=tmp_path / "A",
                       split=(1, 0, 0), progress=False)
    raw = convert_criteo([tmp_path / "a.tsv", tmp_path / "b.tsv"], tmp_path / "R", cat_mode="raw",
                         split=(1, 0, 0), progress=False)
    assert raw.rows["train"] == 9000
    ra, rb = _all(tmp_path / "R").iloc[:6000], _all(tmp_path / "R").iloc[6000:]
    va, vb = _all(tmp_path / "A"), _all(tmp_path / "B")
    assert [c.num_embeddings for c in b.categorical] == [c.num_embeddings for c in a.categorical]
    assert b.extra["vocab"]["min_count"] == 2 and (tmp_path / "B" / "vocab" / "C1.parquet").exists()
    for name in CAT_NAMES:
        mapping = dict(zip(ra[name].to_numpy(), va[name].to_numpy(), strict=True))
        for r, v in zip(rb[name].to_numpy(), vb[name].to_numpy(), strict=True):
            assert v == (1 if r == 0 else mapping.get(r, 0))  # same id as in A; unseen -> OOV 0
        # cardinality counts B's own distinct raw values
        col = rb[name].to_numpy()
        assert b.categorical[CAT_NAMES.index(name)].cardinality == len(np.unique(col[col != 0]))


@pytest.mark.parametrize("gz", [False, True])
def test_synth_tsv_round_trip_equals_direct(synth, tmp_path, gz):
    src = synth / "synth.tsv"
    if gz:
        gzsrc = tmp_path / "synth.tsv.gz"
        gzsrc.write_bytes(gzip.compress(src.read_bytes(), compresslevel=1))
        src = gzsrc
    s = convert_criteo([src], tmp_path / "c", cat_mode="raw", block_mb=SMALL_BLOCK, progress=False)
    direct = load_schema(synth / "direct")
    assert s.rows == direct.rows
    assert [c.cardinality for c in s.categorical] == [c.cardinality for c in direct.categorical]
    for sp in ("train", "valid", "test"):
        a = pq.read_table(direct.files(synth / "direct", sp)[0]).drop(["prob"])
        b = pq.read_table(s.files(tmp_path / "c", sp)[0])
        assert a.equals(b), sp


def _bad_file(synth, tmp_path, variants):
    """Synth TSV lines with bad lines spliced in; returns (path, {line_no: kind}, good lines)."""
    lines = (synth / "synth.tsv").read_bytes().splitlines(keepends=True)[:3000]
    out, where = list(lines), {}
    for k, (pos, kind, make) in enumerate(sorted(variants)):
        at = pos + k  # earlier insertions shift later ones
        fields = lines[pos].rstrip(b"\n").split(b"\t")
        out.insert(at, make(fields) + b"\n")
        where[at + 1] = kind
    p = tmp_path / "bad.tsv"
    p.write_bytes(b"".join(out))
    return p, where, lines


def _set(i, v):
    return lambda f: b"\t".join(f[:i] + [v] + f[i + 1 :])


BAD_KINDS = [
    (5, "column_count", lambda f: b"\t".join(f[:-1])),
    (700, "bad_dense", _set(3, b"abc")),
    (1200, "bad_dense", _set(2, b"1.5")),
    (1500, "bad_dense", _set(4, b" 5")),
    (1700, "bad_dense", _set(5, b"0x5")),
    (2100, "bad_label", _set(0, b"2")),
    (2500, "bad_encoding", _set(20, b"\xff\xfe\xfd")),
    (2800, "bad_categorical", _set(30, b"zz")),
]


@pytest.mark.parametrize("case", BAD_KINDS, ids=[f"{k}@{p}" for p, k, _ in BAD_KINDS])
def test_bad_row_error_names_file_line_text(synth, tmp_path, case):
    path, where, _ = _bad_file(synth, tmp_path, [case])
    (line, kind), = where.items()
    out = tmp_path / "o"
    with pytest.raises(BadRowError) as e:
        convert_criteo([path], out, cat_mode="raw", block_mb=SMALL_BLOCK, progress=False)
    msg = str(e.value)
    assert f"{path}:{line}:" in msg and kind in msg
    bad_text = path.read_bytes().splitlines()[line - 1].decode("utf-8", "backslashreplace")
    assert repr(bad_text)[:60] in msg
    assert e.value.line == line and e.value.reason == kind
    assert not out.exists() and not list(tmp_path.glob("o.tmp-*"))  # nothing that looks complete


def test_bad_rows_skipped_and_counted(synth, tmp_path):
    path, where, lines = _bad_file(synth, tmp_path, BAD_KINDS)
    s = convert_criteo([path], tmp_path / "o", cat_mode="raw", on_bad_row="skip", block_mb=SMALL_BLOCK,
                       split=(1, 0, 0), progress=False)
    want = {"column_count": 1, "bad_label": 1, "bad_dense": 4, "bad_categorical": 1, "bad_encoding": 1}
    assert s.extra["bad_rows"] == want
    assert s.rows["train"] == 3000
    (tmp_path / "clean.tsv").write_bytes(b"".join(lines))
    convert_criteo([tmp_path / "clean.tsv"], tmp_path / "c", cat_mode="raw", split=(1, 0, 0), progress=False)
    assert pq.read_table(tmp_path / "o" / "train").equals(pq.read_table(tmp_path / "c" / "train"))
    assert any(f":{line}: " in ex for ex in s.extra["bad_row_examples"] for line in where)


def test_header_csv_floats_are_fine_but_not_in_official_files(tmp_path):
    row = ["1", "1.0", "-2.0", "", "3.5"] + ["0"] * 9 + ["05db9164"] * 26
    (tmp_path / "h.csv").write_text("label," + ",".join(DENSE_NAMES + CAT_NAMES) + "\n"
                                    + ",".join(row) + "\n")
    s = convert_criteo([tmp_path / "h.csv"], tmp_path / "h", cat_mode="raw", split=(1, 0, 0), progress=False)
    got = _all(tmp_path / "h")
    assert s.rows["train"] == 1
    np.testing.assert_allclose(got[DENSE_NAMES[:4]].to_numpy()[0], np.log1p([1.0, 0.0, 0.0, 3.5]), rtol=1e-6)
    assert got["C1"][0] == 0x05DB9164
    (tmp_path / "t.tsv").write_text("\t".join(row) + "\n")
    with pytest.raises(BadRowError, match=r"t\.tsv:1: bad row \(bad_dense: I1='1.0' is not an integer"):
        convert_criteo([tmp_path / "t.tsv"], tmp_path / "t", cat_mode="raw", progress=False)


def test_dense_transform_none(tmp_path):
    row = ["0", "", "-3", "7"] + ["1"] * 10 + [""] * 26
    (tmp_path / "t.tsv").write_text("\t".join(row) + "\n")
    convert_criteo([tmp_path / "t.tsv"], tmp_path / "o", cat_mode="raw", dense_transform="none",
                   split=(1, 0, 0), progress=False)
    got = _all(tmp_path / "o")
    np.testing.assert_array_equal(got[DENSE_NAMES[:3]].to_numpy()[0], [0.0, -3.0, 7.0])
    assert (got[CAT_NAMES].to_numpy() == 0).all()


def test_random_and_file_splits(synth, tmp_path):
    src = synth / "synth.tsv"
    a = convert_criteo([src], tmp_path / "r1", cat_mode="raw", random_split=True, seed=4, progress=False,
                       block_mb=SMALL_BLOCK)
    b = convert_criteo([src], tmp_path / "r2", cat_mode="raw", random_split=True, seed=4, progress=False)
    c = convert_criteo([src], tmp_path / "r3", cat_mode="raw", random_split=True, seed=5, progress=False)
    assert a.rows == b.rows and sum(a.rows.values()) == 12_000
    assert abs(a.rows["train"] - 9600) < 300 and a.rows != c.rows  # independent of block size, seeded
    for sp in a.splits:
        assert _split(tmp_path / "r1", sp).equals(_split(tmp_path / "r2", sp))
    both = pd.concat([_split(tmp_path / "r1", sp) for sp in a.splits])
    direct = pd.concat([_split(synth / "direct", sp) for sp in ("train", "valid", "test")])
    direct = direct.drop(columns="prob")
    assert len(both.merge(direct, how="inner")) == 12_000  # every row once
    lines = src.read_bytes().splitlines(keepends=True)
    (tmp_path / "p1.tsv").write_bytes(b"".join(lines[:100]))
    (tmp_path / "p2.tsv").write_bytes(b"".join(lines[100:130]))
    s = convert_criteo({"train": [tmp_path / "p1.tsv"], "test": [tmp_path / "p2.tsv"]}, tmp_path / "f",
                       cat_mode="raw", progress=False)
    assert s.rows == {"train": 100, "test": 30} and sorted(s.splits) == ["test", "train"]


def test_cli(synth, tmp_path, capsys):
    assert cli_main(["data", "criteo", str(synth / "synth.tsv"), "--out", str(tmp_path / "o"),
                     "--cat-mode", "raw", "--split", "0.5,0.25,0.25", "--quiet"]) == 0
    assert load_schema(tmp_path / "o").rows == {"train": 6000, "valid": 3000, "test": 3000}
    assert "sum of distinct ids" in capsys.readouterr().out
    (tmp_path / "bad.tsv").write_text("1\t2\n")
    assert cli_main(["data", "criteo", str(tmp_path / "bad.tsv"), "--out", str(tmp_path / "b"),
                     "--quiet"]) == 1
    assert "bad.tsv:1: bad row (column_count" in capsys.readouterr().err
    assert cli_main(["data", "synth", "--rows", "500", "--out", str(tmp_path / "s"), "--quiet",
                     "--scale", "0.01"]) == 0
    assert load_schema(tmp_path / "s").rows["test"] == 50
    with pytest.raises(FileExistsError):
        convert_criteo([synth / "synth.tsv"], tmp_path / "o", cat_mode="raw", progress=False)


def test_parallel_workers_write_the_same_dataset_and_report_the_first_bad_row(synth, tmp_path):
    """--workers 3: blocks parsed on three threads, taken in file order: the same Parquet
    and counts as one block at a time, and the error names the first bad line of the file
    even when a later block fails first."""
    src = synth / "synth.tsv"
    for mode in ("raw", "vocab"):  # vocab: the vocabulary's lookups run on the 3 threads too
        one = convert_criteo([src], tmp_path / f"w1{mode}", cat_mode=mode, block_mb=SMALL_BLOCK,
                             progress=False)
        three = convert_criteo([src], tmp_path / f"w3{mode}", cat_mode=mode, block_mb=SMALL_BLOCK,
                               progress=False, workers=3)
        assert one.rows == three.rows and one.categorical == three.categorical
        for sp in ("train", "valid", "test"):
            got = pq.read_table(tmp_path / f"w3{mode}" / sp)
            assert pq.read_table(tmp_path / f"w1{mode}" / sp).equals(got), sp
    cases = [BAD_KINDS[5], BAD_KINDS[0], BAD_KINDS[7]]  # lines 7, 2103, 2804 in different blocks
    path, where, _ = _bad_file(synth, tmp_path, cases)
    with pytest.raises(BadRowError) as e:
        convert_criteo([path], tmp_path / "o", cat_mode="raw", block_mb=SMALL_BLOCK, progress=False,
                       workers=3)
    assert e.value.line == min(where)
    s = convert_criteo([path], tmp_path / "s", cat_mode="raw", on_bad_row="skip", block_mb=SMALL_BLOCK,
                       progress=False, workers=3)
    assert s.extra["bad_rows"] == {"column_count": 1, "bad_label": 1, "bad_dense": 0, "bad_categorical": 1,
                                   "bad_encoding": 0}


def test_short_hex_ids_take_the_variable_width_path_in_every_block(tmp_path):
    """Legal 1-16 digit ids: the fixed-width fast parse fails, the file falls back to
    variable-width binary for all its blocks, and every value is decoded exactly."""
    rng = np.random.default_rng(5)
    rows, want = [], []
    for i in range(3000):
        ids = [int(rng.integers(1, 2**31)) if i % 7 else int(rng.integers(1, 16)) for _ in CAT_NAMES]
        rows.append("\t".join(["1", *["3"] * 13, *[format(v, "x") for v in ids]]))
        want.append(ids)
    (tmp_path / "short.tsv").write_text("\n".join(rows) + "\n")
    convert_criteo([tmp_path / "short.tsv"], tmp_path / "o", cat_mode="raw", split=(1, 0, 0),
                   block_mb=SMALL_BLOCK, progress=False)
    got = _all(tmp_path / "o")[CAT_NAMES].to_numpy()
    np.testing.assert_array_equal(got, np.asarray(want, dtype=np.int64))


def test_nul_byte_in_a_categorical_is_a_bad_row_not_the_missing_id(synth, tmp_path):
    # the fixed-width decode reads a NUL pair as an empty slot; a NUL in the input must not reach it
    nul8 = b"\x00\x00\x00\x00\x00\x00\x00\x00"
    path, where, _ = _bad_file(synth, tmp_path, [(900, "bad_categorical", _set(20, nul8))])
    (line, _), = where.items()
    with pytest.raises(BadRowError) as e:
        convert_criteo([path], tmp_path / "o", cat_mode="raw", block_mb=SMALL_BLOCK, progress=False)
    assert e.value.line == line and e.value.reason == "bad_categorical"


@pytest.mark.parametrize("batch,merge_min", [(1, 1), (7, 100), (1 << 18, 1 << 20)])
def test_distinct_counter_equals_numpy_unique_across_batches_and_merges(batch, merge_min):
    from embtables.datasets.criteo import _Distinct

    rng = np.random.default_rng(batch)
    # a heavy head and a long tail, so partial results overlap and lazy merges happen
    parts = [np.concatenate([rng.integers(0, 50, 300), rng.integers(0, 1 << 40, int(rng.integers(0, 400)))])
             for _ in range(40)]
    d = _Distinct(batch, merge_min)
    for p in parts:
        d.add(p)
    everything = np.concatenate(parts)
    assert d.count() == len(np.unique(everything))
    assert d.count(exclude=0) == len(np.unique(everything[everything != 0]))
    assert d.count(exclude=-5) == len(np.unique(everything))  # excluding an absent value removes nothing


@pytest.mark.parametrize("batch,merge_min", [(1, 1), (7, 100), (1 << 18, 1 << 20)])
def test_value_counter_equals_numpy_unique_counts_across_batches_and_merges(batch, merge_min):
    from embtables.datasets.criteo import _Counts

    rng = np.random.default_rng(batch + 1)
    parts = [np.concatenate([rng.integers(0, 50, 300), rng.integers(0, 1 << 40, int(rng.integers(0, 400)))])
             for _ in range(40)]
    c = _Counts(batch, merge_min)
    for p in parts:
        c.add(p)
    keys, counts = c.result()
    want_keys, want_counts = np.unique(np.concatenate(parts), return_counts=True)
    np.testing.assert_array_equal(keys, want_keys)
    np.testing.assert_array_equal(counts, want_counts)


@pytest.mark.parametrize("fields,flag", [
    ({"cat_mode": "hash"}, "--cat-mode must be 'raw' or 'vocab', got 'hash'"),
    ({"dense_transform": "log"}, "--dense-transform must be one of"),
    ({"on_bad_row": "drop"}, "--on-bad-row must be 'error' or 'skip'"),
    ({"min_count": 0}, "--min-count must be >= 1, got 0"),
    ({"cat_mode": "raw", "vocab_from": "elsewhere"}, "--vocab-from needs --cat-mode vocab"),
    ({"split": (0.5, 0.5)}, r"--split must be 3 non-negative fractions summing to 1, got \(0.5, 0.5\)"),
    ({"split": (0.9, 0.2, -0.1)}, "--split must be 3 non-negative"),
    ({"block_mb": 0}, "--block-mb must be > 0"),
    ({"workers": 0}, "--workers must be >= 1, got 0"),
])
def test_criteo_options_errors_name_the_flag(fields, flag, tmp_path):
    with pytest.raises(ValueError, match=flag):
        CriteoOptions(**fields)
    with pytest.raises(ValueError, match=flag):  # the keyword form checks the same, before any file
        convert_criteo([tmp_path / "absent.tsv"], tmp_path / "o", progress=False, **fields)
    assert not (tmp_path / "o").exists()


def test_criteo_options_object_converts_like_the_keywords(synth, tmp_path):
    src = synth / "synth.tsv"
    kw = {"cat_mode": "vocab", "min_count": 2, "block_mb": SMALL_BLOCK, "random_split": True, "seed": 3,
          "progress": False}
    a = convert_criteo([src], tmp_path / "kw", **kw)
    b = convert_criteo([src], tmp_path / "opt", CriteoOptions(**kw))
    assert a == b
    for sp in ("train", "valid", "test"):
        assert _split(tmp_path / "kw", sp).equals(_split(tmp_path / "opt", sp))
    with pytest.raises(TypeError, match="not both"):
        convert_criteo([src], tmp_path / "both", CriteoOptions(), cat_mode="raw")
    assert not (tmp_path / "both").exists()
