"""The conformance cases run in spawned process groups (tests/test_conformance_dist.py) and
the specs every conformance file enumerates: every registered method with its default
knobs plus the knob variants that change the tables' shape, on tiny tables."""

from __future__ import annotations

import copy
import logging
import os
import traceback

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from sharding_testing import MAX_BAG, NUM_DENSE, Probe, _probe_loss, make_batch, table_params
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
from torchrec.distributed.types import ShardingEnv
from torchrec.models.dlrm import DLRM as TorchRecDLRM
from torchrec.models.dlrm import DLRMTrain
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embtables.embeddings import FeatureSpec, build, list_methods
from embtables.sharding import ShardingConfig
from embtables.sharding.checkpoint import load_checkpoint, save_checkpoint
from embtables.sharding.dmp import init_distributed, shard_model, torchrec_tables
from embtables.sharding.dmp import sharders as our_sharders

# ---- conformance: every registered method in TorchRec's own stack ------------------------
# (tests/test_conformance_dist.py; one spawned 2-rank group runs every case)

CONF_FEATURES = [FeatureSpec("f0", 300), FeatureSpec("f1", 40), FeatureSpec("f2", 220)]
CONF_BUDGET = 0.3  # of `full`: every compressing method really compresses


def conformance_specs() -> list[tuple[str, dict]]:
    """Every registered method with its default knobs, plus the knob variants that change
    the tables' shape (qr add/concat/mult, unified with several tables and probes)."""
    specs: list[tuple[str, dict]] = []
    for name in list_methods():
        specs.append((name, {}))
        specs += [(name, knobs) for knobs in SHAPE_VARIANTS.get(name, [])]
    return specs


# Knob variants that change the tables' shape (a method not listed runs with its defaults).
SHAPE_VARIANTS: dict[str, list[dict]] = {
    "qr": [{"operation": "add"}, {"operation": "concat"}],
    "unified": [{"num_tables": 2, "probes": 2}],
}
# Knobs a method needs to build on the conformance features (mch: slots below the
# vocabulary, so that it compresses; optembed has no budget before its search; hybrid
# needs to be told where its hot ids come from).
BUILD_KNOBS: dict[str, dict] = {"mch": {"rows": 30}, "hybrid": {"frequency_ranked": True}}
NO_BUDGET = ("full", "mch", "optembed")


def spec_id(spec: tuple[str, dict]) -> str:
    name, knobs = spec
    return name + "".join(f"-{k}={v}" for k, v in sorted(knobs.items()))


def build_conf(spec: tuple[str, dict], sequence: bool = False, weighted: bool = False, seed: int = 0,
               init_scale: float = 1.0):
    name, knobs = spec
    budget = CONF_BUDGET if name not in NO_BUDGET else None
    knobs = {**BUILD_KNOBS.get(name, {}), **knobs}
    torch.manual_seed(seed)
    return build(CONF_FEATURES, method=name, dim=8, budget=budget, sequence=sequence, weighted=weighted,
                 init_scale=init_scale, **knobs)


def conf_batch(step: int, batch: int, rank: int = 0, world: int = 1, weighted: bool = False):
    _, kjt, labels = make_batch(step, batch, CONF_FEATURES, max_bag=MAX_BAG, rank=rank, world=world)
    if weighted:  # a function of the id, so a rank's slice has the weights of the global batch
        w = ((kjt.values() * 7919 + step) % 97 + 1).float() / 97
        kjt = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=w)
    return kjt, labels


def _stock_plan(model: nn.Module, world: int, pg, sharders_, forced: str | None):
    """TorchRec's planner on this group: its own choices, or one sharding type forced."""
    constraints = None
    if forced is not None:
        names = [c.name for m in torchrec_tables(model)
                 for c in (m.embedding_bag_configs() if hasattr(m, "embedding_bag_configs")
                           else m.embedding_configs())]
        # "mixed": the first table data_parallel, the others table_wise (what the planner
        # picked on its own for small tables): a sharded EBC then groups its output keys
        # by sharding type, not in table order.
        types = {n: ("data_parallel" if i == 0 else "table_wise") if forced == "mixed" else forced
                 for i, n in enumerate(names)}
        kernel = {"data_parallel": "dense"}
        constraints = {n: ParameterConstraints(sharding_types=[t], compute_kernels=[kernel.get(t, "fused")])
                       for n, t in types.items()}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"),
                                       constraints=constraints)
    return planner.collective_plan(model, sharders_, pg)


