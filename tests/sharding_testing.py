"""Small deterministic models, batches and a train step for the sharding tests (tiny
tables, exact comparisons against unsharded references), and the 2-rank workers of
test_sharding_launch.py / test_sharding_matrix.py. Imported by the tests as a plain module
(pytest puts tests/ on the path, and spawned ranks inherit it)."""

from __future__ import annotations

import copy
import traceback

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embtables.embeddings import FeatureSpec, build
from embtables.models.dlrm import DLRM, DLRMConfig
from embtables.sharding import ShardingConfig
from embtables.sharding.checkpoint import load_checkpoint, save_checkpoint
from embtables.sharding.collectives_metrics import global_metrics
from embtables.sharding.dmp import ShardingError, init_distributed, shard_model, torchrec_tables
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


OPTIMIZERS = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rowwise_adagrad": RowWiseAdagrad}


def table_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every TorchRec table in ``model``."""
    return [p for m in torchrec_tables(model) for p in m.parameters()]


def attach_table_optimizer(model: nn.Module, name: str = "rowwise_adagrad", lr: float = 0.1) -> None:
    _apply_optimizer_in_backward(OPTIMIZERS[name], table_params(model), {"lr": lr})


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
    out = {}
    for k, v in dmp.state_dict().items():
        if hasattr(v, "local_shards"):
            full = torch.zeros(v.size())
            for s in v.local_shards():
                md = s.metadata
                idx = tuple(slice(o, o + n) for o, n in zip(md.shard_offsets, md.shard_sizes, strict=True))
                full[idx] = s.tensor.detach()
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(full)
            v = full
        out[k] = v.detach().clone()
    return out


def global_loss(loss: float) -> float:
    """Mean of the ranks' per-rank mean losses = the global-batch loss (equal slices)."""
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
    optimizers = {"embedding": dmp.fused_optimizer, "dense": opt}
    save_checkpoint(ck_dir, dmp, optimizers, {"step": split, "rank": ctx.rank})
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
    return {"metrics": metrics_worker(sizes),
            "resume": resume_worker(ck_dir, steps, split, batch, sharding_type)}


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
    return build(MATRIX_FEATURES, method=method, dim=8, budget=MATRIX_BUDGETS[method], sequence=sequence,
                 **knobs)


def module_kind(emb: nn.Module) -> str:
    return "ebc" if isinstance(emb.tables, EmbeddingBagCollection) else "ec"


def _probe_loss(x: torch.Tensor, batch: int) -> torch.Tensor:
    proj = torch.linspace(-1.0, 1.0, x.shape[1], dtype=x.dtype)
    return ((x @ proj) ** 2).sum() / batch


def _case(ctx, method: str, sequence: bool, stype: str, opt_name: str, host_memory: str | None = None,
          batch: int = 16, lr: float = 0.5):
    torch.manual_seed(0)
    model = Probe(build_matrix_method(method, sequence))
    ref = copy.deepcopy(model)
    opt_cls = OPTIMIZERS[opt_name]
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


def matrix_worker(cases: list[tuple[str, bool, str, str]]) -> list[tuple]:
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
