"""Small deterministic models, batches and a train step for the sharding tests and the
benchmark (tiny tables, exact comparisons against unsharded references)."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embtables.embeddings import FeatureSpec, build, list_methods
from embtables.models.dlrm import DLRM, DLRMConfig
from embtables.sharding import ShardingConfig
from embtables.sharding.checkpoint import load_checkpoint, save_checkpoint
from embtables.sharding.collectives_metrics import global_metrics
from embtables.sharding.dmp import ShardingError, init_distributed, shard_model, torchrec_tables
from embtables.sharding.dmp import sharders as our_sharders
from embtables.sharding.launch import launch

FEATURES = [FeatureSpec("f0", 50), FeatureSpec("f1", 23), FeatureSpec("f2", 37)]
NUM_DENSE = 4


def make_batch(step: int, batch: int, features=FEATURES, max_bag: int = 3, rank: int = 0, world: int = 1,
               id_range: int | None = None):
    """Global batch for ``step``, sliced to this rank: (dense, KJT, labels). Bags hold
    0..max_bag ids (empty bags included); ids are below each feature's cardinality
    unless ``id_range`` is given (hashing methods take any id)."""
    g = torch.Generator().manual_seed(1000 + step)
    dense = torch.randn(batch, NUM_DENSE, generator=g)
    labels = (torch.rand(batch, generator=g) < 0.3).float()
    lengths, values = [], []
    for f in features:
        ln = torch.randint(0, max_bag + 1, (batch,), generator=g)
        hi = id_range or f.cardinality
        values.append(torch.randint(0, hi, (int(ln.sum()),), generator=g))
        lengths.append(ln)
    per = batch // world
    lo, hi = rank * per, (rank + 1) * per
    ls, vs = [], []
    for ln, v in zip(lengths, values, strict=True):
        off = torch.cat([torch.zeros(1, dtype=torch.long), ln.cumsum(0)])
        ls.append(ln[lo:hi])
        vs.append(v[off[lo]:off[hi]])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in features], values=torch.cat(vs), lengths=torch.cat(ls)
    )
    return dense[lo:hi], kjt, labels[lo:hi]


def tiny_dlrm(method: str = "full", dim: int = 8, seed: int = 0, features=FEATURES, **build_kw) -> DLRM:
    torch.manual_seed(seed)
    emb = build(features, method=method, dim=dim, **build_kw)
    return DLRM(emb, NUM_DENSE, DLRMConfig(bottom_mlp=[8], top_mlp=[8]))


def attach_table_optimizer(model: nn.Module, name: str = "rowwise_adagrad", lr: float = 0.1) -> None:
    cls = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}[name]
    params = [p for m in torchrec_tables(model) for p in m.parameters()]
    _apply_optimizer_in_backward(cls, params, {"lr": lr})


def dense_optimizer(dmp: nn.Module, lr: float = 0.01) -> torch.optim.Optimizer:
    params = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters(), include=False)]
    return torch.optim.Adam(params, lr=lr)


def train_step(model: nn.Module, dense_opt: torch.optim.Optimizer, batch) -> float:
    dense, kjt, labels = batch
    dense_opt.zero_grad()
    loss = nn.functional.binary_cross_entropy_with_logits(model(dense, kjt), labels)
    loss.backward()
    dense_opt.step()
    return float(loss.detach())


# ---- 2-rank workers (module level so that spawned processes can unpickle them) ----------


def gather_full(dmp: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight as a full tensor on every rank (all-reduce of zero-padded shards)."""
    import torch.distributed as dist

    out = {}
    for k, v in dmp.state_dict().items():
        if hasattr(v, "local_shards"):
            full = torch.zeros(v.size())
            for s in v.local_shards():
                idx = tuple(slice(o, o + n) for o, n in zip(s.metadata.shard_offsets, s.metadata.shard_sizes, strict=True))
                full[idx] = s.tensor.detach()
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(full)
            v = full
        out[k] = v.detach().clone()
    return out


