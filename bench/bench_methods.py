"""Forward+backward time of each embedding method vs a plain TorchRec EBC of the same size.

    python bench/bench_methods.py            # 4096 x 26 single-id bags, dim 16, budget 1/8

For every method M: a plain ``EmbeddingBagCollection`` with M's number of parameters
(26 tables of equal rows, dim wide) is timed in the same run, repetitions interleaved
(M, its EBC, M's remap alone, next method...) in blocks of consecutive steps. ms figures
are medians of the block means; the ratio is the median over rounds of M's block over the
EBC block timed right after it (adjacent in time, so a change of the machine's load moves
both), and it is what the targets bound: time <= (lookups per id + 0.3) x the plain EBC.
Writes bench/results/methods.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from tqdm import tqdm

from embtables.embeddings import FeatureSpec, build

logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

# Criteo Kaggle cardinalities, capped at 300k so full fp32 tables stay ~130 MB at dim 16.
CRITEO = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
          5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
COUNTS = "<counts>"  # replaced by a per-id counts file written for the run (hybrid's counts mode)
CONFIGS = [  # (label, method, knobs, lookups per id)
    ("full", "full", {}, 1),
    ("hash", "hash", {}, 1),
    ("qr mult", "qr", {"operation": "mult"}, 2),
    ("qr add", "qr", {"operation": "add"}, 2),
    ("qr concat", "qr", {"operation": "concat"}, 2),
    ("unified c=1", "unified", {"probes": 1}, 1),
    ("unified c=2", "unified", {"probes": 2}, 2),
    ("mch", "mch", {}, 1),
    ("mch int=20", "mch", {"eviction_interval": 20}, 1),
    ("mch no evict", "mch", {"eviction_interval": 20}, 1),  # see FROZEN
    ("mde", "mde", {}, 1),
    ("tt r=8", "tt", {"rank": 8}, 3),
    ("tt r=16", "tt", {"rank": 16}, 3),
    ("dhe", "dhe", {}, None),  # no lookups: hashes -> MLP, measured against the EBC, no target
    ("hybrid rank", "hybrid", {"frequency_ranked": True}, 1),
    ("hybrid cnt", "hybrid", {"counts": COUNTS}, 1),  # hot ids from per-id counts: a searchsorted
]
# Rows whose step is seconds, not milliseconds: at most this many steps per block.
MAX_STEPS = {"dhe": 2}
# Configs whose eviction is switched off after the warm-up has run one (slots filled): the
# per-batch cost of TorchRec's MCH with no eviction at all, a floor for any interval.
FROZEN = {"mch no evict"}


def batch(cards: list[int], b: int, gen: torch.Generator, weights: bool = False) -> KeyedJaggedTensor:
    vals = torch.cat([torch.randint(0, n, (b,), generator=gen) for n in cards])
    return KeyedJaggedTensor.from_lengths_sync(
        [f"C{i + 1}" for i in range(len(cards))], vals, torch.ones(len(cards) * b, dtype=torch.int64),
        weights=torch.rand(vals.numel(), generator=gen) if weights else None)


def plain_ebc(num_params: int, n_feat: int, dim: int) -> tuple[EmbeddingBagCollection, list[int]]:
    rows = max(1, num_params // dim // n_feat)
    ebc = EmbeddingBagCollection([EmbeddingBagConfig(name=f"p{i}", num_embeddings=rows, embedding_dim=dim,
                                                     feature_names=[f"C{i + 1}"]) for i in range(n_feat)])
    return ebc, [rows] * n_feat


def fwd_bwd(mod, xs: list, steps: int) -> float:
    """Mean seconds per forward+backward over a block of ``steps`` consecutive batches.

    A block, not one step: ``mch`` evicts once every ``eviction_interval`` training steps,
    and that cost must be amortised into the figure, not dropped by a median of single steps."""
    t = time.perf_counter()
    for i in range(steps):
        out = mod(xs[i % len(xs)])
        out.values().sum().backward()
        for p in mod.parameters():
            p.grad = None
    return (time.perf_counter() - t) / steps


def remap_time(mod, xs: list, steps: int) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(steps):
            mod.remap(xs[i % len(xs)])
    return (time.perf_counter() - t) / steps


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--budget", default="1/8", help="fraction of the full size or bytes (default 1/8)")
    ap.add_argument("--reps", type=int, default=5, help="timed blocks per module (median taken)")
    ap.add_argument("--steps", type=int, default=20,
                    help="batches per block; a multiple of mch's eviction_interval so evictions are "
                         "amortised")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cap", type=int, default=300_000, help="cap on the Criteo cardinalities")
    ap.add_argument("--only", nargs="*", help="labels to run (default: all)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "methods.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cards = [min(n, args.cap) for n in CRITEO]
    feats = [FeatureSpec(f"C{i + 1}", n) for i, n in enumerate(cards)]
    gen = torch.Generator().manual_seed(0)
    xs = [batch(cards, args.batch, gen) for _ in range(3)]

    tmp = tempfile.TemporaryDirectory()
    counts = str(Path(tmp.name) / "counts.npz")
    rng = np.random.default_rng(0)
    np.savez(counts, **{f.name: rng.zipf(1.2, f.cardinality) for f in feats})
    runs = []
    for label, method, knobs, lookups in CONFIGS:
        if args.only and label not in args.only:
            continue
        knobs = {k: counts if v == COUNTS else v for k, v in knobs.items()}
        budget = None if method == "full" else args.budget
        mod = build(feats, method=method, dim=args.dim, budget=budget, **knobs)
        mod.train()
        ebc, rows = plain_ebc(mod.num_parameters(), len(feats), args.dim)
        bxs = [batch(rows, args.batch, gen) for _ in range(3)]
        runs.append({"label": label, "method": method, "knobs": knobs, "lookups": lookups, "mod": mod,
                     "ebc": ebc, "bxs": bxs, "t": [], "t_ebc": [], "t_remap": []})
    for r in runs:  # warm-up (mch admits its first ids here)
        if r["label"] in FROZEN:  # one eviction fills the slots, then none: TorchRec evicts
            fwd_bwd(r["mod"], xs, r["knobs"]["eviction_interval"])  # when the step count hits it
            for m in r["mod"].remap.mcc._managed_collision_modules.values():
                m._eviction_interval = 2**62
        fwd_bwd(r["mod"], xs, 1)
        fwd_bwd(r["ebc"], r["bxs"], 1)
    load_start = os.getloadavg()[0]
    for _ in tqdm(range(args.reps), desc="blocks"):
        for r in runs:  # interleaved blocks: method, its plain EBC, its remap alone
            steps = min(args.steps, MAX_STEPS.get(r["label"], args.steps))
            r["t"].append(fwd_bwd(r["mod"], xs, steps))
            r["t_ebc"].append(fwd_bwd(r["ebc"], r["bxs"], steps))
            r["t_remap"].append(remap_time(r["mod"], xs, steps))

    load_end = os.getloadavg()[0]
    rows_out = []
    for r in runs:
        t, te, tr = (statistics.median(r[k]) for k in ("t", "t_ebc", "t_remap"))
        ratio = statistics.median(a / b for a, b in zip(r["t"], r["t_ebc"], strict=True))
        target = None if r["lookups"] is None else r["lookups"] + 0.3
        rows_out.append({
            "label": r["label"], "method": r["method"], "knobs": r["knobs"], "lookups_per_id": r["lookups"],
            "params": r["mod"].num_parameters(), "bytes": r["mod"].memory_bytes(),
            "ms": round(t * 1e3, 2), "ebc_ms": round(te * 1e3, 2), "ratio": round(ratio, 3),
            "ratios": [round(a / b, 3) for a, b in zip(r["t"], r["t_ebc"], strict=True)],
            "target": target, "meets_target": None if target is None else ratio <= target,
            "remap_share": round(tr / t, 3),
        })
    print(f"\nbatch {args.batch} x {len(feats)} features, single-id bags, dim {args.dim}, "
          f"budget {args.budget}, "
          f"{args.threads} thread(s), median of {args.reps} blocks of {args.steps} steps, "
          f"load average {load_start:.1f} at the start, {load_end:.1f} at the end")
    # MiB = memory_bytes() after training: tables plus any state (mch: its history buffer
    # grows with eviction_interval, the price of evicting less often)
    print(f"{'method':<13}{'params':>11}{'MiB':>8}{'ms':>9}{'EBC ms':>9}{'ratio':>8}{'target':>8}"
          f"{'ok':>5}{'remap':>8}")
    for o in rows_out:
        tgt = "-" if o["target"] is None else f"{o['target']:.1f}"
        ok = "-" if o["meets_target"] is None else ("yes" if o["meets_target"] else "NO")
        print(f"{o['label']:<13}{o['params']:>11,}{o['bytes'] / 2**20:>8.1f}{o['ms']:>9.1f}"
              f"{o['ebc_ms']:>9.1f}{o['ratio']:>8.2f}{tgt:>8}{ok:>5}{o['remap_share']:>8.0%}")
    result = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "cardinalities": cards,
              "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
              "cpus": os.cpu_count(), "load_average": [round(load_start, 2), round(load_end, 2)],
              "results": rows_out}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
