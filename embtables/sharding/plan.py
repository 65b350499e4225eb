"""TorchRec's sharding plan for a module, offline, and what to change when it does not fit.

:func:`plan_model_offline` runs TorchRec's ``EmbeddingShardingPlanner.plan()`` on a model
(typically built on the ``meta`` device: no memory, no GPU, with its embedding optimizer
attached in backward so that the planner counts its state) for any world size / device /
memory in a :class:`ShardingConfig`. The per-shard memory is TorchRec's own
``EmbeddingStorageEstimator`` estimate (weights, optimizer state, input/output buffers),
as the planner used it. Planning a YAML config (``embtables plan``) is
``embtables.experiments.planning.plan_config``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch
from torchrec.distributed.planner.types import PlannerError

from embtables.embeddings.budget import format_bytes, parse_bytes
from embtables.sharding.config import ShardingConfig
from embtables.sharding.dmp import local_world_size, make_planner, sharders, table_infos

# Optimizer state per row, in fp32 values: (per row, per element).
_OPT_STATE = {"rowwise_adagrad": (1, 0), "adagrad": (0, 1), "adam": (0, 2), "sgd": (0, 0)}


@dataclass
class TablePlan:
    name: str
    rows: int
    dim: int
    sharding_type: str
    compute_kernel: str
    ranks: list[int]
    hbm_bytes: int
    host_bytes: int


@dataclass
class PlanReport:
    config: str
    world_size: int
    device: str
    offload: str
    hbm_per_rank: int | None
    host_per_rank: int | None
    reserve: float
    tables: list[TablePlan] = field(default_factory=list)
    rank_hbm: list[int] = field(default_factory=list)
    rank_host: list[int] = field(default_factory=list)
    weights_bytes: int = 0
    optimizer_bytes: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def plan_model_offline(model: torch.nn.Module, scfg: ShardingConfig, name: str = "model") -> PlanReport:
    dev = scfg.device
    planner = make_planner(model, scfg, scfg.world_size, dev)
    planner.plan(model, sharders())
    best = planner._best_plan  # the ShardingOptions behind the plan, with per-shard storage
    infos = {t.name: t for t in table_infos(model)}
    topo = planner._topology
    rep = PlanReport(
        config=name, world_size=scfg.world_size, device=dev,
        offload=scfg.offload if dev == "cuda" else "none",
        hbm_per_rank=topo.devices[0].storage.hbm if dev == "cuda" else None,
        host_per_rank=topo.devices[0].storage.ddr, reserve=scfg.storage_reserve,
        rank_hbm=[0] * scfg.world_size, rank_host=[0] * scfg.world_size,
    )
    order = list(infos)
    for opt in sorted(best or [], key=lambda o: order.index(o.name)):
        info = infos[opt.name]
        hbm = sum(s.storage.hbm for s in opt.shards)
        host = sum(s.storage.ddr for s in opt.shards)
        for s in opt.shards:
            rep.rank_hbm[s.rank] += s.storage.hbm
            rep.rank_host[s.rank] += s.storage.ddr
        ranks = sorted({s.rank for s in opt.shards})
        if opt.sharding_type == "data_parallel":
            ranks = list(range(scfg.world_size))
        rep.tables.append(TablePlan(opt.name, info.rows, info.dim, opt.sharding_type, opt.compute_kernel,
                                    ranks, hbm, host))
        rep.weights_bytes += info.rows * info.dim * info.bytes_per_value
    rep.optimizer_bytes = _optimizer_bytes(model)
    return rep


def _optimizer_bytes(model: torch.nn.Module) -> int:
    total = 0
    for t in table_infos(model):
        name = _optimizer_name(model)
        per_row, per_elem = _OPT_STATE.get(name, (0, 0))
        total += t.rows * (per_row + per_elem * t.dim) * 4
    return total


def _optimizer_name(model: torch.nn.Module) -> str:
    for p in model.parameters():
        for o in getattr(p, "_in_backward_optimizers", []):
            cls = type(o).__name__.lower()
            return {"rowwiseadagrad": "rowwise_adagrad"}.get(cls, cls)
    return "sgd"


# ---- when it does not fit -------------------------------------------------------------------


def _fits(model, scfg) -> bool:
    try:
        make_planner(model, scfg, scfg.world_size, scfg.device).plan(model, sharders())
        return True
    except PlannerError:
        return False


def explain_does_not_fit(model, scfg: ShardingConfig, err: PlannerError, method: str) -> str:
    """The planner's refusal as the memory it needed and the smallest changes that fit
    (more ranks, offload, a smaller ``embedding.budget``); ``method`` is the embedding
    method, for the hint."""
    tables = table_infos(model)
    opt = _optimizer_name(model)
    per_row, per_elem = _OPT_STATE.get(opt, (0, 0))

    def need(t) -> int:
        return t.rows * t.dim * t.bytes_per_value + t.rows * (per_row + per_elem * t.dim) * 4

    gpu_resident = scfg.device == "cuda" and scfg.offload == "none"
    what = "HBM" if gpu_resident else "host memory"
    if gpu_resident:
        cap = parse_bytes(scfg.hbm_per_device) if scfg.hbm_per_device else None
    else:
        cap = parse_bytes(scfg.host_memory) // _lws(scfg) if scfg.host_memory else None
    if cap is None:
        cap = make_planner(model, scfg, 1, scfg.device)._topology.devices[0].storage.ddr
    usable = int(cap * (1 - scfg.storage_reserve))
    total = sum(need(t) for t in tables)
    big = max(tables, key=need)
    lines = [
        f"the embedding tables do not fit: {len(tables)} tables need {format_bytes(total)} "
        f"(weights + {opt} state), {what} budget is {format_bytes(usable)} per rank "
        f"({format_bytes(cap)} minus the {scfg.storage_reserve:.0%} reserve) x {scfg.world_size} rank(s) "
        f"= {format_bytes(usable * scfg.world_size)}; largest table {big.name!r} ({big.rows:,} x {big.dim}) "
        f"needs {format_bytes(need(big))}.",
        "Smallest changes that fit:",
    ]
    # 1. more ranks (verified with the planner)
    w = max(scfg.world_size + 1, math.ceil(total / (usable * 0.9)))
    for _ in range(4):
        trial = scfg.model_copy(update={"world_size": w})
        if w <= 4096 and _fits(model, trial):
            lines.append(f"  - more ranks: sharding.world_size={w} (--world-size {w})")
            break
        w = math.ceil(w * 1.5)
    # 2. offload to host memory (GPU only)
    if gpu_resident:
        trial = scfg.model_copy(update={"offload": "uvm_caching"})
        if _fits(model, trial):
            lines.append("  - offload: sharding.offload=uvm_caching "
                         f"(cache_load_factor={scfg.cache_load_factor}) "
                         f"keeps tables in host memory with an HBM cache")
        else:
            lines.append("  - offload: sharding.offload=uvm_caching does not fit either "
                         "(host memory too small)")
    # 3. a smaller embedding budget
    fraction = usable * scfg.world_size * 0.85 / max(total, 1)
    weights = sum(t.rows * t.dim * t.bytes_per_value for t in tables)
    budget = int(weights * fraction)
    if fraction < 1:
        hint = "" if method != "full" else " with a compressing method (embedding.method=hash, qr or unified)"
        lines.append(f"  - smaller tables: embedding.budget={budget} (~{format_bytes(budget)}, "
                     f"{fraction:.3f} of the current tables){hint}")
    lines.append(f"(TorchRec planner: {str(err).splitlines()[0][:200]})")
    return "\n".join(lines)


def _lws(scfg: ShardingConfig) -> int:
    return local_world_size(scfg, scfg.world_size, scfg.device)


# ---- printing ------------------------------------------------------------------------------


def format_report(rep: PlanReport) -> str:
    gib = format_bytes
    head = (f"plan for {rep.config}: world_size={rep.world_size} device={rep.device} offload={rep.offload} "
            f"reserve={rep.reserve:.0%}")
    caps = []
    if rep.hbm_per_rank is not None:
        caps.append(f"HBM/rank {gib(rep.hbm_per_rank)}")
    if rep.host_per_rank is not None:
        caps.append(f"host/rank {gib(rep.host_per_rank)}")
    out = [head, "budget: " + ", ".join(caps)]
    place = {"fused": "HBM" if rep.device == "cuda" else "host", "fused_uvm": "host (UVM)",
             "fused_uvm_caching": "host + HBM cache", "dense": "HBM" if rep.device == "cuda" else "host"}
    rows = [("table", "rows", "dim", "sharding", "kernel (where)", "ranks", "HBM", "host")]
    for t in rep.tables:
        rk = _ranks(t.ranks)
        rows.append((t.name, f"{t.rows:,}", str(t.dim), t.sharding_type,
                     f"{t.compute_kernel} ({place.get(t.compute_kernel, '?')})", rk, gib(t.hbm_bytes),
                     gib(t.host_bytes)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        cells = enumerate(zip(r, widths, strict=True))
        out.append("  ".join(c.ljust(w) if i in (0, 3, 4, 5) else c.rjust(w) for i, (c, w) in cells))
    out.append("per rank (TorchRec storage estimate: weights + optimizer state + I/O buffers):")
    for r in range(rep.world_size):
        if rep.world_size > 8 and 3 <= r < rep.world_size - 2:
            if r == 3:
                out.append("  ...")
            continue
        parts = []
        if rep.device == "cuda":
            parts.append(f"HBM {gib(rep.rank_hbm[r])} / {gib(rep.hbm_per_rank)}")
        parts.append(f"host {gib(rep.rank_host[r])} / {gib(rep.host_per_rank)}")
        out.append(f"  rank {r:>3}: " + ", ".join(parts))
    if rep.device == "cuda":
        share = max(rep.rank_hbm) / rep.hbm_per_rank
        out.append(f"  max HBM {gib(max(rep.rank_hbm))} on one rank, {share:.1%} "
                   f"of {gib(rep.hbm_per_rank)}")
    out.append(f"  max host {gib(max(rep.rank_host))} on one rank")
    out.append(f"total: weights {gib(rep.weights_bytes)} + optimizer state {gib(rep.optimizer_bytes)} = "
               f"{gib(rep.weights_bytes + rep.optimizer_bytes)}; estimated HBM {gib(sum(rep.rank_hbm))}, "
               f"host {gib(sum(rep.rank_host))} over {rep.world_size} rank(s)")
    return "\n".join(out)


def _ranks(ranks: list[int]) -> str:
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))
