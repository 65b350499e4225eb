"""`hybrid` (frequency-aware hot/cold tables): hot/cold row assignment by hand, sizing, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import method_feats, method_kjt
from torchrec import KeyedJaggedTensor
from torchrec.models.dlrm import DLRM as TorchRecDLRM

from embtables.embeddings import BudgetTooSmall, build, full_bytes, plan
from embtables.embeddings.hashing import hash_to_rows, salt

FEATS = method_feats()
kjt = method_kjt


def counts_file(tmp_path, hot_a: list[int]) -> str:
    rng = np.random.default_rng(0)
    arrays = {f.name: rng.integers(0, 5, f.cardinality) for f in FEATS}
    for rank, i in enumerate(hot_a):  # the most counted ids of "a", by hand
        arrays["a"][i] = 1000 - rank
    path = tmp_path / "counts.npz"
    np.savez(path, **arrays)
    return str(path)


def test_refuses_without_a_hot_source():
    with pytest.raises(ValueError, match="frequency_ranked.*counts"):
        build(FEATS, method="hybrid", dim=8, budget=0.2)
    with pytest.raises(ValueError, match="not both"):
        build(FEATS, method="hybrid", dim=8, budget=0.2, frequency_ranked=True, counts="x.npz")


def test_ranked_hot_and_cold_rows_by_hand():
    mod = build(FEATS, method="hybrid", dim=8, budget=0.2, frequency_ranked=True)
    p = mod.plan
    k, c = p.hot[0], p.cold[0]
    assert 0 < k < 1000 and c > 0 and p.cold[1] == 0  # "b" (50 ids) fits: a plain table
    ids = torch.tensor([0, k - 1, k, 999])
    rows = (
        mod.remap(
            KeyedJaggedTensor.from_lengths_sync(
                ["a", "b", "c"], torch.cat([ids, torch.tensor([3, 4])]), torch.tensor([4, 1, 1])
            )
        )
        .to_dict()["a"]
        .values()
    )
    want = [
        0,
        k - 1,
        k + int(hash_to_rows(torch.tensor([k]), salt("a", 0), c)),
        k + int(hash_to_rows(torch.tensor([999]), salt("a", 0), c)),
    ]
    assert rows.tolist() == want  # hot ids keep their own row, cold ones share hashed rows past K
    W = mod.tables.embedding_bags["t_a"].weight
    assert W.shape == (k + c, 8)
    out = mod(
        KeyedJaggedTensor.from_lengths_sync(
            ["a", "b", "c"], torch.tensor([1, 2, 999, 7, 8]), torch.tensor([3, 1, 1])
        )
    )
    torch.testing.assert_close(out["a"][0], W[[1, 2, want[3]]].sum(0))


def test_counts_hot_set_by_hand(tmp_path):
    hot = [700, 3, 512, 99]
    mod = build(FEATS, method="hybrid", dim=8, budget=0.2, counts=counts_file(tmp_path, hot))
    k = mod.plan.hot[0]
    assert k >= 4
    x = KeyedJaggedTensor.from_lengths_sync(
        ["a", "b", "c"], torch.tensor([700, 3, 512, 99, 1, 2]), torch.tensor([4, 1, 1])
    )
    rows = mod.remap(x).to_dict()["a"].values().tolist()
    hot_sorted = sorted(mod.remap.hot_0.tolist())
    assert set(hot) <= set(hot_sorted) and len(hot_sorted) == k
    assert rows == [hot_sorted.index(i) for i in hot]  # each hot id its own row in [0, K)
    # bytes: rows x dim x 4 + 8 per hot id of the id map, all counted
    p = mod.plan
    buf = sum(k * 8 for k, c in zip(p.hot, p.cold, strict=True) if c)
    assert (
        mod.memory_bytes() == p.bytes == sum(k + c for k, c in zip(p.hot, p.cold, strict=True)) * 8 * 4 + buf
    )
    with pytest.raises(FileNotFoundError, match="counts"):
        build(FEATS, method="hybrid", dim=8, budget=0.2, counts=str(tmp_path / "none.npz"))
    np.savez(tmp_path / "bad.npz", a=np.ones(1000))
    with pytest.raises(ValueError, match=r"no array for feature\(s\) \['b', 'c'\]"):
        build(FEATS, method="hybrid", dim=8, budget=0.2, counts=str(tmp_path / "bad.npz"))


def test_sizing_budgets_and_minimum():
    full = full_bytes(FEATS, 16)
    for budget in (1.0, 0.5, 1 / 8, 1 / 32):
        q = plan(FEATS, "hybrid", dim=16, budget=budget, frequency_ranked=True)
        mod = build(FEATS, method="hybrid", dim=16, budget=budget, frequency_ranked=True)
        assert mod.memory_bytes() == q.bytes <= int(budget * full)
        assert mod(kjt()).values().shape == (3, 48)
    assert plan(FEATS, "hybrid", dim=16, budget=1.0, frequency_ranked=True).cold == (0, 0, 0)
    with pytest.raises(BudgetTooSmall) as e:
        build(FEATS, method="hybrid", dim=16, budget=100, frequency_ranked=True)
    build(FEATS, method="hybrid", dim=16, budget=e.value.minimum, frequency_ranked=True)


def test_weighted_sequence_int32_and_dlrm():
    mod = build(FEATS, method="hybrid", dim=8, budget=0.2, frequency_ranked=True, weighted=True)
    torch.testing.assert_close(mod(kjt(True)).values(), mod(kjt(True, torch.int32)).values(), rtol=0, atol=0)
    seq = build(FEATS, method="hybrid", dim=8, budget=0.2, frequency_ranked=True, sequence=True)
    assert seq(kjt())["c"].values().shape == (6, 8)
    model = TorchRecDLRM(
        embedding_bag_collection=build(FEATS, method="hybrid", dim=8, budget=0.2, frequency_ranked=True),
        dense_in_features=4,
        dense_arch_layer_sizes=[8, 8],
        over_arch_layer_sizes=[8, 1],
    )
    model(torch.randn(3, 4), kjt()).sum().backward()


def test_synthetic_data_writes_train_id_counts_hybrid_reads(tmp_path):
    import pyarrow.parquet as pq

    from embtables.datasets.schema import load_schema
    from embtables.datasets.synth import ID_COUNTS_FILE, generate_synth
    from embtables.embeddings import features_from_schema

    schema = generate_synth(tmp_path / "d", 6000, seed=1, progress=False)
    assert load_schema(tmp_path / "d").extra["id_counts"] == ID_COUNTS_FILE
    train = pq.read_table([str(f) for f in schema.files(tmp_path / "d", "train")])
    with np.load(tmp_path / "d" / ID_COUNTS_FILE) as z:
        for f in schema.categorical:
            ids = train.column(f.name).to_numpy()
            np.testing.assert_array_equal(z[f.name], np.bincount(ids, minlength=f.table_rows))  # train only
    feats = features_from_schema(schema)
    mod = build(feats, method="hybrid", dim=8, budget=1 / 16, counts=str(tmp_path / "d" / ID_COUNTS_FILE))
    with np.load(tmp_path / "d" / ID_COUNTS_FILE) as z:
        i = next(i for i, c in enumerate(mod.plan.cold) if c)
        top = int(np.argmax(z[feats[i].name]))
    assert top in getattr(mod.remap, f"hot_{i}").tolist()  # the most frequent id is hot
