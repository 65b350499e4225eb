"""Training throughput of the quickstart model (DLRM, `full` dim-16 tables, batch 4096)
and what limits it.

    python bench/bench_train.py [--data data/synth-criteo] [--steps 60]

Measures, in one process and one run: (1) the whole training step as the runner does it
(reader + DMP-wrapped model + fused row-wise Adagrad + Adam), (2) the reader alone,
(3) the step on pre-read batches (no I/O), (4) embedding tables only (forward+backward
with the fused optimizer), and a torch.profiler table of the top operators. Prints a
table and writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHREC_RESOLVED_POD_SIZE", "1")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="data/synth-criteo")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/train.json")
    args = ap.parse_args()

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    import torch
    from torch import nn

    from embtables.datasets.reader import BatchReader
    from embtables.datasets.schema import load_schema
    from embtables.experiments.config import load_config
    from embtables.experiments.trainer import Trainer
    from embtables.sharding import init_distributed

    torch.set_num_threads(args.threads)
    root = Path(args.data)
    if not (root / "schema.json").exists():
        print(f"no dataset at {root}: run `make data` first", file=sys.stderr)
        return 2
    cfg = load_config("quickstart", {"data.path": str(root), "train.batch_size": args.batch_size,
                                     "train.progress": False, "train.checkpoint": False})
    ctx = init_distributed("cpu")
    tr = Trainer(cfg, load_schema(root), root, ctx, None)
    n = args.steps
    warm = 5

    def step(batch) -> None:
        logits = tr.model(batch.dense_features, batch.sparse_features)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        tr.dense_opt.zero_grad(set_to_none=True)
        loss.backward()
        tr.dense_opt.step()
        float(loss)

    results: dict[str, float] = {}
    # (2) reader alone
    reader = BatchReader(root, "train", args.batch_size, shuffle=True, seed=0, shuffle_buffer=65536)
    it = iter(reader)
    for _ in range(warm):
        next(it)
    t = time.perf_counter()
    batches = [next(it) for _ in range(n)]
    results["reader only"] = n * args.batch_size / (time.perf_counter() - t)
    # (3) step on pre-read batches
    for b in batches[:warm]:
        step(b)
    t = time.perf_counter()
    for b in batches:
        step(b)
    results["train step, batches in memory"] = n * args.batch_size / (time.perf_counter() - t)
    # (1) the whole loop with the reader's prefetch thread
    reader2 = BatchReader(root, "train", args.batch_size, shuffle=True, seed=1, shuffle_buffer=65536,
                          prefetch=2)
    it2 = iter(reader2)
    for _ in range(warm):
        step(next(it2))
    t = time.perf_counter()
    for _ in range(n):
        step(next(it2))
    results["train step + reader (as the runner)"] = n * args.batch_size / (time.perf_counter() - t)
    # (4) embedding part alone: sharded tables forward + backward (fused optimizer)
    emb = tr.inner.embedding
    t = time.perf_counter()
    for b in batches:
        out = emb(b.sparse_features).values()
        out.sum().backward()
    results["embedding tables only (fwd+bwd+fused opt)"] = n * args.batch_size / (time.perf_counter() - t)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[:10]:
            step(b)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)

    print(f"\nquickstart DLRM, dim 16, batch {args.batch_size}, {args.threads} threads, {n} steps\n")
    print(f"{'what':45s} {'samples/s':>12s}")
    for k, v in results.items():
        print(f"{k:45s} {v:12,.0f}")
    print("\ntop operators (self CPU time, 10 steps):\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"batch_size": args.batch_size, "threads": args.threads, "steps": n,
                               "samples_per_second": results, "profile_top": table}, indent=2) + "\n")
    print(f"wrote {out}")
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
