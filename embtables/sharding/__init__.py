"""Sharding and offload through TorchRec's planner and DistributedModelParallel."""

from embtables.sharding.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from embtables.sharding.config import ShardingConfig
from embtables.sharding.dmp import DistContext, PlanDoesNotFit, ShardingError, init_distributed, shard_model
from embtables.sharding.launch import LaunchError, launch

__all__ = [
    "CheckpointError", "DistContext", "LaunchError", "PlanDoesNotFit", "ShardingConfig", "ShardingError",
    "init_distributed", "launch", "load_checkpoint", "save_checkpoint", "shard_model",
]
