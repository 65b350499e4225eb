"""Process group set-up and DMP wrapping.

Every run, even a single process, goes through TorchRec's planner and
DistributedModelParallel: FBGEMM's fused kernels with in-backward optimizers are
2-3x faster on CPU than an unsharded EmbeddingBagCollection with a dense optimizer,
and one code path serves 1 to N processes.
"""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from embtables.embeddings.budget import parse_bytes
from embtables.sharding.config import ShardingConfig

logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "cpu", timeout_s: int = 300) -> DistContext:
    """Join torchrun's group if launched by it, else make a one-process group."""
    dev = torch.device(device)
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), dev, owns_group=False)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(dev)
    else:
        # A file store needs no free port, so concurrent single-process runs never clash.
        fd, path = tempfile.mkstemp(prefix="embtables-pg-")
        os.close(fd)
        os.unlink(path)
        dist.init_process_group(backend, init_method=f"file://{path}", rank=0, world_size=1, timeout=timeout)
    return DistContext(dist.get_rank(), dist.get_world_size(), dev, owns_group=True)


class CPUEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """TorchRec leaves row_wise/table_row_wise off on CPU although they run correctly
    there (TORCHREC-NOTES.md); switch them on."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        for extra in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value):
            if extra not in types:
                types.append(extra)
        return types


class CPUEmbeddingCollectionSharder(EmbeddingCollectionSharder):
    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        if compute_device_type == "cpu":
            # data_parallel EmbeddingCollection pools on CPU (fbgemm's dense kernel): wrong results.
            types = [t for t in types if t != ShardingType.DATA_PARALLEL.value]
        if ShardingType.ROW_WISE.value not in types:
            types.append(ShardingType.ROW_WISE.value)
        return types


def sharders() -> list:
    return [CPUEmbeddingBagCollectionSharder(), CPUEmbeddingCollectionSharder()]


def torchrec_tables(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))]


def constraints_for(model: nn.Module, cfg: ShardingConfig) -> dict[str, ParameterConstraints]:
    out: dict[str, ParameterConstraints] = {}
    for coll in torchrec_tables(model):
        configs = coll.embedding_bag_configs() if isinstance(coll, EmbeddingBagCollection) else coll.embedding_configs()
        for c in configs:
            types = [cfg.per_table[c.name]] if c.name in cfg.per_table else cfg.sharding_types
            out[c.name] = ParameterConstraints(
                sharding_types=list(types) if types else None,
                pooling_factors=[1.0] * len(c.feature_names),
            )
    return out


def shard_model(model: nn.Module, cfg: ShardingConfig, ctx: DistContext) -> DistributedModelParallel:
    """Plan with TorchRec's planner and wrap in DMP, keeping the model's initial weights.

    The embedding optimizer must already be attached in backward
    (`torch.distributed.optim._apply_optimizer_in_backward`) so DMP fuses it.
    """
    # DMP does not copy CPU/meta weights into the shards: keep them and load them back.
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ddr_cap = parse_bytes(cfg.host_memory) if cfg.host_memory else None
    hbm_cap = parse_bytes(cfg.hbm_per_device) if cfg.hbm_per_device else None
    topology = Topology(world_size=ctx.world_size, compute_device=ctx.device.type, hbm_cap=hbm_cap, ddr_cap=ddr_cap)
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=constraints_for(model, cfg),
        storage_reservation=FixedPercentageStorageReservation(0.15),
        debug=False,
    )
    shs = sharders()
    plan = planner.collective_plan(model, shs, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=ctx.device, plan=plan, sharders=shs)
    missing, unexpected = dmp.load_state_dict(initial, strict=False)
    if unexpected:
        raise RuntimeError(f"internal: weights not restored after sharding: {unexpected[:5]}")
    return dmp
