"""Sharded checkpoints at world size 1: save mid-training, load into a freshly built and
sharded model (different init), continue: equal to an uninterrupted run."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
from sharding_testing import (
    attach_table_optimizer,
    dense_optimizer,
    gather_full,
    make_batch,
    tiny_dlrm,
    train_step,
)

from embtables.sharding import ShardingConfig, init_distributed, shard_model
from embtables.sharding.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

STEPS, SPLIT, BATCH = 6, 3, 32


@pytest.fixture(scope="module")
def ctx():
    torch.set_num_threads(1)
    c = init_distributed("cpu", timeout_s=60)
    yield c
    if c.owns_group:
        dist.destroy_process_group()


def _fresh(ctx, seed: int, cfg: ShardingConfig, table_opt: str):
    model = tiny_dlrm(seed=seed)
    attach_table_optimizer(model, table_opt)
    dmp = shard_model(model, cfg, ctx)
    return dmp, dense_optimizer(dmp)


@pytest.mark.parametrize(
    ("table_opt", "sharding_type"), [("rowwise_adagrad", "table_wise"), ("adagrad", "row_wise")]
)
def test_resume_equals_uninterrupted(ctx, tmp_path, table_opt, sharding_type):
    cfg = ShardingConfig(sharding_types=[sharding_type])
    dmp, opt = _fresh(ctx, 0, cfg, table_opt)
    ref_losses = [train_step(dmp, opt, make_batch(s, BATCH)) for s in range(STEPS)]
    ref_state = gather_full(dmp)

    dmp, opt = _fresh(ctx, 0, cfg, table_opt)
    losses = [train_step(dmp, opt, make_batch(s, BATCH)) for s in range(SPLIT)]
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    extra = {"step": SPLIT, "torch_rng": torch.get_rng_state(), "py_rng": random.getstate(),
             "np_rng": np.random.get_state()}
    save_checkpoint(tmp_path / "ck", dmp, {"embedding": dmp.fused_optimizer, "dense": opt}, extra)
    expect_draw = torch.rand(3)

    # Different seed: everything must come from the checkpoint.
    dmp2, opt2 = _fresh(ctx, 123, cfg, table_opt)
    got = load_checkpoint(tmp_path / "ck", dmp2, {"embedding": dmp2.fused_optimizer, "dense": opt2})
    assert got["step"] == SPLIT
    torch.set_rng_state(got["torch_rng"])
    assert torch.equal(torch.rand(3), expect_draw)
    losses += [train_step(dmp2, opt2, make_batch(s, BATCH)) for s in range(SPLIT, STEPS)]

    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-6)
    state = gather_full(dmp2)
    assert state.keys() == ref_state.keys()
    for k in ref_state:
        torch.testing.assert_close(state[k], ref_state[k], rtol=0, atol=1e-6, msg=k)
    # The optimizer state really came back (a step without it would differ).
    assert any(t.abs().sum() > 0 for t in _fused_state(dmp2))


def _fused_state(dmp):
    for per_param in dmp.fused_optimizer.state_dict()["state"].values():
        for v in per_param.values():
            if hasattr(v, "local_shards"):
                for s in v.local_shards():
                    yield s.tensor


def test_incomplete_checkpoint_is_a_clear_error(ctx, tmp_path):
    dmp, opt = _fresh(ctx, 0, ShardingConfig(), "rowwise_adagrad")
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="did not finish"):
        load_checkpoint(tmp_path / "half", dmp, {"embedding": dmp.fused_optimizer, "dense": opt})
    save_checkpoint(tmp_path / "ck", dmp, {"embedding": dmp.fused_optimizer, "dense": opt}, {"step": 0})
    with pytest.raises(CheckpointError, match="optimizers do not match"):
        load_checkpoint(tmp_path / "ck", dmp, {"embedding": dmp.fused_optimizer})
