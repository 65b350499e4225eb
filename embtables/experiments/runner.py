"""`run(config) -> summary`: one experiment from config to run directory.

The runner resolves the config, claims the run directory (:class:`RunDir`), and runs the
experiment's stages (:func:`stages.pipeline_for`) in order, skipping those whose
artefacts exist. It knows no embedding method by name.
"""

from __future__ import annotations

import gc
import os
import platform
import re
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from embtables.datasets.schema import load_schema
from embtables.experiments.config import RESULT_NEUTRAL, ConfigError, ExperimentConfig, load_config, read_yaml
from embtables.experiments.datacheck import VOCAB_FILE, check_parts, vocab_fingerprints
from embtables.experiments.jsonfile import write_json
from embtables.experiments.rundir import RunDir, RunDirError
from embtables.experiments.stages import (
    StageContext,
    adopt_stages,
    config_diff,
    pipeline_for,
)
from embtables.experiments.summary import data_checksum, make_summary, versions
from embtables.experiments.trainer import StopRequested
from embtables.sharding import init_distributed

__all__ = ["RunInterrupted", "data_checksum", "latest_checkpoint", "make_summary", "new_run_dir",
           "resolve_data_root", "run", "versions"]


class RunInterrupted(KeyboardInterrupt):
    """SIGTERM or Ctrl-C stopped the run after a checkpoint; ``--resume`` continues it.
    A KeyboardInterrupt, so that code catching ``Exception`` (a sweep cell) does not take
    an interruption for a failed run."""

    def __init__(self, message: str, run_dir: Path, step: int | None, signal_name: str) -> None:
        super().__init__(message)
        self.run_dir, self.step, self.signal_name = run_dir, step, signal_name
        self.exit_code = 143 if signal_name == "SIGTERM" else 130


class PeerLost(RuntimeError):
    """Another rank died (or its host became unreachable) during a collective."""


def peer_table(ctx) -> list[tuple[int, str, str]]:
    """(rank, address, hostname) of every rank: a failed collective names the peer's
    address only, and the user needs to know which rank (and host) was lost."""
    addr = "127.0.0.1"
    master = os.environ.get("MASTER_ADDR")
    if master:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((master, int(os.environ.get("MASTER_PORT", "29500"))))
                addr = s.getsockname()[0]
        except OSError:
            pass
    table: list = [None] * ctx.world_size
    dist.all_gather_object(table, (ctx.rank, addr, platform.node()))
    return table


_PEER_FAILURE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out",
                 "timed out", "Connection refused", "NCCL communicator was aborted")


def lost_peer(e: BaseException, ctx, peers: list[tuple[int, str, str]], run_dir: Path) -> PeerLost | None:
    text = str(e)
    if not (isinstance(e, dist.DistError) or any(m in text for m in _PEER_FAILURE)):
        return None
    addrs = set(re.findall(r"\[?(\d+\.\d+\.\d+\.\d+)\]?:\d+", text))
    ranks = [(r, a, h) for r, a, h in peers if r != ctx.rank and a in addrs]
    who = ", ".join(f"rank {r} ({h}, {a})" for r, a, h in ranks) if ranks else "another rank"
    first = text.splitlines()[0][:200] if text else type(e).__name__
    return PeerLost(f"lost {who} during a collective: it died or became unreachable ({first}); every rank "
                    f"stops. Once all are back, continue with: embtables run --resume {run_dir}")


def resolve_data_root(path: str) -> Path:
    root = Path(path).expanduser()
    if not (root / "schema.json").exists():
        hint = ""
        if root.name == "synth-criteo" or str(path) == "data/synth-criteo":
            hint = (" Generate it with `make data` or `embtables data synth --rows 1000000 --out "
                    "data/synth-criteo`.")
        raise FileNotFoundError(
            f"data.path: {root} holds no schema.json, so it is not a converted dataset.{hint}")
    return root


