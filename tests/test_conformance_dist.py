"""Conformance, multi-process: every registered method under TorchRec's *stock*
DistributedModelParallel (TorchRec's default sharders and planner, as a user's own script
has them) on 1 and 2 gloo ranks, each sharding type forced once with embtables' documented
sharders (row_wise / table_row_wise switched on), TrainPipelineBase and
TrainPipelineSparseDist against a plain loop, and DCP save/load into a fresh sharded model.
Refusals (a method declaring ``supports_multi_rank=False``; tables DMP left unsharded) are
asserted. A method without tables (``has_tables=False``) that declares multi-rank support
is checked on 2 ranks under stock DMP (which hands it to DDP) and plain DDP: outputs and
gradients equal the unsharded module's. One spawned group per world size (1 and 2 ranks)
runs every case of that size.
The full cross product of methods x sharding types x optimizers is marked ``slow``."""

from __future__ import annotations

import pytest
from conformance_testing import build_conf, conformance_specs, conformance_worker, spec_id

from embtables.embeddings import get_method

SPECS = conformance_specs()
EBC_TYPES = ["table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"]


def caps(spec):
    return get_method(spec[0]).capabilities()


def faces(spec):
    c = caps(spec)
    return [seq for seq, ok in ((False, c.pooled), (True, c.sequence)) if ok]


def multi_rank(spec) -> bool:
    return caps(spec).multi_rank


def forced_types(spec, sequence: bool) -> list[str]:
    return list(build_conf(spec, sequence).sharding_types("cpu"))


def _cases(full: bool) -> list[tuple]:
    """(kind, world, *args). Default: planner's own choice on 1 and 2 ranks for every face,
    one forced sharding type per face (rotating, so every type is forced), the pipelines and
    DCP on 2 ranks. ``full``: every type x {sgd, rowwise_adagrad} x {1, 2} ranks."""
    cases: list[tuple] = []
    turn = 0
    for spec in SPECS:
        worlds = (1, 2) if multi_rank(spec) else (1,)
        for seq in faces(spec):
            for w in worlds:
                cases.append(("dmp", w, spec, seq, False, None, "sgd", "default"))
            types = forced_types(spec, seq)
            if full:
                for t in types:
                    for w in worlds:
                        opts = ["sgd"] + (["rowwise_adagrad"] if t != "column_wise" else [])
                        cases += [("dmp", w, spec, seq, False, t, o, "embtables") for o in opts]
            elif types:  # a table-free method (dhe) has no sharding type to force
                stype = types[turn % len(types)]
                cases.append(("dmp", worlds[-1], spec, seq, False, stype, "sgd", "embtables"))
                turn += 1
        one = build_conf(spec)
        several_tables = one.table_kind() == "ebc" and len(one.table_configs()) > 1
        if caps(spec).pooled and multi_rank(spec) and several_tables:
            # Keys grouped by sharding type (data_parallel + table_wise), stock sharders.
            cases.append(("dmp", 2, spec, False, False, "mixed", "sgd", "default"))
        if caps(spec).pooled and caps(spec).weighted:
            cases.append(("dmp", worlds[-1], spec, False, True, None, "sgd", "default"))
        if caps(spec).pooled:
            cases.append(("pipeline", worlds[-1], spec, "sparse"))
            if full or spec[0] == "full":
                cases.append(("pipeline", worlds[-1], spec, "base"))
        cases.append(("dcp", worlds[-1], spec, not caps(spec).pooled))
        if not caps(spec).has_tables and multi_rank(spec):
            # Nothing to shard: DMP hands the model to DDP. Outputs and gradients, both wrappers.
            cases += [("tablefree", 2, spec, seq, wrapper)
                      for seq in faces(spec) for wrapper in ("dmp", "ddp")]
    # Adaptive optimizer (state per row): every type but column_wise, on the plain table.
    if not full:
        cases += [("dmp", 2, ("full", {}), False, False, t, "rowwise_adagrad", "embtables")
                  for t in EBC_TYPES if t != "column_wise"]
    for spec in SPECS:
        if not caps(spec).multi_rank:
            cases.append(("refusal", 2, f"{spec[0]}-multi-rank"))
    cases.append(("refusal", 2, "qr-mult-ebc-sharder"))
    cases.append(("legacy", 2))
    return cases


def case_id(case) -> str:
    kind, world, *args = case
    if kind == "dmp":
        spec, seq, weighted, forced, opt, sharders = args
        return (f"dmp-{world}r-{spec_id(spec)}-{'seq' if seq else 'pooled'}{'-weighted' if weighted else ''}-"
                f"{forced or 'planner'}-{opt}-{sharders}")
    if kind == "tablefree":
        return f"tablefree-{args[2]}-{world}r-{spec_id(args[0])}-{'seq' if args[1] else 'pooled'}"
    if kind == "pipeline":
        return f"pipeline-{args[1]}-{world}r-{spec_id(args[0])}"
    if kind == "dcp":
        return f"dcp-{world}r-{spec_id(args[0])}"
    if kind == "legacy":
        return f"legacy-checkpoint-{world}r"
    return f"refusal-{args[0]}"


CASES = _cases(full=False)
SLOW_CASES = [c for c in _cases(full=True) if c not in CASES]
_RESULTS: dict[str, dict] = {}


def _run(cases, tmp_path_factory) -> dict:
    from embtables.sharding.launch import launch

    key = repr(cases)
    if key not in _RESULTS:
        tmp = str(tmp_path_factory.mktemp("conformance"))
        merged: dict[str, list] = {}
        for world in (1, 2):  # one launch per world size, every case of that size inside it
            mine = [c for c in cases if c[1] == world]
            if mine:
                out = launch(conformance_worker, world, (mine, tmp), timeout_s=1200)
                merged.update(zip(map(repr, mine), zip(*out, strict=True), strict=True))
        _RESULTS[key] = merged
    return _RESULTS[key]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _run(CASES, tmp_path_factory)


