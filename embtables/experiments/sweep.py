"""Run a comparison: every cell is one ordinary `run()` in ``<sweep_dir>/<cell-id>/``.

Resumable by construction: a cell whose run directory says it is finished
(:meth:`RunDir.is_finished`) never runs again; a cell killed mid-training continues from
its last sound checkpoint (``run --resume``); anything else runs from the start. A cell
held by a live process (its run directory's lock) is left to it, never run twice. A cell
that raises is recorded as failed in its ``status.json`` (with the reason; the traceback
in ``error.txt``) and the sweep goes on. ``--jobs N`` runs N cells at once, each in its
own process with ``cores / N`` torch threads; killing the sweep (SIGTERM, Ctrl-C, even
SIGKILL) ends its workers, each after a checkpoint.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from embtables.experiments.jsonfile import read_json
from embtables.experiments.protocol import (
    PROTOCOL_FILE,
    choose_epochs,
    choose_init,
    choose_lr,
    group_key,
    protocol_record,
)
from embtables.experiments.report import build_report
from embtables.experiments.rundir import RunDir, RunDirBusy
from embtables.experiments.runner import run
from embtables.experiments.sweep_config import Cell, SweepPlan
from embtables.experiments.sweep_dir import (
    CELL_FILE,
    ERROR_FILE,
    PLAN_FILE,
    STATUS_FILE,
    SUMMARY_FILE,
    cell_state,
    write_json,
)
from embtables.logs import quiet_libraries


def default_sweep_dir(plan: SweepPlan) -> Path:
    return Path("runs") / plan.name


def default_threads(jobs: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, jobs))


# ---- one cell (runs in the sweep's process or in a worker) ------------------------------


def execute_cell(
    cell_dir: str, config: dict[str, Any], meta: dict[str, Any], threads: int | None
) -> dict[str, Any]:
    """Run one cell to completion or to a recorded failure; returns its status record."""

    cdir = Path(cell_dir)
    try:
        with RunDir(cdir).lock():
            return _execute_locked(cdir, config, meta, threads)
    except RunDirBusy as e:
        return {"status": "busy", "error": str(e)}
    finally:
        if _parent is not None and os.getppid() != _parent:
            os._exit(0)  # a worker of a sweep that died: its cell is recorded, nobody is left to report to


def _execute_locked(
    cdir: Path, config: dict[str, Any], meta: dict[str, Any], threads: int | None
) -> dict[str, Any]:
    if RunDir(cdir).is_finished():  # finished by another process since the sweep looked
        return read_json(cdir / STATUS_FILE) or {"status": "done"}
    write_json(cdir / CELL_FILE, meta)
    prev = read_json(cdir / STATUS_FILE) or {}
    status: dict[str, Any] = {
        "status": "running",
        "attempts": int(prev.get("attempts", 0)) + 1,
        "pid": os.getpid(),
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "started_ts": time.time(),
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
    except KeyboardInterrupt:  # SIGTERM / Ctrl-C: the run checkpointed; the next sweep resumes it
        status.update(status="interrupted", seconds=round(time.perf_counter() - t0, 3))
        write_json(cdir / STATUS_FILE, status)
        raise
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
    """An earlier attempt left a checkpoint (of any of its stages) to go on from."""
    return RunDir(cdir).has_progress()


def _clear_partial(cdir: Path) -> None:
    """What an attempt that never got to a checkpoint left (the cell's own records stay)."""
    rd = RunDir(cdir)
    if rd.is_empty():
        return
    for p in cdir.iterdir():
        if p.name in (CELL_FILE, STATUS_FILE, ERROR_FILE, ".lock"):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


_parent: int | None = None  # in a worker: the sweep's process


def _worker_init(threads: int, parent: int) -> None:
    global _parent
    _parent = parent
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    quiet_libraries()
    torch.set_num_threads(threads)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="watch-sweep").start()


