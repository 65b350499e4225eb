"""Sharding and offload through TorchRec's planner and DistributedModelParallel.

Loaded lazily (PEP 562): a name is imported from its submodule on first use, so the
torch-free part (``sharding.config``) loads no torch or torchrec.
"""

import importlib

_EXPORTS = {
    "CheckpointError": "checkpoint", "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "ShardingConfig": "config",
    "DistContext": "dmp", "PlanDoesNotFit": "dmp", "ShardingError": "dmp", "init_distributed": "dmp",
    "shard_model": "dmp",
    "LaunchError": "launch", "launch": "launch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
