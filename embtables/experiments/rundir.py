"""The run directory: one class that knows its layout and its states.

::

    RUN/config.yaml          the resolved config (what --resume and predict rebuild from)
    RUN/data_schema.json     the training dataset's schema.json (predict checks its id space)
    RUN/metrics.jsonl        one evaluation record per line
    RUN/checkpoints/step-N/  complete checkpoints only (the newest two are kept);
                             .step-N.partial/ while one is being written
    RUN/summary.json         written last and atomically: its presence (a whole JSON
                             object) means "finished"
    RUN/.lock                held (flock) by the one process that runs in RUN
    RUN/<stage folders>      what a stage pipeline's other stages write (see stages.py)

Everything that reads or writes these names goes through :class:`RunDir`: the runner,
the stages, the sweep (is a cell finished?), predict and the launcher.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from embtables.experiments.jsonfile import read_json, write_json
from embtables.sharding.checkpoint import CheckpointError, partial_dir, verify

CONFIG = "config.yaml"
SCHEMA = "data_schema.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
LOCK = ".lock"
# A sweep keeps its cell's records in the cell's run directory (see sweep.py).
NOT_RUN_FILES = frozenset({LOCK, "cell.json", "status.json", "error.txt"})
KEEP_CHECKPOINTS = 2
_STEP = re.compile(r"step-(\d+)$")


class RunDirError(ValueError):
    """A run directory cannot be used the way it was asked for (exists, busy, not a run)."""


class RunDirBusy(RunDirError):
    """Another live process holds the run directory."""


# Locks this process holds, by directory: the sweep takes a cell's lock before it writes
# the cell's status and the runner takes it again inside; flock would refuse the second.
_held: dict[str, tuple[int, int]] = {}


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ---- names ----------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def schema_path(self) -> Path:
        return self.path / SCHEMA

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def checkpoint_root(self) -> Path:
        return self.path / CHECKPOINTS

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoint_root / f"step-{step:08d}"

    def sub(self, *parts: str) -> RunDir:
        """A stage's own run directory inside this one (e.g. ``optembed/supernet``)."""
        return RunDir(self.path.joinpath(*parts))

    # ---- states ---------------------------------------------------------------------------
    def is_run_dir(self) -> bool:
        return self.config_path.exists()

    def is_empty(self) -> bool:
        """Nothing of a run here (a sweep cell's own records do not count)."""
        return not self.path.exists() or not any(p.name not in NOT_RUN_FILES for p in self.path.iterdir())

    def summary(self) -> dict[str, Any] | None:
        """The finished run's summary, or None (absent, or cut short: not a JSON object)."""
        s = read_json(self.summary_path)
        return s if isinstance(s, dict) else None

    def is_finished(self) -> bool:
        return self.summary() is not None

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (a save in progress is a hidden .partial
        directory; checkpoint.json marks the legacy ones written before manifests)."""
        root = self.checkpoint_root
        if not root.exists():
            return []
        found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()
                 and (p / "checkpoint.json").exists()]
        return [p for _, p in sorted(found)]

    def has_progress(self) -> bool:
        """A run directory holding a complete checkpoint of any of its stages."""
        return self.is_run_dir() and any(self.path.rglob(f"{CHECKPOINTS}/step-*/checkpoint.json"))

    def latest_checkpoint(self) -> Path | None:
        ck = self.checkpoints()
        return ck[-1] if ck else None

    def usable_checkpoint(self) -> tuple[Path | None, list[str]]:
        """The newest checkpoint that passes its manifest check, and one note for each newer
        one that did not (``--resume`` says so and goes on from the older one)."""
        notes: list[str] = []
        for ck in reversed(self.checkpoints()):
            try:
                verify(ck)
            except CheckpointError as e:
                notes.append(f"{ck.name} failed its check ({e})")
                continue
            return ck, notes
        return None, notes

    # ---- writes ---------------------------------------------------------------------------
    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, yaml_text: str) -> None:
        tmp = self.config_path.with_name(f".{CONFIG}.{os.getpid()}.tmp")
        tmp.write_text(yaml_text)
        os.replace(tmp, self.config_path)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """The one place summary.json is written: atomically, and last."""
        write_json(self.summary_path, summary)

    def truncate_metrics(self, step: int) -> None:
        """Drop evaluation records written after the checkpoint we resume from."""
        path = self.metrics_path
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
            if rec.get("step", 0) <= step:
                keep.append(line)
        tmp = path.with_name(f".{METRICS}.{os.getpid()}.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)

    def prune(self, keep: int = KEEP_CHECKPOINTS) -> None:
        """Keep the newest ``keep`` complete checkpoints; drop the rest and any partial save
        (only the process holding the lock writes here, so a .partial is a dead save's)."""
        for p in self.checkpoints()[:-keep] if keep else self.checkpoints():
            shutil.rmtree(p, ignore_errors=True)

    def clear_partial_saves(self) -> None:
        root = self.checkpoint_root
        if root.exists():
            for p in root.glob(".step-*"):
                shutil.rmtree(p, ignore_errors=True)

    def drop_checkpoints_after(self, step: int) -> None:
        """After falling back to an older checkpoint: the newer ones that failed go."""
        for p in self.checkpoints():
            m = _STEP.match(p.name)
            if m and int(m.group(1)) > step:
                shutil.rmtree(p, ignore_errors=True)

    def move_aside(self) -> Path:
        """``--overwrite``: rename the old directory to ``RUN.old-<stamp>``, never delete it."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = self.path.with_name(f"{self.path.name}.old-{stamp}")
        i = 1
        while dest.exists():
            dest = self.path.with_name(f"{self.path.name}.old-{stamp}-{i}")
            i += 1
        os.replace(self.path, dest)
        return dest

    # ---- the one process that writes here --------------------------------------------------
    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive while held (re-entrant in this process); a second process gets
        :class:`RunDirBusy` naming the holder. The kernel drops it when the holder dies."""
        self.create()
        key = str(self.path.resolve())
        if key in _held:
            fd, n = _held[key]
            _held[key] = (fd, n + 1)
            try:
                yield
            finally:
                fd, n = _held[key]
                _held[key] = (fd, n - 1)
            return
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirBusy(f"{self.path} is in use by {holder}: wait for it to finish (or end it), "
                             "then --resume") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        _held[key] = (fd, 1)
        try:
            yield
        finally:
            fd, n = _held.pop(key)
            os.close(fd)  # releases the flock

    def held_by_other(self) -> str | None:
        """Who holds the lock, when a live process other than this one does."""
        lock = self.path / LOCK
        if not lock.exists() or str(self.path.resolve()) in _held:
            return None
        fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        finally:
            os.close(fd)
        return None


def checkpoint_step(path: Path) -> int:
    m = _STEP.match(Path(path).name)
    if not m:
        raise ValueError(f"{path}: not a step-N checkpoint directory")
    return int(m.group(1))


__all__ = ["RunDir", "RunDirBusy", "RunDirError", "checkpoint_step", "partial_dir"]
