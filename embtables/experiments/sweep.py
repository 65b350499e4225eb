"""Run a comparison: every cell is one ordinary `run()` in ``<sweep_dir>/<cell-id>/``.

Resumable by construction: a cell with a ``summary.json`` is finished and never runs
again; a cell killed mid-training continues from its last checkpoint; anything else
(new, failed, interrupted before a checkpoint) runs from the start. A cell that raises
is recorded as failed in its ``status.json`` (with the reason; the traceback in
``error.txt``) and the sweep goes on. ``--jobs N`` runs N cells at once, each in its own
process with ``cores / N`` torch threads.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from embtables.experiments import jsonfile
from embtables.experiments.jsonfile import read_json
from embtables.experiments.sweep_config import Cell, SweepPlan

PLAN_FILE = "sweep.json"
CELL_FILE = "cell.json"
STATUS_FILE = "status.json"
SUMMARY_FILE = "summary.json"
ERROR_FILE = "error.txt"
# Sweep records (cell metadata, knobs, statuses) may hold values JSON has no type for: they
# are written as their str().
write_json = partial(jsonfile.write_json, default=str)


def cell_state(cell_dir: Path) -> str:
    """done | failed | skipped | running | pending (from the files alone)."""
    if (cell_dir / SUMMARY_FILE).exists():
        return "done"
    st = read_json(cell_dir / STATUS_FILE)
    return st["status"] if st and st.get("status") in ("failed", "skipped", "running") else "pending"


def default_sweep_dir(plan: SweepPlan) -> Path:
    return Path("runs") / plan.name


def default_threads(jobs: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, jobs))


# ---- one cell (runs in the sweep's process or in a worker) ------------------------------


def execute_cell(cell_dir: str, config: dict[str, Any], meta: dict[str, Any], threads: int | None) -> dict[str, Any]:
    """Run one cell to completion or to a recorded failure; returns its status record."""
    from embtables.experiments.runner import run

    cdir = Path(cell_dir)
    cdir.mkdir(parents=True, exist_ok=True)
    write_json(cdir / CELL_FILE, meta)
    prev = read_json(cdir / STATUS_FILE) or {}
    status: dict[str, Any] = {
        "status": "running", "attempts": int(prev.get("attempts", 0)) + 1, "pid": os.getpid(),
        "host": platform.node(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "started_ts": time.time(),
    }
    write_json(cdir / STATUS_FILE, status)
    (cdir / ERROR_FILE).unlink(missing_ok=True)
    overrides: dict[str, Any] = {"train.progress": False}
    if threads and not config.get("train", {}).get("threads"):
        overrides["train.threads"] = threads
    t0 = time.perf_counter()
    try:
        if _resumable(cdir):
            # Go on from the last checkpoint. If that fails, the cell fails: rerunning from
            # scratch would mostly repeat a deterministic error at twice the cost; delete the
            # cell's directory to start it over.
            status["resumed"] = True
            summary = run(None, resume=cdir, quiet=True)
        else:
            _clear_partial(cdir)
            summary = run(config, overrides=overrides, run_dir=cdir, quiet=True)
        status.update(status="done", auc=summary.get("auc"))
    except Exception as e:  # noqa: BLE001 - a failing cell is a result, not the sweep's end
        status.update(status="failed", error=f"{type(e).__name__}: {e}", error_type=type(e).__name__)
        if getattr(e, "minimum", None) is not None:  # BudgetTooSmall names the method's minimum
            status["min_bytes"] = int(e.minimum)
        (cdir / ERROR_FILE).write_text(traceback.format_exc())
    status["seconds"] = round(time.perf_counter() - t0, 3)
    status["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(cdir / STATUS_FILE, status)
    return status


def _resumable(cdir: Path) -> bool:
    """An earlier attempt left a checkpoint (or, for OptEmbed, finished stages) to go on from."""
    from embtables.experiments.runner import latest_checkpoint

    if not (cdir / "config.yaml").exists():
        return False
    return latest_checkpoint(cdir) is not None or (cdir / "optembed" / "supernet").exists()


def _clear_partial(cdir: Path) -> None:
    """Outputs of an interrupted attempt (metrics are appended, and OptEmbed refuses a
    directory holding an earlier run's stages, so they must go)."""
    for name in ("metrics.jsonl", SUMMARY_FILE):
        (cdir / name).unlink(missing_ok=True)
    for name in ("checkpoints", "tensorboard", "optembed"):
        shutil.rmtree(cdir / name, ignore_errors=True)


def _worker_init(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    from embtables.cli import _quiet_libraries

    _quiet_libraries()
    torch.set_num_threads(threads)


# ---- the sweep ----------------------------------------------------------------------------


def write_plan(plan: SweepPlan, sweep_dir: Path) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(sweep_dir / PLAN_FILE, {
        "name": plan.name, "source": plan.source, "quick": plan.quick,
        "methods": plan.method_labels, "budgets": [b.label for b in plan.budgets],
        "cells": [c.meta() for c in plan.cells],
        "base_config": plan.base.model_dump(mode="json"),
    })


def run_sweep(
    plan: SweepPlan,
    sweep_dir: str | Path | None = None,
    *,
    jobs: int = 1,
    threads: int | None = None,
    retry_failed: bool = True,
    progress: bool = True,
    report: bool = True,
    on_cell_done: Callable[[Cell, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every unfinished cell of ``plan``; then write results and the report.

    Returns ``{"sweep_dir", "ran", "skipped_done", "failed", "results", ...}``.
    """
    sweep_dir = Path(sweep_dir) if sweep_dir is not None else default_sweep_dir(plan)
    write_plan(plan, sweep_dir)
    threads = threads or default_threads(jobs)
    todo: list[Cell] = []
    already = 0
    for cell in plan.cells:
        cdir = sweep_dir / cell.cell_id
        state = cell_state(cdir)
        if cell.skip_reason is not None:
            cdir.mkdir(parents=True, exist_ok=True)
            write_json(cdir / CELL_FILE, cell.meta())
            write_json(cdir / STATUS_FILE, {"status": "skipped", "error": cell.skip_reason})
            already += 1
        elif state == "done" or (state == "failed" and not retry_failed):
            st = read_json(cdir / STATUS_FILE) or {}
            if state == "done" and st.get("status") != "done":
                # Killed between writing summary.json and status.json: the run finished.
                summary = read_json(cdir / SUMMARY_FILE) or {}
                st.update(status="done", auc=summary.get("auc"), repaired=True)
                write_json(cdir / STATUS_FILE, st)
            already += 1
        else:
            todo.append(cell)
    bar = tqdm(total=len(plan.cells), initial=already, unit="cell", desc=f"compare {plan.name}",
               disable=not progress, dynamic_ncols=True, smoothing=0.0)
    counts = {"done": 0, "failed": 0}

    def finished(cell: Cell, st: dict[str, Any]) -> None:
        counts["done" if st["status"] == "done" else "failed"] += 1
        if st["status"] == "done":
            auc = st.get("auc")
            msg = f"ok   {cell.cell_id}: auc={auc:.4f}" if auc is not None else f"ok   {cell.cell_id}"
        else:
            msg = f"FAIL {cell.cell_id}: {st.get('error', '?')}".split("\n")[0][:300]
        bar.write(f"{msg}  ({st.get('seconds', 0):.0f}s)") if progress else None
        bar.set_postfix(ok=counts["done"], failed=counts["failed"])
        bar.update(1)
        if on_cell_done is not None:
            on_cell_done(cell, st)

    try:
        if jobs <= 1:
            for cell in todo:
                bar.set_postfix(ok=counts["done"], failed=counts["failed"], now=cell.cell_id[:40])
                st = execute_cell(str(sweep_dir / cell.cell_id), cell.config.model_dump(mode="json"),
                                  cell.meta(), threads)
                finished(cell, st)
        else:
            _run_parallel(todo, sweep_dir, jobs, threads, finished)
    finally:
        bar.close()
    out: dict[str, Any] = {"sweep_dir": str(sweep_dir), "cells": len(plan.cells), "ran": len(todo),
                           "already_finished": already, **counts}
    if report:
        from embtables.experiments.report import build_report

        out.update(build_report(sweep_dir))
    return out


def _run_parallel(todo: list[Cell], sweep_dir: Path, jobs: int, threads: int,
                  finished: Callable[[Cell, dict[str, Any]], None]) -> None:
    """A process pool whose death (OOM kill, segfault in a worker) fails only the
    cells that were running in it; the others go to a fresh pool."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch's thread pools
    pending = list(todo)
    while pending:
        pool_started = time.time()
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads,))
        futures: dict[Future, Cell] = {}
        reported: set[str] = set()
        try:
            for cell in pending:
                fut = pool.submit(execute_cell, str(sweep_dir / cell.cell_id), cell.config.model_dump(mode="json"),
                                  cell.meta(), threads)
                futures[fut] = cell
            pending = []
            remaining = set(futures)
            while remaining:
                done, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                for fut in done:
                    st = fut.result()
                    reported.add(futures[fut].cell_id)
                    finished(futures[fut], st)
        except BrokenProcessPool:
            for cell in futures.values():
                if cell.cell_id in reported:
                    continue
                cdir = sweep_dir / cell.cell_id
                st = read_json(cdir / STATUS_FILE) or {}
                state = cell_state(cdir)
                if state in ("done", "failed") and st.get("started_ts", 0) >= pool_started:
                    finished(cell, st)  # finished in this pool before it broke
                elif state == "running" and st.get("started_ts", 0) >= pool_started:
                    st.update(status="failed", error="worker process died (killed, out of memory or crashed)",
                              error_type="WorkerDied")
                    write_json(cdir / STATUS_FILE, st)
                    finished(cell, st)
                else:
                    pending.append(cell)  # never started: try again in a fresh pool
            if len(pending) == len(futures):
                raise RuntimeError("the sweep's worker processes died before running any cell; "
                                   "try --jobs 1 to see the error") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