def new_run_dir(cfg: ExperimentConfig, base: Path = Path("runs")) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d = base / f"{cfg.name}-{stamp}"
    i = 1
    while d.exists():
        d = base / f"{cfg.name}-{stamp}-{i}"
        i += 1
    return d


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory (see :class:`RunDir`)."""
    return RunDir(run_dir).latest_checkpoint()


def claim_new_run_dir(run_dir: Path, overwrite: bool) -> Path | None:
    """A new run must not reuse a directory by accident; ``overwrite`` moves the old one
    aside (returns where to). Raises RunDirError naming --resume."""
    rd = RunDir(run_dir)
    if rd.is_empty():
        return None
    if not overwrite:
        what = "a run" if rd.is_run_dir() else "files"
        raise RunDirError(f"--run-dir {run_dir} already holds {what}: continue it with `embtables run "
                          f"--resume {run_dir}`, choose another --run-dir, or add --overwrite to move the "
                          "old one aside")
    busy = rd.held_by_other()
    if busy:
        raise RunDirError(f"--overwrite {run_dir}: it is in use by {busy}")
    return rd.move_aside()


def resume_config(run_dir: Path, overrides: list[str] | dict[str, Any] | None) -> ExperimentConfig:
    """The saved config plus ``overrides``, which may only change settings that cannot
    change results (threads, progress, logging...)."""
    rd = RunDir(run_dir)
    if not rd.is_run_dir():
        raise FileNotFoundError(f"--resume {run_dir}: no config.yaml there, so it is not a run directory")
    saved = read_yaml(rd.config_path)
    cfg = load_config(saved, overrides)
    if overrides:
        before = load_config(saved).model_dump(mode="json")
        diff = [k for k in config_diff(before, cfg.model_dump(mode="json")) if k not in RESULT_NEUTRAL]
        if "data.path" in diff and _same_dataset(rd, Path(cfg.data.path)):
            diff.remove("data.path")  # the same dataset, moved
        if diff:
            raise ConfigError(
                f"--resume {run_dir}: --set would change {', '.join(diff)}, which change(s) the results of a "
                f"run already under way; on --resume only {', '.join(sorted(RESULT_NEUTRAL - {'name'}))} may "
                "change. "
                f"Start a new run instead (a new --run-dir, or `embtables run --from {run_dir} --stage STAGE "
                "--set ...` to reuse its finished stages)")
    return cfg


def _same_dataset(rd: RunDir, data: Path) -> bool:
    try:
        return (data / "schema.json").read_bytes() == rd.schema_path.read_bytes()
    except OSError:
        return False


def run(
    config: str | Path | dict[str, Any] | ExperimentConfig | None,
    overrides: list[str] | dict[str, Any] | None = None,
    run_dir: str | Path | None = None,
    resume: str | Path | None = None,
    *,
    stop_after_step: int | None = None,
    quiet: bool = False,
    overwrite: bool = False,
    from_run: str | Path | None = None,
    stage: str | None = None,
) -> dict[str, Any]:
    """Train and evaluate one experiment; returns the summary (also in run_dir/summary.json).

    ``resume``: a run directory; its saved config is used (``overrides`` may change only
    result-neutral settings) and training continues from its newest sound checkpoint.
    ``from_run`` + ``stage``: a NEW run directory that starts at ``stage``, with copies of
    ``from_run``'s finished earlier stages (``from_run`` is only read). ``run_dir`` must
    be new or empty unless ``overwrite`` (the old one is renamed, not deleted).
    ``stop_after_step`` stops after the first checkpoint at or past that step (tests).
    """
    if resume is not None:
        if from_run is not None:
            raise ConfigError("--resume and --from do not go together: --from starts a new run directory")
        run_dir = Path(resume)
        cfg = resume_config(run_dir, overrides)
    elif from_run is not None:
        if stage is None:
            raise ConfigError("--from RUN needs --stage STAGE: the stage the new run starts at")
        src = RunDir(from_run)
        if not src.is_run_dir():
            raise FileNotFoundError(f"--from {from_run}: no config.yaml there, so it is not a run directory")
        cfg = load_config(config if config is not None else read_yaml(src.config_path), overrides)
    else:
        if stage is not None:
            raise ConfigError("--stage needs --from RUN (the run whose earlier stages the new run reuses)")
        cfg = load_config(config, overrides)
    if quiet:
        cfg.train.progress = False
    ctx = init_distributed(cfg.sharding.device, cfg.sharding.timeout_s)
    try:
        return _run(cfg, ctx, run_dir, resume is not None, stop_after_step, quiet, overwrite, from_run, stage)
    finally:
        if ctx.owns_group and dist.is_initialized():
            # A sharded model holds the group inside reference cycles: collect them so the group
            # and gloo's threads end here, not during interpreter exit (which can abort).
            gc.collect()
            dist.destroy_process_group()


def _run(cfg, ctx, run_dir, resuming, stop_after_step, quiet, overwrite, from_run, stage) -> dict[str, Any]:
    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // max(1, _local_world_size()))
    torch.set_num_threads(threads)
    data_root = resolve_data_root(cfg.data.path)
    schema = load_schema(data_root)
    check_parts(schema, data_root, [cfg.data.train_split, cfg.data.valid_split, cfg.data.test_split])
    stages = pipeline_for(cfg)
    if not resuming:
        for st in stages:
            st.check(cfg, schema)
    rd = RunDir(run_dir if run_dir is not None else new_run_dir(cfg))
    with ExitStack() as stack:
        if ctx.is_main:
            if not resuming:
                moved = claim_new_run_dir(rd.path, overwrite)
                if moved is not None and not quiet:
                    print(f"== --overwrite: moved the old {rd.path} to {moved}")
            stack.enter_context(rd.lock())
        if ctx.is_main and not resuming:
            rd.write_config(cfg.to_yaml())
            # The dataset's schema travels with the run, so `predict` can rebuild the model anywhere.
            shutil.copyfile(data_root / "schema.json", rd.schema_path)
            write_json(rd / VOCAB_FILE, vocab_fingerprints(data_root, schema))
            if from_run is not None:
                copied = adopt_stages(RunDir(from_run), rd, stages, stage, cfg)
                if not quiet:
                    print(f"== reusing stage(s) {', '.join(copied)} of {from_run} (copied)")
        if not quiet and ctx.is_main:
            print(f"== {cfg.name}: method={cfg.embedding.method} model={cfg.model.name} data={data_root} "
                  f"world_size={ctx.world_size} threads={threads}\n== run directory: {rd.path}")
        peers = peer_table(ctx) if ctx.world_size > 1 else []
        stop = stack.enter_context(_stop_signals(ctx, quiet))
        sc = StageContext(cfg, ctx, rd, data_root, schema, resuming, stop_after_step, quiet, threads,
                          should_stop=stop.requested)
        if resuming and all(st.done(sc) for st in stages):
            # Never train again over a finished run (and never replace its summary).
            sc.say(f"== {rd.path} is finished (summary.json); nothing to resume")
            return rd.summary()
        summary: dict[str, Any] | None = None
        current = None
        try:
            for i, st in enumerate(stages):
                current = st
                if st.done(sc):
                    if len(stages) > 1:
                        sc.say(f"== stage {i + 1}/{len(stages)} {st.name}: done, skipped")
                    continue
                summary = st.run(sc)
        except StopRequested:
            step = sc.shared.get("stopped_at_step")
            if stop.signal_name is not None:
                where = f" in stage {current.name}" if len(stages) > 1 else ""
                msg = (f"stopped by {stop.signal_name}{where} after a checkpoint; continue with: "
                       f"embtables run --resume {rd.path}")
                if ctx.is_main:
                    _tell(f"== {msg}")
                raise RunInterrupted(msg, rd.path, step, stop.signal_name) from None
            out = {"stopped_at_step": step, "run_dir": str(rd.path)}
            if len(stages) > 1:
                out["stopped_at_stage"] = current.name
            return out
        except Exception as e:
            lost = lost_peer(e, ctx, peers, rd.path) if ctx.world_size > 1 else None
            if lost is not None:
                raise lost from e
            raise
        except KeyboardInterrupt as e:
            if isinstance(e, RunInterrupted):
                raise
            if ctx.is_main:
                last = rd.latest_checkpoint()
                where = f"from {last}" if last is not None else "from the start (no checkpoint yet)"
                _tell(f"\n== interrupted; continue {where} with: embtables run --resume {rd.path}")
            raise
        if summary is None:
            summary = rd.summary()
        if summary is None:
            raise RuntimeError(f"internal: the stages of {cfg.embedding.method} ran but left no summary")
        return summary


class _Stop:
    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.signal_name: str | None = None

    def requested(self) -> bool:
        """Every rank agrees (a collective when there are several): all stop at one step."""
        local = self.signal_name is not None
        if self.ctx.world_size > 1:
            t = torch.tensor([1 if local else 0])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if t.item() and self.signal_name is None:
                self.signal_name = "SIGTERM"  # another rank was told
            return bool(t.item())
        return local


@contextmanager
def _stop_signals(ctx, quiet: bool):
    """SIGTERM (preemption) and a first Ctrl-C: finish the step, checkpoint, stop
    resumably. A second Ctrl-C stops at once."""
    stop = _Stop(ctx)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_term(signum, frame):
        stop.signal_name = "SIGTERM"

    def on_int(signum, frame):
        if stop.signal_name is not None:
            raise KeyboardInterrupt
        stop.signal_name = "SIGINT"
        if ctx.is_main:
            _tell("\n== Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again: stop now)")

    old = signal.signal(signal.SIGTERM, on_term), signal.signal(signal.SIGINT, on_int)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])


def _tell(msg: str) -> None:
    """To stderr, which may be gone (a closed pipe, a dead terminal) when we are being stopped."""
    try:
        print(msg, file=sys.stderr, flush=True)
    except OSError:
        pass


def _local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