def global_loss(loss: float) -> float:
    """Mean of the ranks' per-rank mean losses = the global-batch loss (equal slices)."""
    import torch.distributed as dist

    t = torch.tensor([loss], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t)


def resume_worker(ck_dir: str, steps: int, split: int, batch: int, sharding_type: str):
    """At this world size: uninterrupted run vs save at ``split`` + load into a fresh
    model + continue. Returns (ref losses, resumed losses, max weight diff)."""

    torch.set_num_threads(1)
    ctx = init_distributed("cpu", timeout_s=120)
    cfg = ShardingConfig(sharding_types=[sharding_type])

    def fresh(seed):
        model = tiny_dlrm(seed=seed)
        attach_table_optimizer(model)
        dmp = shard_model(model, cfg, ctx)
        return dmp, dense_optimizer(dmp)

    def run(dmp, opt, lo, hi):
        return [global_loss(train_step(dmp, opt, make_batch(s, batch, rank=ctx.rank, world=ctx.world_size)))
                for s in range(lo, hi)]

    dmp, opt = fresh(0)
    ref = run(dmp, opt, 0, steps)
    ref_state = gather_full(dmp)
    dmp, opt = fresh(0)
    got = run(dmp, opt, 0, split)
    save_checkpoint(ck_dir, dmp, {"embedding": dmp.fused_optimizer, "dense": opt}, {"step": split, "rank": ctx.rank})
    dmp, opt = fresh(99)
    extra = load_checkpoint(ck_dir, dmp, {"embedding": dmp.fused_optimizer, "dense": opt})
    assert extra == {"step": split, "rank": ctx.rank}, extra
    got += run(dmp, opt, split, steps)
    state = gather_full(dmp)
    diff = max(float((state[k] - ref_state[k]).abs().max()) for k in ref_state)
    return ref, got, diff


def metrics_worker(sizes: list[int]):
    """Each rank holds a different number of predictions; returns the global metrics."""

    ctx = init_distributed("cpu", timeout_s=60)
    probs, labels = rank_predictions(ctx.rank, sizes[ctx.rank])
    return global_metrics(probs, labels)


