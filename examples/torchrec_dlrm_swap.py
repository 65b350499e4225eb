"""TorchRec's DLRM on random Criteo-shaped batches, with the EmbeddingBagCollection
swapped for an embtables method in one line. Everything else is TorchRec's own stack:
DistributedModelParallel with its default sharders and planner, the fused in-backward
embedding optimizer, and TrainPipelineSparseDist.

    python -m torch.distributed.run --nnodes 1 --nproc-per-node 2 --master-port 29511 \\
        examples/torchrec_dlrm_swap.py --method qr --steps 20

(2 processes on gloo on CPU; on GPUs use --backend nccl.) Prints the mean loss of the
global batch every ``--print-every`` steps on rank 0.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os

import torch
import torch.distributed as dist
import yaml
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.datasets.random import RandomRecDataset
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from embtables.embeddings import build, list_methods

NUM_DENSE = 13
# Criteo's 26 categorical features, with cardinalities scaled down to run in seconds.
CARDINALITIES = [1460, 583, 10131, 2202, 305, 24, 12517, 633, 3, 9379, 5738, 10163, 3175, 27, 11422, 9891,
                 10, 4567, 2173, 4, 10180, 18, 15, 2864, 105, 1424]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="qr", choices=list_methods())
    p.add_argument("--budget", type=float, default=0.25,
                   help="fraction of the full tables' bytes (not for full)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256, help="per rank")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--print-every", type=int, default=5)
    p.add_argument("--backend", default="gloo")
    p.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                   help="a knob of the method, e.g. --knob frequency_ranked=true for hybrid (repeatable)")
    return p.parse_args()


def parse_knobs(items: list[str]) -> dict:
    knobs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--knob {item!r}: expected NAME=VALUE")
        knobs[name] = yaml.safe_load(value)  # true, 8, 0.5, a path: as in a config file
    return knobs


def train(args: argparse.Namespace) -> None:
    rank = dist.get_rank()
    cuda = args.backend == "nccl"
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    torch.manual_seed(0)

    keys = [f"cat_{i}" for i in range(len(CARDINALITIES))]
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"t_{k}", num_embeddings=n, embedding_dim=args.dim, feature_names=[k])
        for k, n in zip(keys, CARDINALITIES, strict=True)])
    # The one-line swap: same features, sizes and width as the EBC, within a memory budget.
    emb = build(ebc, method=args.method, budget=None if args.method in ("full", "mch") else args.budget,
                **parse_knobs(args.knob))
    model = DLRMTrain(DLRM(embedding_bag_collection=emb, dense_in_features=NUM_DENSE,
                           dense_arch_layer_sizes=[64, args.dim], over_arch_layer_sizes=[64, 1]))

    # Fused embedding optimizer, attached before DMP so that DMP fuses it into the kernels. A
    # method without tables (dhe: hashes -> MLP) has only dense parameters: the dense
    # optimizer below trains them.
    if emb.has_tables:
        _apply_optimizer_in_backward(RowWiseAdagrad, emb.tables.parameters(), {"lr": 0.05})
    model = DistributedModelParallel(model, device=device)  # TorchRec's default sharders and planner
    # Adagrad at the tables' rate suits DLRM's small MLPs; a table-free method's decoder
    # (1,024 inputs per id) diverges at it, and trains with Adam at 1e-3 instead.
    dense_opt = ((lambda params: torch.optim.Adagrad(params, lr=0.05)) if emb.has_tables
                 else (lambda params: torch.optim.Adam(params, lr=1e-3)))
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(model.named_parameters())), dense_opt)
    # pipeline_postproc=True lets the pipeline run a method's parameter-free id remap in its
    # input stage, so the sharded tables are pipelined.
    pipeline = TrainPipelineSparseDist(model, dense, device, pipeline_postproc=True)

    data = iter(RandomRecDataset(keys=keys, batch_size=args.batch_size, hash_sizes=CARDINALITIES,
                                 ids_per_feature=1, num_dense=NUM_DENSE, manual_seed=rank,
                                 num_batches=args.steps))
    if rank == 0:
        print(f"method={args.method} embedding bytes={emb.memory_bytes()}", flush=True)
    for step in range(args.steps):
        loss = pipeline.progress(data)[0].detach()
        dist.all_reduce(loss)
        if rank == 0 and (step % args.print_every == 0 or step == args.steps - 1):
            print(f"step {step} loss {float(loss) / dist.get_world_size():.5f}", flush=True)
    if rank == 0:  # what TrainPipelineSparseDist pipelines (its own record)
        print("pipelined:", [type(m).__name__ for m in pipeline._pipelined_modules],
              "in the input stage:", [pp._fqn for pp in pipeline._pipelined_postprocs], flush=True)
    # Both ranks past every collective before the group goes (gloo aborts a rank that tears
    # its group down while the other still has work in flight).
    dist.barrier()


def main() -> None:
    args = parse_args()
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # the pipeline's tracing notes
    dist.init_process_group(args.backend)
    try:
        train(args)
    finally:
        # The sharded model refers to the process group from inside reference cycles, which
        # only the garbage collector frees: without this collection the group, and gloo's
        # worker and transport threads with it, outlive main() and are torn down (or not)
        # while the interpreter exits, which can abort the process ("terminate called
        # without an active exception"). Collected here, the group's threads are joined
        # when destroy_process_group() drops the last reference to it.
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
