"""The YAML `sharding:` block."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ShardingTypeName = Literal["table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"]
ALL_SHARDING_TYPES: tuple[str, ...] = (
    "table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")


class ShardingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    world_size: int = Field(1, ge=1, description="processes (GPUs) to plan for; `--nproc` sets it")
    local_world_size: int | None = Field(
        None, ge=1,
        description="processes per machine (default: world_size on CPU, min(world_size, 8) on CUDA)"
    )
    device: Literal["cpu", "cuda"] = "cpu"
    hbm_per_device: str | None = Field(
        None, description="per-GPU memory budget, e.g. '80GiB' (ignored on CPU)")
    host_memory: str | None = Field(
        None, description="host (DDR) memory per machine, e.g. '1TiB'; split evenly over its processes"
    )
    sharding_types: list[ShardingTypeName] | None = Field(
        None, description="sharding types the planner may use (default: all that the module kind supports)"
    )
    per_table: dict[str, ShardingTypeName] = Field(
        default_factory=dict, description="force a type per table (table name or one of its feature names)"
    )
    offload: Literal["none", "uvm", "uvm_caching"] = Field(
        "none",
        description="GPU only: keep tables in host memory (uvm) or there with an HBM cache (uvm_caching)"
    )
    cache_load_factor: float = Field(0.2, gt=0, le=1, description="uvm_caching: HBM cache rows / table rows")
    storage_reserve: float = Field(
        0.15, ge=0, lt=1,
        description="fraction of each device's memory kept back for dense parts and activations"
    )
    batch_size_per_rank: int | None = Field(
        None, ge=1, description="batch size the planner's estimators assume (default: TorchRec's 512)"
    )
    timeout_s: int = Field(
        300, ge=5, description="collective timeout: a failed rank ends every rank within it")
