"""N local processes, torchrun-style (what `embtables run CONFIG --nproc N` runs on).

``launch(fn, nproc, args)`` starts N spawned processes, each with the environment
torchrun would give it (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), so ``init_distributed()`` inside ``fn`` joins one gloo/NCCL group. It
returns every rank's return value. When one rank fails, every other rank is ended at
once and ``LaunchError`` carries the failing rank's traceback: a rank blocked in a
collective with a dead peer never hangs the launcher.

Several machines: use torchrun itself, which sets the same variables, e.g.::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \
        --rdzv-endpoint HOST0:29500 --rdzv-id myjob -m embtables.cli run CONFIG

(`launch_run`, the runner on each rank, is in ``embtables.experiments.launch_run``.)
"""

from __future__ import annotations

import gc
import os
import queue
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch.multiprocessing as mp

STOP_GRACE_S = 120.0


class LaunchError(RuntimeError):
    """A rank failed (or the launch timed out); the message holds that rank's error."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


class LaunchInterrupted(KeyboardInterrupt):
    """SIGTERM or Ctrl-C stopped every rank (each after its part of a checkpoint)."""

    @property
    def exit_code(self) -> int:
        return 143 if "SIGTERM" in str(self) else 130


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable, rank: int, nproc: int, env: dict[str, str], args: Sequence[Any], results) -> None:
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank)})
    try:
        out = fn(*args)
        results.put((rank, True, out))
    except KeyboardInterrupt as e:  # stopped on request (SIGTERM/Ctrl-C), resumable
        results.put((rank, "interrupted", str(e) or "interrupted"))
    except BaseException as e:  # noqa: BLE001 - reported to the launcher, which ends every rank
        results.put((rank, False, f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}"))
    finally:
        # Leave the process group so that the ok ranks exit promptly. Sharded models refer to
        # the group from inside reference cycles: collect them first, so that the group (and
        # gloo's threads) goes now rather than during interpreter exit, which can abort.
        try:
            import torch.distributed as dist

            gc.collect()
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def launch(
    fn: Callable[..., Any],
    nproc: int,
    args: Sequence[Any] = (),
    *,
    timeout_s: float | None = None,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    threads_per_proc: int | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` in ``nproc`` local processes; returns the results by rank.

    ``fn`` and ``args`` must be picklable (a module-level function). ``timeout_s``
    bounds the whole launch (None: no bound; a failing rank still ends all at once).
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    threads = threads_per_proc or max(1, (os.cpu_count() or 1) // nproc)
    env = {
        "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0",
        "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port or free_port()),
        # Oversubscribed cores make gloo 5-60x slower (TORCHREC-NOTES.md).
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
    }
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(fn, r, nproc, env, args, results), daemon=False)
             for r in range(nproc)]
    for p in procs:
        p.start()
    done: dict[int, Any] = {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    stopping: list[float] = []  # when SIGTERM/Ctrl-C came: ranks get a grace period to checkpoint

    def forward(signum=None, frame=None) -> None:
        if not stopping:
            stopping.append(time.monotonic())
        for p in procs:
            if p.is_alive() and p.pid:
                os.kill(p.pid, signal.SIGTERM)

    main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, forward) if main else None
    try:
        while len(done) < nproc:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except KeyboardInterrupt:  # Ctrl-C: the ranks got it too and are checkpointing
                forward()
                continue
            except queue.Empty:
                if stopping and time.monotonic() - stopping[0] > STOP_GRACE_S:
                    raise LaunchInterrupted(
                        "stopped; some ranks did not finish their checkpoint in time") from None
                # A rank that died without reporting (killed, segfault, os._exit).
                for r, p in enumerate(procs):
                    if r not in done and p.exitcode not in (None, 0):
                        time.sleep(0.5)  # its report may still be in the queue
                        if results.empty():
                            raise LaunchError(
                                f"rank {r} died with exit code {p.exitcode} and no report", r) from None
                        break
                if deadline is not None and time.monotonic() > deadline:
                    raise LaunchError(
                        f"launch timed out after {timeout_s:.0f} s; ranks done: {sorted(done)}") from None
                continue
            if ok == "interrupted":
                raise LaunchInterrupted(payload)
            if not ok:
                raise LaunchError(f"rank {rank} of {nproc} failed: {payload}", rank)
            done[rank] = payload
    finally:
        if main:
            signal.signal(signal.SIGTERM, old_term)
        if stopping:  # let every rank finish its part of the checkpoint before ending it
            for p in procs:
                p.join(timeout=max(0.1, STOP_GRACE_S - (time.monotonic() - stopping[0])))
        for p in procs:
            p.join(timeout=5 if len(done) == nproc else 0.5)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [done[r] for r in range(nproc)]
