"""TrainPipelineSparseDist against a plain training loop on this machine: TorchRec's DLRM
with an embtables method, stock DMP on a one-process group, fused row-wise Adagrad,
random Criteo-shaped batches already in memory (no reader). Interleaved rounds; prints
samples/s of each and the median of the per-round ratios (pipeline / loop).

    python bench/bench_pipeline.py [--method full] [--rounds 5] [--steps 20]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="full")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    os.environ.setdefault("TORCHREC_RESOLVED_POD_SIZE", "1")
    import torch
    import torch.distributed as dist
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.datasets.random import RandomRecDataset
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.models.dlrm import DLRM, DLRMTrain
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.keyed import KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from embtables.embeddings import build

    torch.set_num_threads(args.threads)
    fd, path = tempfile.mkstemp(prefix="bench-pg-")
    os.close(fd)
    os.unlink(path)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    keys = [f"cat_{i}" for i in range(26)]
    cards = [100_000] * 26

    def fresh():
        torch.manual_seed(0)
        configs = [EmbeddingBagConfig(name=f"t_{k}", num_embeddings=n, embedding_dim=16, feature_names=[k])
                   for k, n in zip(keys, cards, strict=True)]
        ebc = EmbeddingBagCollection(tables=configs)
        emb = build(ebc, method=args.method, budget=None if args.method in ("full", "mch") else 0.25)
        model = DLRMTrain(DLRM(embedding_bag_collection=emb, dense_in_features=13,
                               dense_arch_layer_sizes=[64, 16], over_arch_layer_sizes=[64, 1]))
        _apply_optimizer_in_backward(RowWiseAdagrad, emb.tables.parameters(), {"lr": 0.05})
        dmp = DistributedModelParallel(model, device=torch.device("cpu"))
        opt = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                    lambda p: torch.optim.Adam(p, lr=1e-3))
        return dmp, opt

    data = list(RandomRecDataset(keys=keys, batch_size=args.batch_size, hash_sizes=cards, ids_per_feature=1,
                                 num_dense=13, manual_seed=0, num_batches=args.steps + 1))

    def loop_round(dmp, opt) -> float:
        t = time.perf_counter()
        for b in data[:args.steps]:
            opt.zero_grad()
            loss, _ = dmp(b)
            loss.backward()
            opt.step()
        return args.steps * args.batch_size / (time.perf_counter() - t)

    def pipe_round(pipe, it) -> float:
        t = time.perf_counter()
        for _ in range(args.steps):
            pipe.progress(it)
        return args.steps * args.batch_size / (time.perf_counter() - t)

    dmp_l, opt_l = fresh()
    dmp_p, opt_p = fresh()
    pipe = TrainPipelineSparseDist(dmp_p, opt_p, torch.device("cpu"), pipeline_postproc=True)
    # One pipeline for every round: batches stay in flight from one round to the next.
    it = iter(data[:args.steps] * (args.rounds + 2))
    loop_round(dmp_l, opt_l)  # warm-up both
    pipe_round(pipe, it)
    ratios, lp, pp = [], [], []
    for _ in range(args.rounds):
        a = loop_round(dmp_l, opt_l)
        b = pipe_round(pipe, it)
        lp.append(a)
        pp.append(b)
        ratios.append(b / a)
    print(f"method={args.method} batch={args.batch_size} steps/round={args.steps} threads={args.threads}")
    print(f"plain loop:              median {statistics.median(lp):,.0f} samples/s")
    print(f"TrainPipelineSparseDist: median {statistics.median(pp):,.0f} samples/s")
    print(f"ratio pipeline/loop: median {statistics.median(ratios):.3f} (rounds: "
          f"{', '.join(f'{r:.3f}' for r in ratios)})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