def rank_predictions(rank: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(50 + rank)
    labels = (torch.rand(n, generator=g) < 0.4).float()
    probs = torch.sigmoid(torch.randn(n, generator=g) + 1.2 * labels)
    return probs, labels


def two_rank_suite(ck_dir: str, sizes: list[int], steps: int, split: int, batch: int, sharding_type: str):
    """Everything the 2-rank tests need from one spawn (spawning costs seconds)."""
    return {"metrics": metrics_worker(sizes), "resume": resume_worker(ck_dir, steps, split, batch, sharding_type)}


# ---- method x sharding-type matrix ------------------------------------------------------

MATRIX_FEATURES = [FeatureSpec("f0", 1000), FeatureSpec("f1", 400), FeatureSpec("f2", 250)]
MATRIX_BUDGETS = {"full": None, "hash": 0.3, "qr": 0.2, "unified": 0.3, "mch": None}
MAX_BAG = 3


class Probe(nn.Module):
    """An embedding method plus one dense scalar (so DMP has a data-parallel part);
    output [B, D]: pooled vectors, or sequence ids padded to MAX_BAG per feature."""

    def __init__(self, emb: nn.Module) -> None:
        super().__init__()
        self.emb = emb
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        out = self.emb(kjt)
        if hasattr(out, "to_dict"):  # KeyedTensor (or DMP's lazy awaitable of one)
            x = torch.cat([out[k] for k in self.emb.feature_names], dim=1)
        else:
            x = torch.cat([out[k].to_padded_dense(MAX_BAG).flatten(1) for k in self.emb.feature_names], dim=1)
        return x * self.scale


def build_matrix_method(spec: str, sequence: bool) -> nn.Module:
    """``spec``: a method name, or ``name:operation`` (qr's combine: mult / add / concat)."""
    method, _, op = spec.partition(":")
    knobs = {"operation": op} if op else {}
    return build(MATRIX_FEATURES, method=method, dim=8, budget=MATRIX_BUDGETS[method], sequence=sequence, **knobs)


def module_kind(emb: nn.Module) -> str:
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    return "ebc" if isinstance(emb.tables, EmbeddingBagCollection) else "ec"


def _probe_loss(x: torch.Tensor, batch: int) -> torch.Tensor:
    proj = torch.linspace(-1.0, 1.0, x.shape[1], dtype=x.dtype)
    return ((x @ proj) ** 2).sum() / batch


def _case(ctx, method: str, sequence: bool, stype: str, opt_name: str, host_memory: str | None = None,
          batch: int = 16, lr: float = 0.5):
    import copy


    torch.manual_seed(0)
    model = Probe(build_matrix_method(method, sequence))
    ref = copy.deepcopy(model)
    opt_cls = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rowwise_adagrad": RowWiseAdagrad}[opt_name]
    kw = {"lr": lr} if opt_name == "sgd" else {"lr": lr, "eps": 1e-8}
    table_params = [p for m in torchrec_tables(model) for p in m.parameters()]
    _apply_optimizer_in_backward(opt_cls, table_params, dict(kw))  # DMP mutates the dict
    dmp = shard_model(model, ShardingConfig(sharding_types=[stype], host_memory=host_memory), ctx)
    # data_parallel tables ignore the in-backward optimizer: the dense optimizer takes them.
    rest = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters(), include=False)]
    dense_opts = [torch.optim.SGD([p for p in rest if p.numel() == 1], lr=lr)]
    if [p for p in rest if p.numel() > 1]:
        dense_opts.append(opt_cls([p for p in rest if p.numel() > 1], **kw))

    _, kjt_all, _ = make_batch(0, batch, MATRIX_FEATURES, max_bag=MAX_BAG)
    _, kjt, _ = make_batch(0, batch, MATRIX_FEATURES, max_bag=MAX_BAG, rank=ctx.rank, world=ctx.world_size)
    per = batch // ctx.world_size

    ref_opts = [torch.optim.SGD([ref.scale], lr=lr),
                opt_cls([p for m in torchrec_tables(ref) for p in m.parameters()], **kw)]
    ref_out = ref(kjt_all)
    _probe_loss(ref_out, batch).backward()
    for o in ref_opts:
        o.step()

    out = dmp(kjt)
    fwd = float((out - ref_out[ctx.rank * per:(ctx.rank + 1) * per]).abs().max())
    _probe_loss(out, per).backward()
    for o in dense_opts:
        o.step()
    got, want = gather_full(dmp), ref.state_dict()
    step = max(float((got[k] - want[k]).abs().max()) for k in want)
    return fwd, step


def matrix_worker(cases: list[tuple[str, bool, str, str]]) -> list[tuple[str, float, float] | tuple[str, str]]:
    """Every case in one process group: ("ok", forward diff, post-step weight diff) or
    ("error", message) for a case refused before planning."""

    torch.set_num_threads(1)
    ctx = init_distributed("cpu", timeout_s=120)
    results = []
    for case in cases:
        try:
            results.append(("ok", *_case(ctx, *case)))
        except ShardingError as e:
            results.append(("error", str(e)))
        except Exception as e:  # noqa: BLE001 - one broken case must not hide the others
            import traceback

            results.append(("fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"))
    return results


_SHARED: dict[str, object] = {}


def all_two_rank_worker(cases, suite_args):
    return {"matrix": matrix_worker(cases), "suite": two_rank_suite(*suite_args)}


def shared_two_rank_run(cases, suite_args) -> dict[str, list]:
    """One spawned 2-rank group for every 2-rank test of the session (spawning and
    importing torchrec twice costs 15-40 s on a busy 2-core machine); cached."""

    key = repr((cases, suite_args))
    if key not in _SHARED:
        out = launch(all_two_rank_worker, 2, (cases, suite_args), timeout_s=900)
        _SHARED[key] = {"matrix": [r["matrix"] for r in out], "suite": [r["suite"] for r in out]}
    return _SHARED[key]  # type: ignore[return-value]


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