def _stock_dmp(model: nn.Module, pg, sharders_, forced: str | None):
    """A user's DMP: TorchRec's own DistributedModelParallel, weights loaded after."""
    world = dist_world(pg)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plan = _stock_plan(model, world, pg, sharders_, forced)
    env = ShardingEnv.from_process_group(pg)
    dmp = DistributedModelParallel(model, env=env, device=torch.device("cpu"), plan=plan, sharders=sharders_)
    dmp.load_state_dict(saved)
    return dmp


def dist_world(pg) -> int:
    return dist.get_world_size(pg)


def conf_dmp_case(pg, spec, sequence: bool, weighted: bool, forced: str | None, opt_name: str,
                  sharders_kind: str, batch: int = 8, lr: float = 0.5):
    """Stock DMP vs the unsharded module, same weights: (forward diff, weight diff after one
    step). ``sharders_kind``: "default" (TorchRec's) or "embtables" (RW/TWRW switched on)."""
    rank, world = dist.get_rank(pg), dist_world(pg)
    model = Probe(build_conf(spec, sequence, weighted))
    # Eval mode unless the remap has state (mch admits ids only in training): a training
    # forward may sample (optembed's supernet draws widths per sample), and a rank draws
    # for its slice, the reference for the global batch. Gradients and steps are the same.
    model.train(model.emb.stateful_remap)
    ref = copy.deepcopy(model)
    opt_cls = {"sgd": torch.optim.SGD, "rowwise_adagrad": RowWiseAdagrad}[opt_name]
    kw = {"lr": lr} if opt_name == "sgd" else {"lr": lr, "eps": 1e-8}
    _apply_optimizer_in_backward(opt_cls, table_params(model), dict(kw))
    sh = get_default_sharders() if sharders_kind == "default" else our_sharders()
    emb0 = model.emb
    bytes0, configs0 = emb0.memory_bytes(), emb0.table_configs()
    errors = _ErrorLines()
    logging.getLogger().addHandler(errors)
    try:
        dmp = _stock_dmp(model, pg, sh, forced)
        emb = dmp.module.emb
        same_configs = _cfg_rows(emb.table_configs()) == _cfg_rows(configs0)
        sizes = (bool(repr(emb)), emb.memory_bytes(), bytes0, same_configs)
    finally:
        logging.getLogger().removeHandler(errors)
    if errors.lines:
        sizes = (*sizes[:3], f"TorchRec logged errors: {errors.lines[:2]}")
    rest = list(in_backward_optimizer_filter(dmp.named_parameters(), include=False))
    dense = [torch.optim.SGD([p for n, p in rest if ".tables." not in n], lr=lr)]  # scale, a method's own
    if [p for n, p in rest if ".tables." in n]:  # data_parallel tables ignore the fused optimizer
        dense.append(opt_cls([p for n, p in rest if ".tables." in n], **kw))
    kjt_all, _ = conf_batch(0, batch, weighted=weighted)
    kjt, _ = conf_batch(0, batch, rank, world, weighted=weighted)
    per = batch // world
    table_ids = {id(p) for m in torchrec_tables(ref) for p in m.parameters()}
    # a method's own dense parameters
    others = [p for p in ref.parameters() if id(p) not in table_ids and p is not ref.scale]
    ref_tables = table_params(ref)
    # A table-free method (dhe) has only dense parameters: the SGD above trains them.
    ref_opts = [torch.optim.SGD([ref.scale, *others], lr=lr)]
    if ref_tables:
        ref_opts.append(opt_cls(ref_tables, **kw))
    # Same RNG stream for both forwards (mch re-initialises evicted rows, optembed's supernet
    # samples widths in training).
    torch.manual_seed(123)
    ref_out = ref(kjt_all)
    _probe_loss(ref_out, batch).backward()
    for o in ref_opts:
        o.step()
    torch.manual_seed(123)
    out = dmp(kjt)
    fwd = float((out - ref_out[rank * per:(rank + 1) * per]).abs().max())
    _probe_loss(out, per).backward()
    for o in dense:
        o.step()
    got, want = gather_full_pg(dmp, pg), ref.state_dict()
    step = max(float((got[k] - want[k]).abs().max()) for k in want)
    types = sorted({s.sharding_type for m in dmp.plan.plan.values() for s in m.values()})
    return fwd, step, types, sizes