def _watch_parent(parent: int, grace_s: float = 120.0) -> None:
    """A worker whose sweep died (even by SIGKILL) stops: SIGTERM to itself, so the running
    cell checkpoints and records itself as interrupted, then exits."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os._exit(1)


# ---- the sweep ----------------------------------------------------------------------------


def write_plan(plan: SweepPlan, sweep_dir: Path, tuning: list[Cell] | None = None) -> None:
    """``sweep.json``: the reported cells (``cells``), the protocol's tuning cells
    (``tuning``, each with its ``stage``) and the base config."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        sweep_dir / PLAN_FILE,
        {
            "name": plan.name,
            "source": plan.source,
            "quick": plan.quick,
            "methods": plan.method_labels,
            "budgets": [b.label for b in plan.budgets],
            "seeds": plan.seeds,
            "reference": plan.reference,
            "protocol": plan.protocol.to_json() if plan.protocol else None,
            "cells": [c.meta() for c in plan.cells],
            "tuning": [{**c.meta(), "stage": c.stage} for c in tuning or []],
            "base_config": plan.base.model_dump(mode="json"),
        },
    )


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

    Under a protocol (``plan.protocol``) the tuning cells run first, stage by stage
    (:mod:`embtables.experiments.protocol`), the choices go to ``protocol.json``, and
    then the reported cells run with them. A stage that cannot finish (a cell held by
    another process, or no candidate with a validation AUC) stops the sweep there: the
    next invocation goes on from it.

    Returns ``{"sweep_dir", "ran", "already_finished", "failed", "results", ...}``.
    """
    sweep_dir = Path(sweep_dir) if sweep_dir is not None else default_sweep_dir(plan)
    threads = threads or default_threads(jobs)
    totals = {"done": 0, "failed": 0, "busy": 0, "already": 0}
    seen: set[str] = set()

    def stage(cells: list[Cell], desc: str) -> None:
        c = _run_cells(
            cells,
            sweep_dir,
            jobs=jobs,
            threads=threads,
            retry_failed=retry_failed,
            progress=progress,
            on_cell_done=on_cell_done,
            desc=desc,
        )
        for k in totals:
            totals[k] += c[k]
        seen.update(x.cell_id for x in cells)

    complete = True
    try:
        if plan.protocol is None:
            write_plan(plan, sweep_dir)
            stage(plan.cells, f"compare {plan.name}")
        else:
            complete = _run_protocol(plan, sweep_dir, stage, progress)
    except KeyboardInterrupt:
        print(
            f"\n== compare interrupted; finished cells are kept and interrupted ones checkpointed: run the "
            f"same command again to continue ({sweep_dir})",
            file=sys.stderr,
            flush=True,
        )
        raise
    out: dict[str, Any] = {
        "sweep_dir": str(sweep_dir),
        "cells": len(seen),
        "ran": totals["done"] + totals["failed"],
        "already_finished": totals["already"],
        "done": totals["done"],
        "failed": totals["failed"],
        "busy": totals["busy"],
        "protocol_complete": complete,
    }
    if report:
        out.update(build_report(sweep_dir))
    return out


def _run_protocol(
    plan: SweepPlan, sweep_dir: Path, stage: Callable[[list[Cell], str], None], progress: bool
) -> bool:
    """The protocol's stages; False if it stopped before the reported cells."""
    assert plan.protocol is not None
    tunes_init = any(plan.protocol.tunes_init(a.method) for a in plan.axes)
    n = 4 if tunes_init else 3
    ep_cells = plan.epoch_cells()
    write_plan(plan, sweep_dir, ep_cells)
    stage(ep_cells, f"compare {plan.name} [1/{n} epochs]")
    epochs, ep_rec, waiting = choose_epochs(
        ep_cells, _summaries(sweep_dir, ep_cells), _failed(sweep_dir, ep_cells)
    )
    if waiting:
        write_json(sweep_dir / PROTOCOL_FILE, protocol_record(plan, ep_rec, None, complete=False))
        _say_waiting(progress, "the epochs", [group_key(g) for g in waiting], sweep_dir)
        return False
    tuning = ep_cells

    def factor_stage(cells: list[Cell], desc: str, choose, what: str, record) -> tuple | None:
        """Run one factor stage's cells and make its choice; None (protocol.json written,
        the user told) while a choice cannot be made yet."""
        nonlocal tuning
        tuning = _union(tuning, cells)
        write_plan(plan, sweep_dir, tuning)
        stage(cells, desc)
        chosen, rec, waiting = choose(cells, _summaries(sweep_dir, cells), _failed(sweep_dir, cells))
        if waiting:
            write_json(sweep_dir / PROTOCOL_FILE, record(rec))
            _say_waiting(progress, what, [f"{k[2]} ({group_key(k[:2])})" for k in waiting], sweep_dir)
            return None
        return chosen, rec

    got = factor_stage(plan.lr_cells(epochs), f"compare {plan.name} [2/{n} learning rates]", choose_lr,
                       "the learning rates", lambda r: protocol_record(plan, ep_rec, r, complete=False))
    if got is None:
        return False
    lrs, lr_rec = got
    inits: dict[tuple[str, str, str], float] = {}
    init_rec: dict[str, Any] | None = None
    if tunes_init:
        got = factor_stage(
            plan.init_cells(epochs, lrs), f"compare {plan.name} [3/{n} init scales]", choose_init,
            "the init scales", lambda r: protocol_record(plan, ep_rec, lr_rec, complete=False, init_rec=r))
        if got is None:
            return False
        inits, init_rec = got
    write_json(
        sweep_dir / PROTOCOL_FILE, protocol_record(plan, ep_rec, lr_rec, complete=True, init_rec=init_rec)
    )
    plan.cells = plan.build_cells(epochs, lrs, inits)
    write_plan(plan, sweep_dir, tuning)
    stage(plan.cells, f"compare {plan.name} [{n}/{n} reported cells]")
    return True


