"""2 local ranks (gloo, loopback): the launcher's failure handling, global metrics over
unequal shards against sklearn, and 2-rank checkpoints (resume at 2, reshard into 1)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from sharding_testing import (
    attach_table_optimizer,
    dense_optimizer,
    make_batch,
    rank_predictions,
    shared_two_rank_run,
    tiny_dlrm,
    train_step,
)
from sklearn.metrics import log_loss, roc_auc_score

from embtables.sharding import ShardingConfig, init_distributed, shard_model
from embtables.sharding._fail_worker import fail_on_rank
from embtables.sharding.checkpoint import load_checkpoint
from embtables.sharding.launch import LaunchError, launch

STEPS, SPLIT, BATCH = 6, 3, 32
SIZES = [101, 37]


_CK: dict[str, str] = {}


def suite_args(tmp_path_factory) -> tuple:
    if "dir" not in _CK:
        _CK["dir"] = str(tmp_path_factory.mktemp("ck") / "ck2")
    return (_CK["dir"], SIZES, STEPS, SPLIT, BATCH, "row_wise")


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """One spawn of 2 ranks runs every 2-rank case, the matrix's included."""
    from test_sharding_matrix import ALL_CASES

    args = suite_args(tmp_path_factory)
    return Path(args[0]), shared_two_rank_run(ALL_CASES, args)["suite"]


def test_failing_rank_ends_every_rank_with_its_error():
    t0 = time.monotonic()
    want = "rank 1 of 2 failed: ValueError: deliberate failure on rank 1"
    with pytest.raises(LaunchError, match=want) as info:
        launch(fail_on_rank, 2, (1,), timeout_s=400)
    # Rank 0 sat in a barrier with a 600 s timeout: the launcher ended it long before
    # (seconds on an idle machine; the bound leaves room for imports on a busy one).
    assert time.monotonic() - t0 < 400
    assert info.value.rank == 1


def test_global_metrics_match_sklearn_on_unequal_shards(suite):
    sizes = SIZES
    per_rank = [r["metrics"] for r in suite[1]]
    assert per_rank[0] == per_rank[1]
    parts = [rank_predictions(r, n) for r, n in enumerate(sizes)]
    p = torch.cat([x[0] for x in parts]).double().numpy()
    y = torch.cat([x[1] for x in parts]).numpy()
    assert per_rank[0]["count"] == sum(sizes)
    assert per_rank[0]["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)  # torchmetrics: float32
    assert per_rank[0]["logloss"] == pytest.approx(log_loss(y, p), abs=1e-9)


def test_checkpoint_two_ranks_resume_and_reshard_into_one(suite):
    ck, res = suite[0], [r["resume"] for r in suite[1]]
    for ref, got, diff in res:
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
        assert diff < 1e-6
    ref_losses = res[0][0]

    # Reshard: the 2-rank row_wise checkpoint into 1 rank, planned table_wise. Training
    # on at 1 rank with the global batch follows the 2-rank run (sharded grads are
    # averaged over ranks, so 2 ranks x half batch == 1 rank x full batch).
    torch.set_num_threads(1)
    ctx = init_distributed("cpu", timeout_s=60)
    try:
        model = tiny_dlrm(seed=5)
        attach_table_optimizer(model)
        dmp = shard_model(model, ShardingConfig(sharding_types=["table_wise"]), ctx)
        opt = dense_optimizer(dmp)
        extra = load_checkpoint(ck, dmp, {"embedding": dmp.fused_optimizer, "dense": opt})
        assert extra["step"] == SPLIT
        losses = [train_step(dmp, opt, make_batch(s, BATCH)) for s in range(SPLIT, STEPS)]
        np.testing.assert_allclose(losses, ref_losses[SPLIT:], rtol=0, atol=1e-5)
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


@pytest.mark.slow
def test_quickstart_dist_two_processes_reach_the_one_process_auc(tmp_path):
    """`embtables run quickstart-dist --nproc 2` vs `--nproc 1` (minutes on 2 cores)."""
    from embtables.experiments.launch_run import launch_run

    data = Path("data/synth-criteo")
    if not (data / "schema.json").exists():
        pytest.skip("needs data/synth-criteo (`make data`)")
    aucs = []
    for nproc in (1, 2):
        run_dir = tmp_path / f"n{nproc}"
        launch_run("quickstart-dist", ["train.progress=false"], str(run_dir), None, nproc, timeout_s=1200)
        import json

        aucs.append(json.loads((run_dir / "summary.json").read_text())["auc"])
    assert abs(aucs[0] - aucs[1]) < 0.005, aucs


def test_two_ranks_evaluate_a_split_smaller_than_the_world(tmp_path):
    """A 1-row validation split and 2 ranks: rank 1 holds no row of it but must still join
    every sharded lookup; the metrics cover exactly the one row."""
    import json

    from embtables.datasets.synth import generate_synth
    from embtables.experiments.launch_run import launch_run

    data = tmp_path / "tiny"
    schema = generate_synth(data, 400, split=(0.99, 0.0025, 0.0075), progress=False, scale=0.001)
    assert schema.rows["valid"] == 1 and schema.rows["test"] == 3
    run_dir = tmp_path / "run"
    launch_run("quickstart", [f"data.path={data}", "train.progress=false", "train.batch_size=64",
                              "train.eval_every=0"], str(run_dir), None, 2, timeout_s=600)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r.get("final")][-1]
    assert final["valid_auc"] is None  # one row: one class, AUC undefined, not a crash
    assert summary["logloss"] is not None and np.isfinite(summary["logloss"])