def conf_tablefree_case(pg, spec, sequence: bool, wrapper: str, batch: int = 8):
    """A table-free method (``has_tables=False``: every parameter dense) wrapped by stock
    DistributedModelParallel (nothing to shard: DMP hands the whole model to DDP) or by
    plain DistributedDataParallel, each rank on its slice of the global batch, against the
    unsharded module on the whole batch: (max forward difference on this rank's rows, max
    gradient difference over every parameter after backward, the smallest of the reference's
    per-parameter largest gradients, the wrapper).
    DDP averages the ranks' gradients, so a per-rank mean loss gives the global-batch
    gradient exactly (up to float summation order)."""
    rank, world = dist.get_rank(pg), dist_world(pg)
    model = Probe(build_conf(spec, sequence)).eval()
    ref = copy.deepcopy(model)
    if wrapper == "dmp":
        wrapped = _stock_dmp(model, pg, get_default_sharders(), None)
        inner = wrapped.module
        kind = type(wrapped._dmp_wrapped_module).__name__
    else:
        wrapped = nn.parallel.DistributedDataParallel(model, process_group=pg)
        inner, kind = wrapped.module, "DistributedDataParallel"
    kjt_all, _ = conf_batch(0, batch)
    kjt, _ = conf_batch(0, batch, rank, world)
    per = batch // world
    ref_out = ref(kjt_all)
    _probe_loss(ref_out, batch).backward()
    out = wrapped(kjt)
    fwd = float((out - ref_out[rank * per:(rank + 1) * per]).abs().max())
    _probe_loss(out, per).backward()
    want = dict(ref.named_parameters())
    got = dict(inner.named_parameters())
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    grad = max(float((got[k].grad - want[k].grad).abs().max()) for k in want)
    scale = min(float(want[k].grad.abs().max()) for k in want)  # every parameter gets a gradient
    return fwd, grad, scale, kind


def _cfg_rows(configs) -> list[tuple]:
    return [(c.name, c.num_embeddings, c.embedding_dim, tuple(c.feature_names)) for c in configs]


class _ErrorLines(logging.Handler):
    """Collects ERROR records (TorchRec logged one per DMP when repr() of a method failed)."""
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage()[:200])


def gather_full_pg(dmp: nn.Module, pg) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in dmp.state_dict().items():
        if hasattr(v, "local_shards"):
            full = torch.zeros(v.size())
            for s in v.local_shards():
                idx = tuple(slice(o, o + n) for o, n in zip(s.metadata.shard_offsets, s.metadata.shard_sizes,
                                                            strict=True))
                full[idx] = s.tensor.detach()
            if dist_world(pg) > 1:
                dist.all_reduce(full, group=pg)
            v = full
        out[k] = v.detach().clone()
    return out


def conf_pipeline_case(pg, spec, pipeline: str, steps: int = 4, batch: int = 8):
    """TorchRec's DLRM trained ``steps`` steps through a train pipeline and through a plain
    loop from the same weights: (pipeline losses, loop losses, pipelined module names)."""
    rank, world = dist.get_rank(pg), dist_world(pg)

    def batches():
        out = []
        for s in range(steps + 1):
            g = torch.Generator().manual_seed(500 + s)
            dense = torch.randn(batch, NUM_DENSE, generator=g)
            _, kjt, labels = make_batch(s, batch * world, CONF_FEATURES, max_bag=MAX_BAG, rank=rank,
                                        world=world)
            out.append(Batch(dense_features=dense, sparse_features=kjt, labels=labels))
        return out

    def fresh():
        emb = build_conf(spec)
        torch.manual_seed(1)
        model = DLRMTrain(TorchRecDLRM(embedding_bag_collection=emb, dense_in_features=NUM_DENSE,
                                       dense_arch_layer_sizes=[8], over_arch_layer_sizes=[8, 1]))
        _apply_optimizer_in_backward(torch.optim.SGD, table_params(model), {"lr": 0.1})
        dmp = _stock_dmp(model, pg, get_default_sharders(), None)
        opt = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                    lambda params: torch.optim.SGD(params, lr=0.1))
        return dmp, opt

    data = batches()
    dmp, opt = fresh()
    loop = []
    for b in data[:steps]:
        opt.zero_grad()
        loss, _ = dmp(b)
        loss.backward()
        opt.step()
        loop.append(float(loss.detach()))
    dmp, opt = fresh()
    if pipeline == "base":
        pipe = TrainPipelineBase(dmp, opt, torch.device("cpu"))
    else:
        pipe = TrainPipelineSparseDist(dmp, opt, torch.device("cpu"), pipeline_postproc=True)
    it = iter(data[:steps])
    got = []
    for _ in range(steps):
        out = pipe.progress(it)
        got.append(float(out[0]))
    names = [type(m).__name__ for m in getattr(pipe, "_pipelined_modules", [])]
    names += [f"postproc:{p._fqn}" for p in getattr(pipe, "_pipelined_postprocs", [])]
    return got, loop, names


