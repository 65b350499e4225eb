"""Planning from the `sharding:` block: CUDA topologies on `meta` (no GPU), errors before
planning, and the planner's memory estimate against the measured sharded tables."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from sharding_testing import attach_table_optimizer, tiny_dlrm

from embtables.embeddings import FeatureSpec
from embtables.experiments.planning import plan_config
from embtables.sharding import ShardingConfig, init_distributed, shard_model
from embtables.sharding.dmp import PlanDoesNotFit, ShardingError, build_constraints, build_topology
from embtables.sharding.plan import plan_model_offline

GiB = 2**30
CRITEO_WEIGHTS = 187_767_399 * 128 * 4  # sum of the 26 cardinalities x dim x fp32


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def test_topology_and_constraints_follow_the_block():
    cfg = ShardingConfig(world_size=16, device="cuda", hbm_per_device="80GiB", host_memory="1TiB",
                         offload="uvm_caching", cache_load_factor=0.3, per_table={"f1": "row_wise"},
                         sharding_types=["table_wise", "column_wise"])
    topo = build_topology(cfg, 16, "cuda")
    assert topo.world_size == 16 and topo.compute_device == "cuda" and topo.local_world_size == 8
    assert topo.devices[0].storage.hbm == 80 * GiB
    assert topo.devices[0].storage.ddr == 2**40 // 8  # host memory per machine over its 8 GPUs
    model = tiny_dlrm(features=[FeatureSpec("f0", 100), FeatureSpec("f1", 100)])
    cons = build_constraints(model, cfg, 16, "cuda")
    assert cons["t_f1"].sharding_types == ["row_wise"]  # forced by feature name
    assert cons["t_f0"].sharding_types == ["table_wise", "column_wise"]
    assert cons["t_f0"].compute_kernels == ["fused_uvm_caching"]
    assert cons["t_f0"].cache_params.load_factor == 0.3


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"per_table": {"nope": "row_wise"}}, "sharding.per_table: no table or feature named ['nope']"),
        ({"per_table": {"t_f0": "row_wise"}, "world_size": 64}, "fewer than the 64 ranks"),
    ],
)
def test_impossible_requests_fail_before_planning(block, message):
    cfg = ShardingConfig(**block)
    model = tiny_dlrm(features=[FeatureSpec("f0", 10), FeatureSpec("f1", 100)])
    with pytest.raises(ShardingError) as info:
        build_constraints(model, cfg, cfg.world_size, "cpu")
    assert message in str(info.value)


def test_criteo_terabyte_on_8_gpus_fits_in_hbm():
    rep = plan_config("criteo-terabyte", world_size=8)
    assert len(rep.tables) == 26 and rep.device == "cuda"
    assert rep.weights_bytes == CRITEO_WEIGHTS
    assert {t.compute_kernel for t in rep.tables} == {"fused"}
    assert max(rep.rank_hbm) <= 80 * GiB * 0.85
    # Every shard was placed: the estimate covers at least weights + rowwise-Adagrad state.
    assert sum(rep.rank_hbm) >= rep.weights_bytes + rep.optimizer_bytes


def test_criteo_terabyte_on_1_gpu_says_what_would_fit():
    with pytest.raises(PlanDoesNotFit) as info:
        plan_config("criteo-terabyte", world_size=1)
    msg = str(info.value)
    assert "largest table 't_C20'" in msg and "68.00 GiB" in msg
    assert "sharding.world_size=2" in msg
    assert "sharding.offload=uvm_caching" in msg
    assert "embedding.budget=" in msg


def test_criteo_terabyte_on_1_gpu_with_offload():
    rep = plan_config("criteo-terabyte", world_size=1, offload="uvm_caching")
    # data_parallel (kernel `dense`) is off unless sharding.sharding_types lists it.
    assert {t.compute_kernel for t in rep.tables} == {"fused_uvm_caching"}
    assert rep.rank_host[0] >= rep.weights_bytes  # the tables live in host memory
    assert rep.rank_hbm[0] < 0.5 * rep.weights_bytes  # only the cache (load factor 0.2) in HBM


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adagrad"])
def test_planner_estimate_matches_measured_sharded_tables(optimizer):
    feats = [FeatureSpec("a", 20000), FeatureSpec("b", 6000), FeatureSpec("c", 3000)]
    cfg = ShardingConfig(batch_size_per_rank=64)
    model = tiny_dlrm(features=feats, dim=16)
    attach_table_optimizer(model, optimizer)
    estimate = sum(plan_model_offline(model, cfg).rank_host)
    ctx = init_distributed("cpu", timeout_s=60)
    try:
        dmp = shard_model(model, cfg, ctx)
        measured = sum(s.tensor.numel() * s.tensor.element_size()
                       for v in dmp.state_dict().values() if hasattr(v, "local_shards")
                       for s in v.local_shards())
        for per_param in dmp.fused_optimizer.state_dict()["state"].values():
            for v in per_param.values():
                if hasattr(v, "local_shards"):
                    measured += sum(s.tensor.numel() * s.tensor.element_size() for s in v.local_shards())
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()
    expected_weights = (20000 + 6000 + 3000) * 16 * 4
    assert measured > expected_weights  # optimizer state is in there
    # TorchRec's estimate = weights + optimizer state + small I/O buffers.
    assert measured <= estimate <= measured * 1.05


@pytest.mark.gpu
def test_cuda_shard_smoke():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ctx = init_distributed("cuda", timeout_s=60)
    try:
        model = tiny_dlrm()
        attach_table_optimizer(model)
        dmp = shard_model(model, ShardingConfig(device="cuda"), ctx)
        assert all(p.is_cuda for p in dmp.parameters())
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()
