"""The YAML `sharding:` block."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ShardingTypeName = Literal["table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"]


class ShardingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    world_size: int = Field(1, ge=1, description="processes (GPUs) to plan for; `--nproc` sets it")
    device: Literal["cpu", "cuda"] = "cpu"
    hbm_per_device: str | None = Field(None, description="per-device memory budget, e.g. '80GiB' (GPUs)")
    host_memory: str | None = Field(None, description="host (DDR) memory per rank, e.g. '128GiB'")
    sharding_types: list[ShardingTypeName] | None = Field(
        None, description="sharding types the planner may use (default: all that the module kind supports)"
    )
    per_table: dict[str, ShardingTypeName] = Field(default_factory=dict, description="force a type per table")
    offload: Literal["none", "uvm", "uvm_caching"] = "none"
    cache_load_factor: float = Field(0.2, gt=0, le=1)
    timeout_s: int = Field(300, ge=5, description="collective timeout: a failed rank ends every rank within it")