def conf_dcp_case(pg, spec, ck_dir: str, sequence: bool = False, batch: int = 8):
    """DCP save of a sharded (stock DMP) model, load into a fresh one (other seed):
    outputs equal. Returns the max output difference."""


    rank, world = dist.get_rank(pg), dist_world(pg)
    kjt, _ = conf_batch(1, batch, rank, world)
    a = _stock_dmp(Probe(build_conf(spec, sequence, seed=0)).eval(), pg, get_default_sharders(), None)
    want = a(kjt).detach()
    dcp.save(a.state_dict(), checkpoint_id=ck_dir, process_group=pg)
    b = _stock_dmp(Probe(build_conf(spec, sequence, seed=5)).eval(), pg, get_default_sharders(), None)
    before = float((b(kjt).detach() - want).abs().max())
    sd = b.state_dict()
    dcp.load(sd, checkpoint_id=ck_dir, process_group=pg)
    b.load_state_dict(sd)
    return before, float((b(kjt).detach() - want).abs().max())


def conf_refusal_case(pg, what: str):
    """A combination a method cannot support: the error message (or "no error")."""
    rank, world = dist.get_rank(pg), dist_world(pg)
    kjt, _ = conf_batch(0, 8, rank, world)
    try:
        if what.endswith("-multi-rank"):
            model = Probe(build_conf((what.removesuffix("-multi-rank"), {})))
            dmp = _stock_dmp(model, pg, get_default_sharders(), None)
        else:  # qr mult (an EmbeddingCollection) with only the EBC sharder, like TorchRec's golden example
            model = Probe(build_conf(("qr", {"operation": "mult"})))
            _apply_optimizer_in_backward(torch.optim.SGD, table_params(model), {"lr": 0.1})
            dmp = _stock_dmp(model, pg, [EmbeddingBagCollectionSharder()], None)
        out = dmp(kjt)
        _probe_loss(out, 8).backward()
    except Exception as e:  # noqa: BLE001 - the message is the result
        return f"{type(e).__name__}: {e}"
    return "no error"


def conf_legacy_checkpoint_case(pg, ck_dir: str, batch: int = 8):
    """A run-dir checkpoint written before ``full`` took TorchRec's key layout (its tables
    under ``tables.``) still loads: (max output difference before, after the load)."""
    ctx = init_distributed("cpu")
    rank, world = dist.get_rank(pg), dist_world(pg)
    kjt, _ = conf_batch(2, batch, rank, world)
    cfg = ShardingConfig(sharding_types=["table_wise"])
    a = shard_model(Probe(build_conf(("full", {}), seed=0)), cfg, ctx)
    hooks = a.module.emb._state_dict_hooks
    saved_hooks = dict(hooks)
    hooks.clear()  # the old layout
    try:
        assert any(".tables." in k for k in a.state_dict())
        save_checkpoint(ck_dir, a, {})
    finally:
        hooks.update(saved_hooks)
    want = a(kjt).detach()
    b = shard_model(Probe(build_conf(("full", {}), seed=3)), cfg, ctx)
    before = float((b(kjt).detach() - want).abs().max())
    load_checkpoint(ck_dir, b, {})
    return before, float((b(kjt).detach() - want).abs().max())


def conformance_worker(cases: list[tuple], tmp: str) -> list:
    """Run every case (kind, world, *args) whose world is this group's size, on this rank;
    the others are skipped (a launch per world size: DMP creates process groups, so every
    rank of the default group must run the same DMPs)."""
    torch.set_num_threads(1)
    ctx = init_distributed("cpu", timeout_s=300)
    pg = dist.group.WORLD
    results = []
    for n, (kind, world, *args) in enumerate(cases):
        if world != ctx.world_size:
            results.append(("skip",))
            continue
        if os.environ.get("EMBTABLES_CONFORMANCE_TRACE"):
            print(f"rank {ctx.rank} case {n}: {kind} {world} {args}", flush=True)
        try:
            if kind == "dmp":
                res = conf_dmp_case(pg, *args)
            elif kind == "tablefree":
                res = conf_tablefree_case(pg, *args)
            elif kind == "pipeline":
                res = conf_pipeline_case(pg, *args)
            elif kind == "legacy":
                res = conf_legacy_checkpoint_case(pg, os.path.join(tmp, f"legacy{n}-w{world}"))
            elif kind == "dcp":
                res = conf_dcp_case(pg, args[0], os.path.join(tmp, f"dcp{n}-w{world}"), *args[1:])
            else:
                res = conf_refusal_case(pg, *args)
            results.append(("ok", res))
        except Exception as e:  # noqa: BLE001 - one broken case must not hide the others
            results.append(("fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2500:]}"))
        if ctx.world_size > 1:
            dist.barrier()
    return results
