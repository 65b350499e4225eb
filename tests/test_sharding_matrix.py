"""Every embedding method under every sharding type TorchRec offers for its module kind,
2 ranks on CPU (gloo): forward, gradients (through one SGD step) and one adaptive
optimizer step equal the unsharded model from the same initial weights; impossible
combinations are refused before planning with a clear message. All cases run inside
one spawned 2-process group."""

from __future__ import annotations

import pytest
from sharding_testing import build_matrix_method, module_kind, shared_two_rank_run

from embtables.embeddings import list_methods

EBC_TYPES = ["table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"]
EC_TYPES = ["table_wise", "row_wise", "column_wise"]  # EC: no TWRW; data_parallel is wrong on CPU
# qr's default `mult` combines per id, so its tables are an EmbeddingCollection even for
# pooled features; `qr:add` keeps an EmbeddingBagCollection.
SPECS = [s for s in ("full", "hash", "qr", "qr:add", "unified") if s.split(":")[0] in list_methods()]

CASES, REFUSED = [], []
for spec in SPECS:
    for seq in (False, True):
        kind = module_kind(build_matrix_method(spec, seq))
        ok = EBC_TYPES if kind == "ebc" else EC_TYPES
        CASES += [(spec, seq, t, "sgd") for t in ok]
        REFUSED += [((spec, seq, t, "sgd"), f"cannot be {t}") for t in EBC_TYPES if t not in ok]
# Adaptive optimizers: rowwise Adagrad keeps one state per row shard, so column_wise
# legitimately differs with it (TORCHREC-NOTES); plain Adagrad is elementwise.
CASES += [("full", False, t, "rowwise_adagrad")
          for t in ("table_wise", "row_wise", "table_row_wise", "data_parallel")]
CASES += [("full", False, "column_wise", "adagrad"), ("full", True, "row_wise", "rowwise_adagrad")]
# Over budget: rank 0's planner error reaches every rank as the same exception, no hang.
REFUSED.append((("full", False, "table_wise", "sgd", "4KiB"), "no plan fits the memory budget"))
if "mch" in list_methods():
    REFUSED.append((("mch", False, "row_wise", "sgd"), "mch cannot run on 2 ranks"))


def _id(case) -> str:
    return f"{case[0]}-{'seq' if case[1] else 'pooled'}-{case[2]}-{case[3]}"


ALL_CASES = CASES + [c for c, _ in REFUSED]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from test_sharding_launch import suite_args  # one 2-rank spawn serves both files

    out = shared_two_rank_run(ALL_CASES, suite_args(tmp_path_factory))["matrix"]
    return dict(zip(ALL_CASES, zip(*out, strict=True), strict=True))  # case -> (rank 0, rank 1) results


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_sharded_equals_unsharded(results, case):
    for rank, res in enumerate(results[case]):
        assert res[0] == "ok", f"rank {rank}: {res}"
        _, fwd, step = res
        assert fwd < 1e-6, f"rank {rank}: forward differs by {fwd}"
        assert step < 1e-5, f"rank {rank}: weights after one step differ by {step}"


@pytest.mark.parametrize(("case", "message"), REFUSED, ids=lambda c: _id(c) if isinstance(c, tuple) else "")
def test_impossible_sharding_is_refused_before_planning(results, case, message):
    for res in results[case]:
        assert res[0] == "error", res
        assert message in res[1]
