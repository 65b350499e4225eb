"""Process group set-up, planning from the `sharding:` block, DMP wrapping.

Every run, even a single process, goes through TorchRec's planner and
DistributedModelParallel: FBGEMM's fused kernels with in-backward optimizers are
2-3x faster on CPU than an unsharded EmbeddingBagCollection with a dense optimizer,
and one code path serves 1 to N processes.

What the planner gets (see docs/readme/sharding.md):
- a ``Topology`` from ``TopologyFactory`` (world size, device, per-rank HBM/DDR caps),
- ``ParameterConstraints`` per table (allowed sharding types, compute kernel chosen by
  ``offload``, ``CacheParams`` for uvm_caching, one pooling factor per feature),
- TorchRec's ``FixedPercentageStorageReservation`` and its default estimators
  (``EmbeddingStorageEstimator``, ``EmbeddingPerfEstimator``).
"""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import (
    KernelConfig,
    ParameterConstraints,
    PlannerError,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import CacheParams, ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.mc_modules import ManagedCollisionCollection

from embtables.embeddings.base import EmbeddingMethod, sharding_types_for
from embtables.embeddings.budget import parse_bytes
from embtables.sharding.config import ALL_SHARDING_TYPES, ShardingConfig

logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
# Single-host TWRW: without it TorchRec guesses the pod size and warns.
os.environ.setdefault("TORCHREC_RESOLVED_POD_SIZE", "1")


def _not_local_world_size_guess(record: logging.LogRecord) -> bool:
    # TorchRec's managed-collision module warns on the root logger when a single process
    # has no LOCAL_WORLD_SIZE; setting the variable instead would leak into later planning.
    return "Could not determine LOCAL_WORLD_SIZE" not in record.getMessage()


logging.getLogger().addFilter(_not_local_world_size_guess)


class ShardingError(ValueError):
    """A table cannot be sharded the way the `sharding:` block asks; raised before planning."""


class PlanDoesNotFit(ShardingError):
    """The tables do not fit the memory budget (TorchRec's planner found no plan)."""


class _DropRootNoise(logging.Filter):
    # TorchRec logs this on the root logger for every data-parallel/unsharded table.
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Sharding spec not found")


logging.getLogger().addFilter(_DropRootNoise())


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
    """Join torchrun's / `launch()`'s group if launched by it, else make a one-process group.

    ``timeout_s`` bounds every collective: a rank that dies makes the others fail
    within it instead of hanging for TorchRec's default 30 minutes.
    """
    dev = torch.device(device)
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), dev, owns_group=False)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(dev)
        dist.init_process_group(backend, timeout=timeout)
    else:
        # A file store needs no free port, so concurrent single-process runs never clash.
        fd, path = tempfile.mkstemp(prefix="embtables-pg-")
        os.close(fd)
        os.unlink(path)
        dist.init_process_group(backend, init_method=f"file://{path}", rank=0, world_size=1, timeout=timeout)
    return DistContext(dist.get_rank(), dist.get_world_size(), dev, owns_group=True)


# ---- sharders ---------------------------------------------------------------------------


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


# ---- what is in the model -----------------------------------------------------------------


@dataclass(frozen=True)
class TableInfo:
    name: str
    kind: str  # "ebc" (pooled) or "ec" (sequence)
    rows: int
    dim: int
    features: tuple[str, ...]
    bytes_per_value: int
    module_path: str


def torchrec_tables(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))]


def table_infos(model: nn.Module) -> list[TableInfo]:
    out = []
    for path, coll in model.named_modules():
        if isinstance(coll, EmbeddingBagCollection):
            kind, configs = "ebc", coll.embedding_bag_configs()
        elif isinstance(coll, EmbeddingCollection):
            kind, configs = "ec", coll.embedding_configs()
        else:
            continue
        for c in configs:
            nbytes = 2 if "16" in c.data_type.name else 4
            out.append(TableInfo(c.name, kind, c.num_embeddings, c.embedding_dim, tuple(c.feature_names),
                                 nbytes, path))
    return out


