"""BatchReader: exact contents, determinism, resume, rank partitioning."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from embtables.datasets.parquet_out import PartWriter
from embtables.datasets.reader import BatchReader, num_batches, read_label_prob
from embtables.datasets.schema import CategoricalFeature, DatasetSchema, SequenceFeature

torch.set_num_threads(1)
N = 1_037  # not a multiple of anything used below


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Hand-made dataset: C1 = row index (identifies rows), C2 small, a jagged `hist` column,
    row groups of 100 rows over 2 parts."""
    d = tmp_path_factory.mktemp("reader")
    rng = np.random.default_rng(0)
    lens = rng.integers(0, 5, N)
    hist = pa.array([list(range(i, i + k)) for i, k in enumerate(lens)], type=pa.list_(pa.int64()))
    t = pa.table({
        "label": pa.array((np.arange(N) % 3 == 0).astype(np.float32)),
        "d1": pa.array(np.arange(N, dtype=np.float32) / 10),
        "d2": pa.array(rng.random(N).astype(np.float32)),
        "C1": pa.array(np.arange(N, dtype=np.int64)),
        "C2": pa.array(rng.integers(0, 7, N)),
        "hist": hist,
        "prob": pa.array(rng.random(N).astype(np.float32)),
    })
    w = PartWriter(d, "train", t.schema, row_group_rows=100, row_groups_per_part=6)
    for a in range(0, N, 250):
        w.write(t.slice(a, 250))
    w.close()
    schema = DatasetSchema(
        name="toy", dense=["d1", "d2"],
        categorical=[CategoricalFeature("C1", N, "vocab", N), CategoricalFeature("C2", 7, "vocab", 7)],
        sequences=[SequenceFeature("hist", N + 5, 4)], prob_column="prob",
        splits={"train": w.files}, rows={"train": w.rows})
    schema.save(d)
    return d, t


def _rows(batches):
    return np.concatenate([b.sparse_features["C1"].values().numpy() for b in batches])


def test_layout_of_fixture(root):
    d, _ = root
    assert len(BatchReader(d).groups) == 11
    assert len(list((d / "train").glob("*.parquet"))) == 2


def test_contents_equal_parquet_columns(root):
    d, t = root
    batches = list(BatchReader(d, batch_size=64))
    assert len(batches) == num_batches(d, "train", 64) == 17
    dense = torch.cat([b.dense_features for b in batches]).numpy()
    np.testing.assert_array_equal(dense[:, 0], t.column("d1").to_numpy())
    np.testing.assert_array_equal(dense[:, 1], t.column("d2").to_numpy())
    np.testing.assert_array_equal(torch.cat([b.labels for b in batches]).numpy(),
                                  t.column("label").to_numpy())
    assert batches[0].dense_features.dtype == torch.float32 and batches[0].labels.dtype == torch.float32
    kjts = [b.sparse_features for b in batches]
    assert kjts[0].keys() == ["C1", "C2", "hist"]
    for key in ("C1", "C2"):
        vals = np.concatenate([k[key].values().numpy() for k in kjts])
        np.testing.assert_array_equal(vals, t.column(key).to_numpy())
        assert all((k[key].lengths() == 1).all() for k in kjts)
    lens = np.concatenate([k["hist"].lengths().numpy() for k in kjts])
    vals = np.concatenate([k["hist"].values().numpy() for k in kjts])
    np.testing.assert_array_equal(lens, pa.compute.list_value_length(t.column("hist")).to_numpy())
    np.testing.assert_array_equal(vals, pa.compute.list_flatten(t.column("hist")).to_numpy())


def test_shuffle_deterministic_and_epoch_dependent(root):
    d, _ = root
    kw = dict(batch_size=50, shuffle=True, seed=5, shuffle_buffer=300)
    a, b = _rows(BatchReader(d, **kw)), _rows(BatchReader(d, **kw))
    np.testing.assert_array_equal(a, b)
    r = BatchReader(d, **kw)
    r.set_epoch(1)
    c = _rows(r)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(np.sort(a), np.arange(N))
    np.testing.assert_array_equal(np.sort(c), np.arange(N))
    assert not np.array_equal(a, np.arange(N))
    other_seed = _rows(BatchReader(d, **{**kw, "seed": 6}))
    assert not np.array_equal(a, other_seed)


