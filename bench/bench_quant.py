"""Serving tables quantized: AUC, bytes and inference speed at fp32 / fp16 / int8 / int4 / int2.

    python bench/bench_quant.py [--methods hash,qr,...] [--budgets 1/4,1/16] [--rows 200000]

For each method and budget it trains one small run (quickstart: DLRM, dim 16, on
data/synth-criteo, ``data.max_train_rows`` rows, seed 0; a finished run in --runs is
reused), loads its checkpoint once, and converts its tables with the same code as
``embtables export`` (embeddings/quantize.py) to each serving dtype. Per dtype: test AUC by
scikit-learn on the first --eval-rows test rows, the embedding module's ``memory_bytes()``
(read from the quantized storage, row padding included), and forward samples/s of the
whole model on the same in-memory batches, fp32 and every dtype measured in interleaved
rounds in this one process (ratios to fp32; the best of the rounds). A second table gives
the serving bytes of the same modules at dim 16 and dim 64 (built, not trained: bytes do not
depend on training) at row alignments 16 (TorchRec's default) and 4. Training memory (fp32
tables + the optimizer's state) is reported apart from serving bytes.
Writes bench/results/quant.json and bench/results/quant.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from embtables.datasets.reader import BatchReader
from embtables.datasets.schema import load_schema
from embtables.embeddings import build, features_from_schema
from embtables.embeddings.quantize import NotQuantizable, quantize_tables
from embtables.experiments import run
from embtables.experiments.export import embedding_modules, load_trained, quantize_model, score
from embtables.experiments.rundir import RunDir

DTYPES = ("fp32", "fp16", "int8", "int4", "int2")
# Methods whose default knobs do not build on the synthetic data (the shipped comparison's).
KNOBS = {"hybrid": {"counts": "data/synth-criteo/id_counts.npz"}, "qr": {"operation": "mult"}}
# Settings of a method's training stages (not module knobs): OptEmbed's search shortened as in
# the quick comparison (budget-synth-criteo's sweep.quick.knobs).
STAGE_KNOBS = {"optembed": {"population": 8, "mutation_num": 4, "crossover_num": 4, "parents": 4,
                            "search_iterations": 4, "search_rows": 20000}}
KERNEL = "fp32 kernel"  # unquantized rows in TorchRec's inference kernels: the speed of the kernel alone
DEFAULT_METHODS = "hash,qr,unified,mch,tt,mde,hybrid,dhe,optembed"


def _train(method: str, budget: str, rows: int, runs: Path) -> Path:
    rd = runs / f"{method}-{budget.replace('/', 'over')}"
    if RunDir(rd).is_finished():
        return rd
    over = {"embedding.method": method, "embedding.budget": budget, "data.max_train_rows": rows,
            "data.max_eval_rows": 20000, "train.progress": False}
    knobs = {**KNOBS.get(method, {}), **STAGE_KNOBS.get(method, {})}
    if knobs:
        over[f"embedding.{method}"] = knobs
    run("quickstart", overrides=over, run_dir=rd, quiet=True, overwrite=rd.exists())
    return rd


def _batches(data: Path, n: int, size: int) -> list:
    reader = BatchReader(data, split="test", batch_size=size, shuffle=False, seed=0, rank=0, world_size=1,
                         drop_last=True, prefetch=0)
    out = []
    for b in reader:
        out.append(b)
        if len(out) == n:
            break
    return out


@torch.no_grad()
def _speeds(models: dict[str, torch.nn.Module], batches: list, rounds: int) -> dict[str, float]:
    """Samples/s per model on the same batches, interleaved rounds, best round."""
    best = dict.fromkeys(models, 0.0)
    n = sum(b.labels.numel() for b in batches)
    for m in models.values():  # warm-up
        m(batches[0].dense_features, batches[0].sparse_features)
    for _ in range(rounds):
        for k, m in models.items():
            t = time.perf_counter()
            for b in batches:
                m(b.dense_features, b.sparse_features)
            best[k] = max(best[k], n / (time.perf_counter() - t))
    return best


def _cell(method: str, budget: str, args) -> dict:
    t0 = time.monotonic()
    rd = _train(method, budget, args.rows, Path(args.runs))
    model, cfg, schema, rdir, _ = load_trained(rd)
    summary = rdir.summary() or {}
    models = {"fp32": model}
    errors = {}
    for dt in (*DTYPES[1:], "fp32"):
        try:
            models[dt if dt != "fp32" else KERNEL] = quantize_model(model, dt)
        except ValueError as e:
            errors[dt] = str(e)
    out = {"method": method, "budget": budget, "train_seconds": summary.get("train_seconds"),
           "training_bytes": {"tables": summary.get("embedding_bytes"),
                              "optimizer_state": summary.get("optimizer_state_bytes")},
           "has_tables": all(m.has_tables for m in embedding_modules(model).values()), "dtypes": {},
           "errors": errors}
    for dt, m in models.items():
        if dt == KERNEL:
            continue
        p, y = score(m, args.data, "test", 16384, max_rows=args.eval_rows)
        out["dtypes"][dt] = {"auc": float(roc_auc_score(y, p)),
                             "bytes": int(sum(e.memory_bytes() for e in embedding_modules(m).values()))}
    sp = _speeds(models, _batches(Path(args.data), args.speed_batches, 4096), args.rounds)
    for dt, s in sp.items():
        out["dtypes"].setdefault(dt, {})["samples_per_s"] = s
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def _bytes_by_dim(methods: list[str], budgets: list[str], data: Path) -> list[dict]:
    feats = features_from_schema(load_schema(data))
    rows = []
    for method in methods:
        for budget in budgets:
            for dim in (16, 64):
                torch.manual_seed(0)
                try:
                    emb = build(feats, method=method, dim=dim, budget=budget, **KNOBS.get(method, {})).eval()
                except ValueError as e:
                    rows.append({"method": method, "budget": budget, "dim": dim, "error": str(e)[:120]})
                    continue
                rec = {"method": method, "budget": budget, "dim": dim, "fp32": int(emb.memory_bytes())}
                for align in (16, 4):
                    for dt in DTYPES[1:]:
                        try:
                            q = quantize_tables(copy.deepcopy(emb), dt, row_alignment=align)
                        except NotQuantizable:  # e.g. 4-wide mde tables at int2: refused, not counted
                            rec[f"{dt}@{align}"] = None
                            continue
                        rec[f"{dt}@{align}"] = int(q.memory_bytes())
                rows.append(rec)
                del emb
    return rows


SPEED = (KERNEL, *DTYPES[1:])


def _mib(b: int) -> str:
    return f"{b / 2**20:.2f}"


def _markdown(cells: list[dict], by_dim: list[dict], header: str) -> str:
    lines = [header, "", "| method | budget | " + " | ".join(f"AUC {d}" for d in DTYPES) + " | "
             + " | ".join(f"MiB {d}" for d in DTYPES) + " | " + " | ".join(f"speed {d}" for d in SPEED)
             + " |", "| --- | --- | " + "---: | " * (2 * len(DTYPES) + len(SPEED))]
    for c in cells:
        d = c["dtypes"]
        auc = " | ".join(f"{d[t]['auc']:.4f}" if t in d else "-" for t in DTYPES)
        mib = " | ".join(_mib(d[t]["bytes"]) if t in d else "-" for t in DTYPES)
        fp = d["fp32"]["samples_per_s"]
        speed = " | ".join(f"{d[t]['samples_per_s'] / fp:.2f}x" if t in d else "-" for t in SPEED)
        lines.append(f"| `{c['method']}` | {c['budget']} | {auc} | {mib} | {speed} |")
    lines += ["", "fp32 forward samples/s (the speed ratios' base): "
              + ", ".join(f"`{c['method']}`@{c['budget']} {c['dtypes']['fp32']['samples_per_s']:,.0f}"
                          for c in cells), ""]
    lines += ["Training memory (fp32 tables + optimizer state), apart from serving bytes:", "",
              "| method | budget | fp32 tables MiB | optimizer state MiB |", "| --- | --- | ---: | ---: |"]
    for c in cells:
        tb = c["training_bytes"]
        if tb["tables"] is not None:
            lines.append(f"| `{c['method']}` | {c['budget']} | {_mib(tb['tables'])} | "
                         f"{_mib(tb['optimizer_state'] or 0)} |")
    cols = [f"{d}@{a}" for a in (16, 4) for d in DTYPES[1:]]
    lines += ["", "Serving bytes as % of fp32, at dim 16 and 64, row alignment 16 (default) and 4:", "",
              "| method | budget | dim | fp32 MiB | "
              + " | ".join(f"{c.replace('@', ' align ')}" for c in cols)
              + " |", "| --- | --- | ---: | ---: | " + "---: | " * len(cols)]
    for r in by_dim:
        if "error" in r:
            lines.append(f"| `{r['method']}` | {r['budget']} | {r['dim']} | not built: {r['error']} |")
            continue
        pct = " | ".join("refused" if r[c] is None else f"{100 * r[c] / r['fp32']:.1f} %" for c in cols)
        lines.append(f"| `{r['method']}` | {r['budget']} | {r['dim']} | {_mib(r['fp32'])} | {pct} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--budgets", default="1/4,1/16")
    ap.add_argument("--data", default="data/synth-criteo")
    ap.add_argument("--rows", type=int, default=200_000, help="data.max_train_rows of each training run")
    ap.add_argument("--eval-rows", type=int, default=100_000, help="test rows for the AUC")
    ap.add_argument("--speed-batches", type=int, default=8, help="batches of 4096 for the speed rounds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", default="runs/bench-quant", help="training runs (a finished one is reused)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "quant.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods, budgets = args.methods.split(","), args.budgets.split(",")
    cells = []
    for method in methods:
        for budget in budgets:
            c = _cell(method, budget, args)
            cells.append(c)
            print(json.dumps(c), flush=True)
    by_dim = _bytes_by_dim(methods, budgets, Path(args.data))
    load = os.getloadavg()[0]
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    commit = git.stdout.strip()
    header = (f"`python bench/bench_quant.py --methods {args.methods} --budgets {args.budgets} "
              f"--rows {args.rows} --rounds {args.rounds}` "
              f"on {datetime.now(timezone.utc):%Y-%m-%d}, commit `{commit}`, {os.cpu_count()}-core "
              f"{platform.machine()} ({platform.system()}), torch {torch.__version__}, "
              f"{args.threads} thread(s), "
              f"load average {load:.1f} at the end")
    md = _markdown(cells, by_dim, header)
    print("\n" + md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"header": header, "cells": cells, "bytes_by_dim": by_dim,
                               "aucs_within": _spread(cells)}, indent=2) + "\n")
    out.with_suffix(".md").write_text(md)
    print(f"wrote {out} and {out.with_suffix('.md')}")


def _spread(cells: list[dict]) -> dict[str, float]:
    """Largest |AUC(dtype) - AUC(fp32)| over the cells, per dtype."""
    return {dt: float(np.max([abs(c["dtypes"][dt]["auc"] - c["dtypes"]["fp32"]["auc"]) for c in cells
                              if "auc" in c["dtypes"].get(dt, {})] or [np.nan])) for dt in DTYPES[1:]}


if __name__ == "__main__":
    main()