def supported_types(kind: str, device_type: str) -> list[str]:
    """Sharding types that run correctly for a module kind (TORCHREC-NOTES.md; EC: no
    table_row_wise, and data_parallel pools wrongly on CPU)."""
    types = list(sharding_types_for(kind, device_type))
    assert set(types) <= set(ALL_SHARDING_TYPES)
    return types


def _forced_type(cfg: ShardingConfig, t: TableInfo) -> tuple[str, str] | None:
    for key in (t.name, *t.features):
        if key in cfg.per_table:
            return key, cfg.per_table[key]
    return None


def allowed_types(model: nn.Module, cfg: ShardingConfig, world_size: int,
                  device_type: str) -> dict[str, list[str]]:
    """Per table, the sharding types the planner may choose. Raises ShardingError,
    naming the config key, for anything that would otherwise fail inside TorchRec."""
    tables = table_infos(model)
    if not tables:
        raise ShardingError("the model holds no TorchRec EmbeddingBagCollection/EmbeddingCollection to shard")
    if world_size > 1 and any(isinstance(m, ManagedCollisionCollection) for m in model.modules()):
        # The managed-collision state lives in the remap, outside the tables: replicated,
        # each rank would admit different ids and DDP would overwrite them with rank 0's.
        raise ShardingError(
            f"embedding.method=mch cannot run on {world_size} ranks: its managed-collision id map is "
            "per-process state outside the TorchRec tables; use sharding.world_size=1 (--nproc 1)"
        )
    known = {t.name for t in tables} | {f for t in tables for f in t.features}
    unknown = sorted(set(cfg.per_table) - known)
    if unknown:
        raise ShardingError(
            f"sharding.per_table: no table or feature named {unknown}; "
            f"tables: {', '.join(t.name for t in tables)}"
        )
    for path in {t.module_path for t in tables if t.kind == "ec"}:
        dims = {t.dim for t in tables if t.module_path == path}
        if len(dims) > 1:
            raise ShardingError(
                f"EmbeddingCollection {path!r} has tables of widths {sorted(dims)}: TorchRec shards an "
                "EmbeddingCollection only when all its tables have one width"
            )
    out: dict[str, list[str]] = {}
    for t in tables:
        ok = supported_types(t.kind, device_type)
        if t.rows < world_size:
            # Row shards would be empty on some ranks.
            ok = [s for s in ok if s not in ("row_wise", "table_row_wise")]
        forced = _forced_type(cfg, t)
        if forced:
            key, stype = forced
            if stype not in ok:
                why = (
                    f"it has {t.rows} rows, fewer than the {world_size} ranks"
                    if t.rows < world_size and stype in ("row_wise", "table_row_wise")
                    else f"a {'sequence (EmbeddingCollection)' if t.kind == 'ec' else 'pooled'} table on "
                    f"{device_type} supports only {', '.join(ok)}"
                )
                raise ShardingError(f"sharding.per_table.{key}: table {t.name!r} cannot be {stype}: {why}")
            out[t.name] = [stype]
            continue
        # data_parallel only when asked for: its tables skip the fused embedding optimizer
        # and train with the dense one (TORCHREC-NOTES), a different optimizer than configured.
        wanted = list(cfg.sharding_types) if cfg.sharding_types else [s for s in ok if s != "data_parallel"]
        types = [s for s in wanted if s in ok]
        if not types:
            raise ShardingError(
                f"sharding.sharding_types: table {t.name!r} cannot be {' or '.join(wanted)}: a "
                f"{'sequence (EmbeddingCollection)' if t.kind == 'ec' else 'pooled'} table of {t.rows} "
                f"rows on "
                f"{world_size} {device_type} rank(s) supports only {', '.join(ok)}"
            )
        out[t.name] = types
    return out


def compute_kernel(cfg: ShardingConfig, device_type: str) -> str:
    if device_type == "cpu" or cfg.offload == "none":
        return EmbeddingComputeKernel.FUSED.value
    if cfg.offload == "uvm":
        return EmbeddingComputeKernel.FUSED_UVM.value
    return EmbeddingComputeKernel.FUSED_UVM_CACHING.value