@pytest.mark.parametrize("shuffle", [False, True])
def test_start_batch_resumes_same_stream(root, shuffle):
    d, _ = root
    kw = dict(batch_size=48, shuffle=shuffle, seed=1, shuffle_buffer=200, epoch=2)
    full = list(BatchReader(d, **kw))
    for k in (0, 1, 7, len(full) - 1):
        tail = list(BatchReader(d, start_batch=k, **kw))
        assert len(tail) == len(full) - k
        for x, y in zip(tail, full[k:], strict=True):
            assert torch.equal(x.dense_features, y.dense_features)
            assert torch.equal(x.labels, y.labels)
            assert torch.equal(x.sparse_features.values(), y.sparse_features.values())
            assert torch.equal(x.sparse_features.lengths(), y.sparse_features.lengths())


@pytest.mark.parametrize("world,bs,shuffle", [(3, 40, True), (4, 64, False), (2, 100, True), (5, 207, False)])
def test_ranks_cover_every_row_once_with_equal_batch_counts(root, world, bs, shuffle):
    d, _ = root
    per_rank = [list(BatchReader(d, batch_size=bs, shuffle=shuffle, seed=2, rank=r, world_size=world,
                                 shuffle_buffer=150)) for r in range(world)]
    counts = {len(b) for b in per_rank}
    assert counts == {num_batches(d, "train", bs, world_size=world)}
    rows = np.concatenate([_rows(b) for b in per_rank])
    np.testing.assert_array_equal(np.sort(rows), np.arange(N))
    # drop_last: equal full batches, rows never repeated
    dl = [list(BatchReader(d, batch_size=bs, shuffle=shuffle, rank=r, world_size=world, drop_last=True))
          for r in range(world)]
    assert {len(b) for b in dl} == {(N // world) // bs}
    assert all(len(x.labels) == bs for b in dl for x in b)
    rows = np.concatenate([_rows(b) for b in dl if b] or [np.zeros(0, np.int64)])
    assert len(np.unique(rows)) == len(rows)


def test_fewer_rows_than_ranks_still_reads_every_row_once(tmp_path):
    """3 rows over 5 ranks: K = 1, ranks 0-2 yield their row, ranks 3-4 nothing (the
    evaluation loop pads for them); before, K = 0 and every row was lost."""
    t = pa.table({"label": pa.array([1.0, 0.0, 1.0], pa.float32()), "C1": pa.array([10, 11, 12], pa.int64())})
    w = PartWriter(tmp_path, "valid", t.schema)
    w.write(t)
    w.close()
    DatasetSchema(name="tiny", dense=[], categorical=[CategoricalFeature("C1", 13, "vocab", 13)],
                  splits={"valid": w.files}, rows={"valid": w.rows}).save(tmp_path)
    assert num_batches(tmp_path, "valid", 8, world_size=5) == 1
    per_rank = [list(BatchReader(tmp_path, split="valid", batch_size=8, rank=r, world_size=5, prefetch=0))
                for r in range(5)]
    assert [len(b) for b in per_rank] == [1, 1, 1, 0, 0]
    assert sorted(int(x) for b in per_rank if b for x in _rows(b)) == [10, 11, 12]


def test_prefetch_off_gives_same_stream(root):
    d, _ = root
    a = _rows(BatchReader(d, batch_size=30, shuffle=True, prefetch=0))
    b = _rows(BatchReader(d, batch_size=30, shuffle=True, prefetch=3))
    np.testing.assert_array_equal(a, b)


def test_early_break_stops_worker(root):
    d, _ = root
    r = BatchReader(d, batch_size=10, prefetch=1)
    for i, _b in enumerate(r):
        if i == 2:
            break
    assert len(_rows(r)) == N  # reusable afterwards


def test_read_label_prob(root):
    d, t = root
    y, p = read_label_prob(d, "train")
    np.testing.assert_array_equal(y, t.column("label").to_numpy())
    np.testing.assert_array_equal(p, t.column("prob").to_numpy())
    with pytest.raises(KeyError, match="no split 'test'"):
        read_label_prob(d, "test")


def test_schema_missing_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a converted dataset"):
        BatchReader(tmp_path)


def test_parquet_row_groups_fixed_size(root):
    d, _ = root
    sizes = [pq.ParquetFile(f).metadata.row_group(i).num_rows
             for f in sorted((d / "train").glob("*.parquet"))
             for i in range(pq.ParquetFile(f).num_row_groups)]
    assert sizes == [100] * 10 + [37]