@pytest.fixture(scope="module")
def slow_results(tmp_path_factory):
    return _run(SLOW_CASES, tmp_path_factory)


def _ranks(res, case):
    world = case[1]
    out = []
    for rank, r in enumerate(res[repr(case)][:world]):
        assert r[0] == "ok", f"rank {rank}: {r[1] if len(r) > 1 else r}"
        out.append(r[1])
    return out


def check_dmp(res, case):
    for rank, (fwd, step, types, sizes) in enumerate(_ranks(res, case)):
        assert fwd <= 1e-6, f"rank {rank}: forward differs from the unsharded module by {fwd} ({types})"
        assert step <= 1e-5, f"rank {rank}: weights after one step differ by {step} ({types})"
        forced = case[5]
        if forced == "mixed":
            assert types == ["data_parallel", "table_wise"], types
        elif forced is not None:
            assert types == [forced], f"planned {types}, forced {forced}"
        repr_ok, bytes_now, bytes_before, configs_same = sizes
        assert repr_ok and bytes_now == bytes_before and configs_same, sizes


DMP_CASES = [c for c in CASES if c[0] == "dmp"]


@pytest.mark.parametrize("case", DMP_CASES, ids=case_id)
def test_stock_dmp_equals_unsharded(results, case):
    check_dmp(results, case)


TABLE_FREE_CASES = [c for c in CASES if c[0] == "tablefree"]


def test_every_table_free_multi_rank_method_runs_on_two_ranks():
    """Driven by the declarations: a method without tables that declares multi-rank support
    is checked under DMP and DDP on 2 ranks, pooled and sequence where it has them."""
    want = {(spec_id(s), seq, w) for s in SPECS if not caps(s).has_tables and caps(s).multi_rank
            for seq in faces(s) for w in ("dmp", "ddp")}
    assert {(spec_id(c[2]), c[3], c[4]) for c in TABLE_FREE_CASES} == want
    assert all(c[1] == 2 for c in TABLE_FREE_CASES)
    on_two = {spec_id(c[2]) for c in DMP_CASES if c[1] == 2}
    assert on_two >= {spec_id(s) for s in SPECS if caps(s).multi_rank}


@pytest.mark.parametrize("case", TABLE_FREE_CASES, ids=case_id)
def test_table_free_method_under_dmp_and_ddp_equals_unsharded(results, case):
    for rank, (fwd, grad, scale, wrapper) in enumerate(_ranks(results, case)):
        assert wrapper == "DistributedDataParallel", f"rank {rank}: wrapped in {wrapper}"
        assert fwd <= 1e-6, f"rank {rank}: outputs differ from the unsharded module by {fwd}"
        assert scale > 0, f"rank {rank}: a parameter got no gradient (the check below would prove nothing)"
        assert grad <= 1e-6, f"rank {rank}: gradients differ from the unsharded module's by {grad}"


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "pipeline"], ids=case_id)
def test_train_pipeline_losses_equal_a_plain_loop(results, case):
    spec, pipeline = case[2], case[3]
    if pipeline == "sparse" and not caps(spec).pipelineable:
        for rank, r in enumerate(results[repr(case)][:case[1]]):
            assert r[0] == "fail" and "cannot run under TrainPipelineSparseDist" in r[1], f"rank {rank}: {r}"
        return
    for rank, (got, loop, pipelined) in enumerate(_ranks(results, case)):
        assert got == pytest.approx(loop, abs=1e-6), f"rank {rank}: pipeline {got} vs loop {loop}"
        if pipeline == "sparse":
            tables = [n for n in pipelined if not n.startswith("postproc:")]
            if caps(spec).pipelined:
                assert tables, f"rank {rank}: {spec_id(spec)}'s tables were not pipelined"
                if spec[0] != "full":  # the stateless remap runs in the pipeline's input stage
                    assert any(n.endswith(".remap") for n in pipelined), pipelined
            else:  # a remap with state runs in forward, never a batch ahead
                assert pipelined == [], f"rank {rank}: {spec_id(spec)} must not be pipelined: {pipelined}"


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("dcp", "legacy")], ids=case_id)
def test_dcp_save_load_into_a_fresh_sharded_model(results, case):
    for rank, (before, after) in enumerate(_ranks(results, case)):
        assert before > 1e-3, f"rank {rank}: the fresh model already matched (seed not different?)"
        assert after <= 1e-6, f"rank {rank}: outputs after DCP load differ by {after}"


REFUSALS = {
    "multi-rank": "cannot run on 2 ranks",
    "qr-mult-ebc-sharder": "no EmbeddingCollectionSharder",
}


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "refusal"], ids=case_id)
def test_unsupported_sharding_is_refused_on_every_rank(results, case):
    what = case[2]
    want = REFUSALS["multi-rank" if what.endswith("multi-rank") else what]
    for rank, msg in enumerate(_ranks(results, case)):
        assert want in msg and "RuntimeError" in msg, f"rank {rank}: {msg}"


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=case_id)
def test_full_cross_product(slow_results, case):
    if case[0] == "dmp":
        check_dmp(slow_results, case)
    else:
        for rank, r in enumerate(_ranks(slow_results, case)):
            if case[0] == "pipeline":
                got, loop, _ = r
                assert got == pytest.approx(loop, abs=1e-6), f"rank {rank}"