def build_constraints(
    model: nn.Module, cfg: ShardingConfig, world_size: int, device_type: str
) -> dict[str, ParameterConstraints]:
    if device_type == "cpu" and cfg.offload != "none":
        # TORCHREC-NOTES: forced uvm kernels on CPU silently run as plain host `fused`.
        warnings.warn(f"sharding.offload={cfg.offload} has no effect on CPU: "
                      "tables are in host memory already",
                      stacklevel=2)
    kernel = compute_kernel(cfg, device_type)
    infos = {t.name: t for t in table_infos(model)}
    out: dict[str, ParameterConstraints] = {}
    for name, types in allowed_types(model, cfg, world_size, device_type).items():
        kernels = [kernel]
        if "data_parallel" in types:
            kernels.append(EmbeddingComputeKernel.DENSE.value)  # the only kernel data_parallel has
        out[name] = ParameterConstraints(
            sharding_types=types,
            compute_kernels=kernels,
            pooling_factors=[1.0] * len(infos[name].features),
            cache_params=(CacheParams(load_factor=cfg.cache_load_factor) if kernel.endswith("caching")
                          else None),
        )
    return out


def local_world_size(cfg: ShardingConfig, world_size: int, device_type: str) -> int:
    if cfg.local_world_size:
        return min(cfg.local_world_size, world_size)
    if "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    return world_size if device_type == "cpu" else min(world_size, 8)


def build_topology(cfg: ShardingConfig, world_size: int, device_type: str) -> Topology:
    """Per-rank caps: ``hbm_per_device`` as is, ``host_memory`` (per machine) split
    over the machine's processes. On CPU TorchRec's planner budgets with ddr_cap only."""
    lws = local_world_size(cfg, world_size, device_type)
    ddr = parse_bytes(cfg.host_memory) // lws if cfg.host_memory else None
    hbm = parse_bytes(cfg.hbm_per_device) if cfg.hbm_per_device and device_type == "cuda" else None
    return TopologyFactory.create_topology(
        TrainerConfig(world_size=world_size, local_world_size=lws, hbm_cap_bytes=hbm, ddr_cap_bytes=ddr),
        kernel_config=KernelConfig(compute_device=device_type),
    )


def make_planner(model: nn.Module, cfg: ShardingConfig, world_size: int,
                 device_type: str) -> EmbeddingShardingPlanner:
    return EmbeddingShardingPlanner(
        topology=build_topology(cfg, world_size, device_type),
        batch_size=cfg.batch_size_per_rank,
        constraints=build_constraints(model, cfg, world_size, device_type),
        # Predictable budgets, and no HeuristicalStorageReservation warnings on CPU.
        storage_reservation=FixedPercentageStorageReservation(cfg.storage_reserve),
        debug=False,
    )


def plan_model(model: nn.Module, cfg: ShardingConfig, ctx: DistContext) -> ShardingPlan:
    """Plan on rank 0 and broadcast the plan *or rank 0's error*, so that every rank
    raises the same message at once (TorchRec's ``collective_plan`` leaves the other
    ranks waiting for the process-group timeout when rank 0 fails)."""
    result: list[object] = [None]
    if ctx.rank == 0:
        try:
            planner = make_planner(model, cfg, ctx.world_size, ctx.device.type)
            result[0] = planner.plan(model, sharders())
        except ShardingError as e:
            result[0] = e
        except PlannerError as e:
            result[0] = PlanDoesNotFit(
                f"sharding: no plan fits the memory budget on {ctx.world_size} rank(s) "
                f"(`embtables plan CONFIG` says what would fit): {str(e).splitlines()[0]}"
            )
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            result[0] = RuntimeError(f"planning failed on rank 0: {type(e).__name__}: {e}")
    if ctx.world_size > 1:
        dist.broadcast_object_list(result, src=0)
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]  # type: ignore[return-value]


