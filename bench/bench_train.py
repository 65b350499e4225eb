"""Training throughput of the quickstart model (DLRM, `full` dim-16 tables, batch 4096) as
the runner trains it, through TorchRec's TrainPipelineSparseDist against the plain loop.

    python bench/bench_train.py [--data data/synth-criteo] [--steps 40] [--rounds 5]

Builds the runner's two trainers (``train.pipeline: loop`` and ``sparse_dist``) in one
process and runs them in interleaved rounds of ``--steps`` steps each (reader, DMP-wrapped
model, fused row-wise Adagrad, Adam; each round is one segment, as between two
evaluations: the pipeline fills and drains in it), alternating which goes first. Prints
samples/s of each round, the medians and the median of the per-round ratios
(pipeline / loop), the reader alone, and a torch.profiler table of the top operators of
the loop; writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from itertools import islice
from pathlib import Path

os.environ.setdefault("TORCHREC_RESOLVED_POD_SIZE", "1")

MODES = ("loop", "sparse_dist")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="data/synth-criteo")
    ap.add_argument("--steps", type=int, default=40, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds (after one warm-up round)")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/train.json")
    args = ap.parse_args()
    if args.rounds < 5:
        print("--rounds: at least 5 (the figure is a median of interleaved rounds)", file=sys.stderr)
        return 2

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    import torch
    import torch.distributed as dist

    from embtables.datasets.reader import BatchReader
    from embtables.datasets.schema import load_schema
    from embtables.experiments.build import build_trainer
    from embtables.experiments.config import load_config
    from embtables.sharding import init_distributed

    torch.set_num_threads(args.threads)
    root = Path(args.data)
    if not (root / "schema.json").exists():
        print(f"no dataset at {root}: run `make data` first", file=sys.stderr)
        return 2
    ctx = init_distributed("cpu")
    schema = load_schema(root)
    trainers, steps, streams = {}, {}, {}
    for mode in MODES:
        cfg = load_config("quickstart", {"data.path": str(root), "train.batch_size": args.batch_size,
                                         "train.progress": False, "train.checkpoint": False,
                                         "train.pipeline": mode})
        tr = build_trainer(cfg, schema, root, ctx, None)
        assert tr.pipeline == mode
        tr.model.train()
        trainers[mode], steps[mode], streams[mode] = tr, tr._steps(), _batches(tr)

    def one_round(mode: str) -> float:
        rows, t = 0, time.perf_counter()
        for loss, n in steps[mode].run(islice(streams[mode], args.steps)):
            float(loss)
            rows += n
        return rows / (time.perf_counter() - t)

    for mode in MODES:  # warm-up: first traces, allocator, caches
        one_round(mode)
    per_round: dict[str, list[float]] = {m: [] for m in MODES}
    ratios = []
    for r in range(args.rounds):
        order = MODES if r % 2 == 0 else MODES[::-1]
        got = {m: one_round(m) for m in order}
        for m in MODES:
            per_round[m].append(got[m])
        ratios.append(got["sparse_dist"] / got["loop"])
    pipelined = steps["sparse_dist"].pipelined(trainers["sparse_dist"].inner)

    reader = BatchReader(root, "train", args.batch_size, shuffle=True, seed=0, shuffle_buffer=65536)
    it = iter(reader)
    next(it)
    t = time.perf_counter()
    for _ in range(args.steps):
        next(it)
    reader_sps = args.steps * args.batch_size / (time.perf_counter() - t)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in steps["loop"].run(islice(streams["loop"], 10)):
            pass
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)

    med = {m: statistics.median(v) for m, v in per_round.items()}
    ratio = statistics.median(ratios)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"\nquickstart DLRM, dim 16, batch {args.batch_size}, {args.threads} threads, "
          f"{args.rounds} rounds of {args.steps} steps (load average {load:.1f})\n")
    print(f"{'round':>5s} {'loop':>12s} {'sparse_dist':>12s} {'ratio':>7s}")
    for i in range(args.rounds):
        loop, pipe = per_round["loop"][i], per_round["sparse_dist"][i]
        print(f"{i + 1:5d} {loop:12,.0f} {pipe:12,.0f} {ratios[i]:7.3f}")
    print(f"{'median':>5s} {med['loop']:12,.0f} {med['sparse_dist']:12,.0f} {ratio:7.3f}")
    print(f"\nreader alone: {reader_sps:,.0f} samples/s; pipelined modules: {', '.join(pipelined) or 'none'}")
    print("\ntop operators of the loop (self CPU time, 10 steps):\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": load},
        "batch_size": args.batch_size, "threads": args.threads, "steps_per_round": args.steps,
        "samples_per_second": per_round, "median_samples_per_second": med, "ratios": ratios,
        "median_ratio_pipeline_over_loop": ratio, "pipelined_modules": pipelined,
        "reader_samples_per_second": reader_sps, "profile_top": table,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    dist.destroy_process_group()
    return 0


def _batches(trainer):
    """The trainer's training stream, epoch after epoch."""
    epoch = 0
    while True:
        yield from trainer.data.epoch(epoch)
        epoch += 1


if __name__ == "__main__":
    sys.exit(main())
