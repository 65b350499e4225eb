"""Fixed fault points, for the reliability tests: ``EMBTABLES_FAULT`` makes one of them fail.

The product calls :func:`hit` at a few fixed places (after each checkpoint file is
written, after each training step, ...). Unset, a call costs one dictionary look-up.
Set, the variable names the points to trip, comma-separated::

    EMBTABLES_FAULT="ckpt_write:3"          the 3rd pass through ckpt_write fails (ENOSPC)
    EMBTABLES_FAULT="kill_after_step:5"     SIGKILL this process at the 5th training step
    EMBTABLES_FAULT="kill_after_step:5@1"   ... only in the process whose RANK is 1
    EMBTABLES_FAULT="ckpt_write:2:eio"      an explicit action instead of the point's default

A spec is ``POINT:N[:ACTION][@RANK]``: the action runs when this process passes ``POINT``
for the N-th time (each process counts for itself). Actions: ``kill`` (SIGKILL),
``term`` (SIGTERM), ``int`` (SIGINT), ``enospc`` / ``eio`` (raise that ``OSError``),
``raise`` (a ``RuntimeError``), ``stall`` (sleep ``EMBTABLES_FAULT_STALL_S`` seconds, default
5: holds a process at a known point while a test acts on it). The default action is
``enospc`` for points whose name ends in ``_write`` and ``kill`` otherwise.

Points in use (grep for ``faults.hit(``): ``ckpt_write`` (a checkpoint file was
written), ``kill_after_step`` (a training step finished), ``summary_write`` (before the
atomic rename of a run's summary.json).

A leaf module: it imports nothing from embtables, so any layer may call it.
"""

from __future__ import annotations

import errno
import os
import signal
import time

ENV = "EMBTABLES_FAULT"
ACTIONS = ("kill", "term", "int", "enospc", "eio", "raise", "stall")

_counts: dict[str, int] = {}
_parsed: tuple[str, dict[str, tuple[int, str]]] = ("", {})


class FaultSpecError(ValueError):
    """EMBTABLES_FAULT does not parse."""


def _default_action(point: str) -> str:
    return "enospc" if point.endswith("_write") else "kill"


def parse(text: str, rank: int | None = None) -> dict[str, tuple[int, str]]:
    """``{point: (n, action)}`` of the specs that apply to ``rank`` (None: this process's RANK)."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    out: dict[str, tuple[int, str]] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        spec, _, on_rank = item.partition("@")
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not parts[1].isdigit() or int(parts[1]) < 1:
            raise FaultSpecError(f"{ENV}={text!r}: {item!r} is not POINT:N[:ACTION][@RANK] with N >= 1")
        action = parts[2] if len(parts) == 3 else _default_action(parts[0])
        if action not in ACTIONS:
            raise FaultSpecError(f"{ENV}={text!r}: unknown action {action!r}; one of {', '.join(ACTIONS)}")
        if on_rank and (not on_rank.isdigit() or int(on_rank) != rank):
            continue
        out[parts[0]] = (int(parts[1]), action)
    return out


def _active() -> dict[str, tuple[int, str]]:
    global _parsed
    text = os.environ.get(ENV, "")
    if text != _parsed[0]:
        _parsed = (text, parse(text) if text else {})
        _counts.clear()
    return _parsed[1]


def hit(point: str, detail: str = "") -> None:
    """One pass through ``point``; trips it when ``EMBTABLES_FAULT`` says so. ``detail``
    (a path, a step) goes into the raised error."""
    active = _active()
    if point not in active:
        return
    n, action = active[point]
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] != n:
        return
    what = f"injected fault {point}:{n}" + (f" ({detail})" if detail else "")
    if action in ("kill", "term", "int"):
        sig = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}[action]
        os.kill(os.getpid(), sig)
        return  # SIGTERM/SIGINT are handled by whoever installed a handler
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device [{what}]", detail or None)
    if action == "stall":
        time.sleep(float(os.environ.get("EMBTABLES_FAULT_STALL_S", "5")))
        return
    if action == "eio":
        raise OSError(errno.EIO, f"Input/output error [{what}]", detail or None)
    raise RuntimeError(what)


def reset() -> None:
    """Forget the counts (tests that trip the same point twice in one process)."""
    _counts.clear()