def shard_model(model: nn.Module, cfg: ShardingConfig, ctx: DistContext) -> DistributedModelParallel:
    """Plan with TorchRec's planner and wrap in DMP, keeping rank 0's initial weights.

    The embedding optimizer must already be attached in backward
    (`torch.distributed.optim._apply_optimizer_in_backward`) so DMP fuses it (and the
    planner counts its state). Tables planned ``data_parallel`` ignore that optimizer:
    give them to the dense optimizer (``in_backward_optimizer_filter``).
    """
    # A table-free embedding method (``dhe``: hashes -> MLP) leaves nothing to plan: DMP
    # then only wraps the dense parameters in DDP.
    plan = plan_model(model, cfg, ctx) if table_infos(model) else ShardingPlan({})
    # DMP does not copy CPU/meta weights into the shards: keep them and load them back,
    # taken from rank 0 so that every rank starts from the same tables whatever its seed.
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if ctx.world_size > 1:
        for v in initial.values():
            if not v.is_meta:
                moved = v.to(ctx.device)  # nccl needs device tensors
                dist.broadcast(moved, src=0)
                v.copy_(moved)
    key_orders = _pooled_key_orders(model)
    dmp = DistributedModelParallel(model, device=ctx.device, plan=plan, sharders=sharders())
    _keep_key_order(dmp, key_orders)
    _, unexpected = dmp.load_state_dict(initial, strict=False)
    if unexpected:
        raise RuntimeError(f"internal: weights not restored after sharding: {unexpected[:5]}")
    return dmp


# ---- output key order ----------------------------------------------------------------------


def _pooled_key_orders(model: nn.Module) -> dict[str, list[str]]:
    """Output keys of every plain EmbeddingBagCollection, in its own order. The tables of
    an embtables method are skipped: the method selects its lookups by key itself
    (``EmbeddingMethod.pooled_values``), so a user's own stock DMP gets the same result."""
    inside = {f"{p}.tables" if p else "tables" for p, m in model.named_modules()
              if isinstance(m, EmbeddingMethod)}
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, EmbeddingBagCollection) and path not in inside:
            configs = m.embedding_bag_configs()
            names = [f for c in configs for f in c.feature_names]
            dup = {f for f in names if names.count(f) > 1}
            out[path] = [f"{f}@{c.name}" if f in dup else f for c in configs for f in c.feature_names]
    return out


def _keep_key_order(dmp: DistributedModelParallel, key_orders: dict[str, list[str]]) -> None:
    """A sharded EBC returns its KeyedTensor grouped by sharding (table_wise on 2 ranks:
    f0, f2, f1), while methods and models read ``.values()`` columns in the unsharded
    order. A forward hook permutes the columns back, once per batch (one index_select)."""
    root = dmp.module
    for path, expected in key_orders.items():
        sub = root.get_submodule(path) if path else root
        if isinstance(sub, EmbeddingBagCollection):
            continue  # not sharded (nothing to reorder)
        sub.register_forward_hook(_reorder_hook(expected))


def _reorder_hook(expected: list[str]):
    cache: dict[tuple[str, ...], tuple[torch.Tensor, list[int]]] = {}

    def hook(module: nn.Module, inputs, out):
        from torchrec.sparse.jagged_tensor import KeyedTensor

        kt = out.wait() if hasattr(out, "wait") else out
        keys = tuple(kt.keys())
        if list(keys) == expected:
            return kt
        if keys not in cache:
            lpk = dict(zip(keys, kt.length_per_key(), strict=True))
            starts, c = {}, 0
            for k in keys:
                starts[k] = c
                c += lpk[k]
            idx = torch.cat([torch.arange(starts[k], starts[k] + lpk[k]) for k in expected])
            cache[keys] = (idx, [lpk[k] for k in expected])
        idx, lengths = cache[keys]
        values = kt.values()
        idx = idx.to(values.device)
        return KeyedTensor(keys=expected, length_per_key=lengths, values=values.index_select(1, idx),
                           key_dim=1)

    return hook
