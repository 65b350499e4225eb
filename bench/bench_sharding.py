"""Training throughput through TorchRec's planner + DMP at 1 and 2 local processes (CPU).

    python bench/bench_sharding.py [--rows 100000] [--methods full,hash]

Runs the quickstart-dist config (DLRM, dim 16) through the runner with `--nproc` 1 and 2
for `full` and one compressed method, prints samples/s side by side and writes
bench/results/sharding.json. On a 2-core machine 2 processes are expected to be slower
(gloo collectives on loopback); the point of the multi-process path is correctness.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from embtables.experiments.launch_run import _run_rank
from embtables.sharding.launch import launch

BUDGET = {"full": None, "hash": 0.1, "qr": 0.1, "unified": 0.1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000, help="training rows per run")
    ap.add_argument("--methods", default="full,hash")
    ap.add_argument("--nprocs", default="1,2")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sharding.json"))
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-sharding-") as tmp:
        for method in args.methods.split(","):
            for nproc in (int(n) for n in args.nprocs.split(",")):
                overrides = [f"embedding.method={method}", f"data.max_train_rows={args.rows}",
                             "data.max_eval_rows=20000", "train.progress=false", "train.checkpoint=false"]
                if BUDGET.get(method) is not None:
                    overrides.append(f"embedding.budget={BUDGET[method]}")
                run_dir = str(Path(tmp) / f"{method}-{nproc}")
                t0 = time.monotonic()
                summary = launch(_run_rank, nproc, ("quickstart-dist", overrides, run_dir, None))[0]
                row = {"method": method, "nproc": nproc, "samples_per_second": summary["samples_per_second"],
                       "train_seconds": summary["train_seconds"], "auc": summary["auc"],
                       "wall_seconds": round(time.monotonic() - t0, 1),
                       "train_samples": summary["train_samples"]}
                results.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'method':<8} " + " ".join(f"{f'{n} proc samples/s':>20}" for n in args.nprocs.split(",")))
    for method in args.methods.split(","):
        cells = [f"{r['samples_per_second']:>20,.0f}" for r in results if r["method"] == method]
        print(f"{method:<8} " + " ".join(cells))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                               "config": "quickstart-dist", "rows": args.rows, "results": results},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