def _union(cells: list[Cell], more: list[Cell]) -> list[Cell]:
    ids = {c.cell_id for c in cells}
    return cells + [c for c in more if c.cell_id not in ids]


def _say_waiting(progress: bool, what: str, items: list[str], sweep_dir: Path) -> None:
    print(
        f"== protocol: {what} cannot be chosen yet for {', '.join(items)} (a tuning cell is held by another "
        f"process, or none finished with a validation AUC; see {sweep_dir / PROTOCOL_FILE}); the reported "
        "cells wait: run the same command again to go on",
        file=sys.stderr,
        flush=True,
    )


def _summaries(sweep_dir: Path, cells: list[Cell]) -> dict[str, dict[str, Any] | None]:
    return {
        c.cell_id: read_json(sweep_dir / c.cell_id / SUMMARY_FILE)
        if cell_state(sweep_dir / c.cell_id) == "done"
        else None
        for c in cells
    }


def _failed(sweep_dir: Path, cells: list[Cell]) -> set[str]:
    return {c.cell_id for c in cells if cell_state(sweep_dir / c.cell_id) in ("failed", "skipped")}


def _run_cells(
    cells: list[Cell],
    sweep_dir: Path,
    *,
    jobs: int,
    threads: int,
    retry_failed: bool,
    progress: bool,
    on_cell_done: Callable[[Cell, dict[str, Any]], None] | None,
    desc: str,
) -> dict[str, int]:
    """Run the unfinished ones of ``cells`` (each once, even if listed twice)."""
    todo: list[Cell] = []
    already = 0
    busy: list[str] = []
    listed: set[str] = set()
    for cell in cells:
        if cell.cell_id in listed:
            continue
        listed.add(cell.cell_id)
        cdir = sweep_dir / cell.cell_id
        state = cell_state(cdir)
        holder = RunDir(cdir).held_by_other() if state != "done" else None
        if holder is not None:
            busy.append(cell.cell_id)
            if progress:
                print(f"busy {cell.cell_id}: in use by {holder}; left to it", file=sys.stderr)
        elif cell.skip_reason is not None:
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
    bar = tqdm(
        total=len(listed),
        initial=already,
        unit="cell",
        desc=desc,
        disable=not progress,
        dynamic_ncols=True,
        smoothing=0.0,
    )
    counts = {"done": 0, "failed": 0, "busy": len(busy), "already": already}

    def finished(cell: Cell, st: dict[str, Any]) -> None:
        if st["status"] == "busy":  # taken by another process after the scan above
            counts["busy"] += 1
            bar.write(f"busy {cell.cell_id}: {st['error']}") if progress else None
            return
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
        with _sigterm_interrupts():
            if jobs <= 1:
                for cell in todo:
                    bar.set_postfix(ok=counts["done"], failed=counts["failed"], now=cell.cell_id[:40])
                    st = execute_cell(
                        str(sweep_dir / cell.cell_id),
                        cell.config.model_dump(mode="json"),
                        cell.meta(),
                        threads,
                    )
                    finished(cell, st)
            else:
                _run_parallel(todo, sweep_dir, jobs, threads, finished)
    finally:
        bar.close()
    return counts


def _run_parallel(
    todo: list[Cell],
    sweep_dir: Path,
    jobs: int,
    threads: int,
    finished: Callable[[Cell, dict[str, Any]], None],
) -> None:
    """A process pool whose death (OOM kill, segfault in a worker) fails only the
    cells that were running in it; the others go to a fresh pool."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch's thread pools
    pending = list(todo)
    while pending:
        pool_started = time.time()
        pool = ProcessPoolExecutor(
            max_workers=jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads, os.getpid())
        )
        futures: dict[Future, Cell] = {}
        reported: set[str] = set()
        try:
            for cell in pending:
                fut = pool.submit(
                    execute_cell,
                    str(sweep_dir / cell.cell_id),
                    cell.config.model_dump(mode="json"),
                    cell.meta(),
                    threads,
                )
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
                    st.update(
                        status="failed",
                        error="worker process died (killed, out of memory or crashed)",
                        error_type="WorkerDied",
                    )
                    write_json(cdir / STATUS_FILE, st)
                    finished(cell, st)
                else:
                    pending.append(cell)  # never started: try again in a fresh pool
            if len(pending) == len(futures):
                raise RuntimeError(
                    "the sweep's worker processes died before running any cell; try --jobs 1 to see the error"
                ) from None
        except KeyboardInterrupt:
            _stop_workers(pool)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _stop_workers(pool: ProcessPoolExecutor, grace_s: float = 60.0) -> None:
    """SIGTERM every worker (each running cell checkpoints and stops), then wait for them."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGTERM)
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


class _Terminated(KeyboardInterrupt):
    pass


@contextmanager
def _sigterm_interrupts():
    """SIGTERM to the sweep's process is handled like Ctrl-C (its workers are stopped)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise _Terminated("SIGTERM")

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