def build_conf(spec: tuple[str, dict], sequence: bool = False, weighted: bool = False, seed: int = 0):
    name, knobs = spec
    budget = CONF_BUDGET if name not in NO_BUDGET else None
    knobs = {**BUILD_KNOBS.get(name, {}), **knobs}
    torch.manual_seed(seed)
    return build(CONF_FEATURES, method=name, dim=8, budget=budget, sequence=sequence, weighted=weighted, **knobs)


def conf_batch(step: int, batch: int, rank: int = 0, world: int = 1, weighted: bool = False):
    _, kjt, labels = make_batch(step, batch, CONF_FEATURES, max_bag=MAX_BAG, rank=rank, world=world)
    if weighted:  # a function of the id, so a rank's slice has the weights of the global batch
        w = ((kjt.values() * 7919 + step) % 97 + 1).float() / 97
        kjt = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=w)
    return kjt, labels


def _stock_plan(model: nn.Module, world: int, pg, sharders_, forced: str | None):
    """TorchRec's planner on this group: its own choices, or one sharding type forced."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints

    constraints = None
    if forced is not None:
        names = [c.name for m in torchrec_tables(model)
                 for c in (m.embedding_bag_configs() if hasattr(m, "embedding_bag_configs") else m.embedding_configs())]
        # "mixed": the first table data_parallel, the others table_wise (what the planner
        # picked on its own for small tables): a sharded EBC then groups its output keys
        # by sharding type, not in table order.
        types = {n: ("data_parallel" if i == 0 else "table_wise") if forced == "mixed" else forced
                 for i, n in enumerate(names)}
        constraints = {n: ParameterConstraints(sharding_types=[t], compute_kernels=["dense" if t == "data_parallel"
                                                                                   else "fused"])
                       for n, t in types.items()}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"),
                                       constraints=constraints)
    return planner.collective_plan(model, sharders_, pg)


def _stock_dmp(model: nn.Module, pg, sharders_, forced: str | None):
    """A user's DMP: TorchRec's own DistributedModelParallel, weights loaded after."""
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv

    world = dist_world(pg)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plan = _stock_plan(model, world, pg, sharders_, forced)
    env = ShardingEnv.from_process_group(pg)
    dmp = DistributedModelParallel(model, env=env, device=torch.device("cpu"), plan=plan, sharders=sharders_)
    dmp.load_state_dict(saved)
    return dmp


def dist_world(pg) -> int:
    import torch.distributed as dist

    return dist.get_world_size(pg)


def conf_dmp_case(pg, spec, sequence: bool, weighted: bool, forced: str | None, opt_name: str,
                  sharders_kind: str, batch: int = 8, lr: float = 0.5):
    """Stock DMP vs the unsharded module, same weights: (forward diff, weight diff after one
    step). ``sharders_kind``: "default" (TorchRec's) or "embtables" (RW/TWRW switched on)."""
    import copy

    import torch.distributed as dist


    rank, world = dist.get_rank(pg), dist_world(pg)
    model = Probe(build_conf(spec, sequence, weighted))
    # Eval mode unless the remap has state (mch admits ids only in training): a training
    # forward may sample (optembed's supernet draws widths per sample), and a rank draws
    # for its slice, the reference for the global batch. Gradients and steps are the same.
    model.train(model.emb.stateful_remap)
    ref = copy.deepcopy(model)
    opt_cls = {"sgd": torch.optim.SGD, "rowwise_adagrad": RowWiseAdagrad}[opt_name]
    kw = {"lr": lr} if opt_name == "sgd" else {"lr": lr, "eps": 1e-8}
    _apply_optimizer_in_backward(opt_cls, [p for m in torchrec_tables(model) for p in m.parameters()], dict(kw))
    sh = None if sharders_kind == "default" else our_sharders()
    if sh is None:
        from torchrec.distributed.sharding_plan import get_default_sharders

        sh = get_default_sharders()
    emb0 = model.emb
    bytes0, configs0 = emb0.memory_bytes(), emb0.table_configs()
    errors = _ErrorLines()
    logging.getLogger().addHandler(errors)
    try:
        dmp = _stock_dmp(model, pg, sh, forced)
        emb = dmp.module.emb
        sizes = (bool(repr(emb)), emb.memory_bytes(), bytes0, _cfg_rows(emb.table_configs()) == _cfg_rows(configs0))
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
    others = [p for p in ref.parameters() if id(p) not in table_ids and p is not ref.scale]  # a method's dense ones
    ref_tables = [p for m in torchrec_tables(ref) for p in m.parameters()]
    # A table-free method (dhe) has only dense parameters: the SGD above trains them.
    ref_opts = [torch.optim.SGD([ref.scale, *others], lr=lr)] + ([opt_cls(ref_tables, **kw)] if ref_tables else [])
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
    import torch.distributed as dist

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
    import torch.distributed as dist
    from torchrec.datasets.utils import Batch
    from torchrec.distributed.sharding_plan import get_default_sharders
    from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
    from torchrec.models.dlrm import DLRM as TorchRecDLRM
    from torchrec.models.dlrm import DLRMTrain
    from torchrec.optim.keyed import KeyedOptimizerWrapper

    rank, world = dist.get_rank(pg), dist_world(pg)

    def batches():
        out = []
        for s in range(steps + 1):
            g = torch.Generator().manual_seed(500 + s)
            dense = torch.randn(batch, NUM_DENSE, generator=g)
            _, kjt, labels = make_batch(s, batch * world, CONF_FEATURES, max_bag=MAX_BAG, rank=rank, world=world)
            out.append(Batch(dense_features=dense, sparse_features=kjt, labels=labels))
        return out

    def fresh():
        emb = build_conf(spec)
        torch.manual_seed(1)
        model = DLRMTrain(TorchRecDLRM(embedding_bag_collection=emb, dense_in_features=NUM_DENSE,
                                       dense_arch_layer_sizes=[8], over_arch_layer_sizes=[8, 1]))
        _apply_optimizer_in_backward(torch.optim.SGD, [p for m in torchrec_tables(model) for p in m.parameters()],
                                     {"lr": 0.1})
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
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torchrec.distributed.sharding_plan import get_default_sharders

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
    import torch.distributed as dist
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.sharding_plan import get_default_sharders

    rank, world = dist.get_rank(pg), dist_world(pg)
    kjt, _ = conf_batch(0, 8, rank, world)
    try:
        if what.endswith("-multi-rank"):
            model = Probe(build_conf((what.removesuffix("-multi-rank"), {})))
            dmp = _stock_dmp(model, pg, get_default_sharders(), None)
        else:  # qr mult (an EmbeddingCollection) with only the EBC sharder, like TorchRec's golden example
            model = Probe(build_conf(("qr", {"operation": "mult"})))
            _apply_optimizer_in_backward(torch.optim.SGD, [p for m in torchrec_tables(model) for p in m.parameters()],
                                         {"lr": 0.1})
            dmp = _stock_dmp(model, pg, [EmbeddingBagCollectionSharder()], None)
        out = dmp(kjt)
        _probe_loss(out, 8).backward()
    except Exception as e:  # noqa: BLE001 - the message is the result
        return f"{type(e).__name__}: {e}"
    return "no error"


def conf_legacy_checkpoint_case(pg, ck_dir: str, batch: int = 8):
    """A run-dir checkpoint written before ``full`` took TorchRec's key layout (its tables
    under ``tables.``) still loads: (max output difference before, after the load)."""
    import torch.distributed as dist


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
    import os

    import torch.distributed as dist


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
            import traceback

            results.append(("fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2500:]}"))
        if ctx.world_size > 1:
            dist.barrier()
    return results
