"""Sharding and offload through TorchRec's planner and DistributedModelParallel."""

from embtables.sharding.config import ShardingConfig
from embtables.sharding.dmp import DistContext, init_distributed, shard_model

__all__ = ["DistContext", "ShardingConfig", "init_distributed", "shard_model"]
