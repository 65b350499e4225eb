"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), verified on load.

Layout of a checkpoint directory::

    PATH/.metadata, PATH/__<rank>_<n>.distcp   DCP: model state (ShardedTensors of every
                                               table shard, dense weights) and the state of
                                               every KeyedOptimizer (the fused embedding
                                               optimizer: momentum shards)
    PATH/replicated.pt                         rank 0: state of the other optimizers and
                                               schedulers (dense, identical on every rank)
    PATH/extra-rank<r>.pt                      each rank's extra state (step, RNG states...)
    PATH/checkpoint.json                       rank 0: world size, optimizer keys
    PATH/manifest.json                         rank 0, last: size and sha256 of every file

Every rank writes into ``.<name>.partial`` next to PATH; rank 0 writes the manifest last
and renames the directory to PATH, so a directory named PATH is always complete and a
save that fails (a full disk, a killed process) leaves no PATH. Loading checks every file
against the manifest first: a truncated or corrupted file is a :class:`CheckpointError`
naming it. A checkpoint written before manifests existed (no ``manifest.json``) loads
with a :class:`CheckpointWarning`.

Each rank writes only its own shards, and DCP reads by global offsets, so a checkpoint
saved at one world size loads at another (resharding) when the tables keep their shapes.
All ranks must see one filesystem (several machines: a shared one).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemWriter
from torchrec.optim.keyed import KeyedOptimizer

from embtables import faults
from embtables.embeddings.full import legacy_key
from embtables.errors import CheckpointError

MARKER = "checkpoint.json"
MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: manifest.json and the .partial directory; 1 (no manifest) still loads


class CheckpointDiskFull(CheckpointError):
    """No space left while saving; the partial checkpoint was removed."""


class CheckpointWarning(Warning):
    """A checkpoint loads but could not be verified (written before manifests existed)."""


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _all_ok(ok: bool) -> bool:
    """True when every rank's ``ok`` is true (a collective): a rank whose local write failed
    must not leave the others waiting in the next barrier."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return ok
    t = torch.tensor([1 if ok else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _split(optimizers: dict[str, Any]) -> tuple[dict[str, KeyedOptimizer], dict[str, Any]]:
    """KeyedOptimizers (fused embedding optimizer: sharded state) go through DCP; the
    rest (torch optimizers of replicated dense params, LR schedulers) through rank 0."""
    keyed = {k: o for k, o in optimizers.items() if isinstance(o, KeyedOptimizer)}
    other = {k: o for k, o in optimizers.items() if k not in keyed}
    for k, o in other.items():
        if not (hasattr(o, "state_dict") and hasattr(o, "load_state_dict")):
            raise TypeError(f"optimizers[{k!r}] has no state_dict()/load_state_dict()")
    return keyed, other


# ---- writing ------------------------------------------------------------------------------------


class _FaultPointFS(FileSystem):
    """DCP's file system, passing the ``ckpt_write`` fault point after each file it writes."""

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator:
        with super().create_stream(path, mode) as stream:
            yield stream
        if "w" in mode:
            faults.hit("ckpt_write", str(path))


def _write(path: Path, write: Callable[[Path], None]) -> None:
    write(path)
    faults.hit("ckpt_write", str(path))


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def partial_dir(path: Path) -> Path:
    """Where a save of ``path`` is written before it is complete."""
    return path.parent / f".{path.name}.partial"


def _unwrap(e: BaseException) -> BaseException:
    """DCP wraps each rank's failure in a CheckpointException (a BaseException)."""
    if isinstance(e, CheckpointException):
        for inner, _trace in e.failures.values():
            return _unwrap(inner)
    return e


def _disk_full(e: BaseException | None) -> OSError | None:
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return e
        inner = _unwrap(e)
        e = inner if inner is not e else (e.__cause__ or e.__context__)
    return None


def save_checkpoint(
    path: str | Path, dmp: nn.Module, optimizers: dict[str, Any], extra_state: dict[str, Any] | None = None
) -> Path:
    """Save on every rank (a collective). Replaces ``path`` only once the new save is complete."""
    path = Path(path)
    rank, world = _rank_world()
    keyed, other = _split(optimizers)
    work = partial_dir(path)
    if rank == 0:
        if work.exists():
            shutil.rmtree(work)  # an earlier save of the same step that did not finish
        path.parent.mkdir(parents=True, exist_ok=True)
        work.mkdir()
    _barrier()
    error: BaseException | None = None
    try:
        state = {"model": dmp.state_dict(), **{f"optim.{k}": o.state_dict() for k, o in keyed.items()}}
        writer = FileSystemWriter(str(work))
        writer.fs = _FaultPointFS()
        dcp.save(state, checkpoint_id=str(work), storage_writer=writer)
    except (Exception, CheckpointException) as e:  # DCP failed on some rank: every rank gets it
        error = e
    if error is None:
        try:
            _write(work / f"extra-rank{rank}.pt", lambda p: torch.save(dict(extra_state or {}), p))
            if rank == 0:
                replicated = {k: o.state_dict() for k, o in other.items()}
                _write(work / "replicated.pt", lambda p: torch.save(replicated, p))
        except Exception as e:  # noqa: BLE001 - reported below, after every rank knows
            error = e
        if not _all_ok(error is None) and error is None:
            error = CheckpointError(f"{path}: another rank failed to write its part of the checkpoint")
    if error is None and rank == 0:
        try:
            meta = {"format_version": FORMAT_VERSION, "world_size": world,
                    "keyed_optimizers": sorted(keyed), "other_optimizers": sorted(other)}
            _write(work / MARKER, lambda p: _write_text_atomic(p, json.dumps(meta, indent=2) + "\n"))
            manifest = {"format_version": FORMAT_VERSION, "files": _describe(work)}
            _write(work / MANIFEST, lambda p: _write_text_atomic(p, json.dumps(manifest, indent=2) + "\n"))
            _commit(work, path)
        except Exception as e:  # noqa: BLE001
            error = e
    if world > 1 and not _all_ok(error is None) and error is None:
        error = CheckpointError(f"{path}: rank 0 failed to finish the checkpoint")
    if error is not None:
        if rank == 0:
            shutil.rmtree(work, ignore_errors=True)
        full = _disk_full(error)
        if full is not None:
            where = Path(full.filename).name if full.filename else "?"
            raise CheckpointDiskFull(
                f"no space left on device while writing {path} (file {where}); the partial checkpoint was "
                "removed, earlier checkpoints are untouched") from None
        inner = _unwrap(error)
        if isinstance(inner, CheckpointError):
            raise inner from None
        raise CheckpointError(
            f"{path}: saving the checkpoint failed: {type(inner).__name__}: {inner}") from None
    _barrier()
    return path


def _describe(root: Path) -> dict[str, dict[str, Any]]:
    return {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(root.iterdir()) if p.is_file() and p.name != MANIFEST}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _commit(work: Path, path: Path) -> None:
    """Rename the finished save to its name; an older checkpoint of that name goes last."""
    old = path.parent / f".{path.name}.old"
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(work, path)
    shutil.rmtree(old, ignore_errors=True)


# ---- reading ------------------------------------------------------------------------------------


def read_meta(path: str | Path) -> dict[str, Any]:
    marker = Path(path) / MARKER
    if not marker.exists():
        raise CheckpointError(f"{path}: no {MARKER}; not a checkpoint directory, or its save did not finish")
    try:
        return json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{marker}: not valid JSON ({e}); the checkpoint is damaged") from None


def verify(path: str | Path) -> bool:
    """Check every file of a checkpoint against its manifest. Returns False for a
    checkpoint written before manifests existed (nothing to check against); raises
    :class:`CheckpointError` naming the first file that is missing, truncated or changed."""
    path = Path(path)
    read_meta(path)
    mpath = path / MANIFEST
    if not mpath.exists():
        return False
    try:
        files = json.loads(mpath.read_text())["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mpath}: the manifest is damaged ({type(e).__name__}: {e})") from None
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (the manifest lists it); the checkpoint is incomplete")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{f}: {size:,} bytes, the manifest says {want['bytes']:,}: the file is "
                                  "truncated or was changed")
        if _sha256(f) != want["sha256"]:
            raise CheckpointError(f"{f}: its sha256 differs from the manifest's: the file is corrupted")
    return True


def _verify_collective(path: Path) -> None:
    """Rank 0 checks the files (one read, not one per rank) and every rank learns the result."""
    rank, world = _rank_world()
    result: list[Any] = [None]
    if rank == 0:
        try:
            result[0] = ("ok", verify(path))
        except CheckpointError as e:
            result[0] = ("error", str(e))
    if world > 1:
        dist.broadcast_object_list(result, src=0)
    status, value = result[0]
    if status == "error":
        raise CheckpointError(value)
    if not value and rank == 0:
        warnings.warn(f"{path}: written before checkpoints carried a manifest; loading it without verifying "
                      "its files", CheckpointWarning, stacklevel=3)


def _legacy_names(model_state: dict[str, Any], path: Path) -> dict[str, str]:
    """Model key -> the name it had in checkpoints written before ``full``'s state_dict
    took TorchRec's EBC layout (its tables under ``tables.``), for keys saved that way."""
    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    out = {}
    for k in model_state:
        old = legacy_key(k)
        if f"model.{k}" not in saved and old is not None and f"model.{old}" in saved:
            out[k] = old
    return out


def load_checkpoint(
    path: str | Path, dmp: nn.Module, optimizers: dict[str, Any], *, strict: bool = True
) -> dict[str, Any]:
    """Verify, then load into an already sharded model and its optimizers (a collective);
    returns this rank's extra state (rank 0's when the checkpoint had fewer ranks)."""
    path = Path(path)
    meta = read_meta(path)
    _verify_collective(path)
    rank, world = _rank_world()
    keyed, other = _split(optimizers)
    saved_keyed, saved_other = set(meta["keyed_optimizers"]), set(meta["other_optimizers"])
    missing = sorted(saved_keyed - set(keyed)) + sorted(saved_other - set(other))
    extra_opts = sorted(set(keyed) - saved_keyed) + sorted(set(other) - saved_other)
    if strict and (missing or extra_opts):
        raise CheckpointError(
            f"{path}: optimizers do not match the checkpoint: saved "
            f"{meta['keyed_optimizers'] + meta['other_optimizers']}, "
            f"given {sorted(optimizers)}"
        )
    state = {"model": dmp.state_dict(), **{f"optim.{k}": o.state_dict() for k, o in keyed.items()}}
    renamed = _legacy_names(state["model"], path)
    state["model"] = {renamed.get(k, k): v for k, v in state["model"].items()}
    try:
        dcp.load(state, checkpoint_id=str(path))
    # DCP wraps per-rank failures; name what most likely differs
    except (Exception, CheckpointException) as e:
        inner = _unwrap(e)
        first = str(inner).splitlines()[0] if str(inner) else ""
        raise CheckpointError(
            f"{path}: cannot load this checkpoint (saved at world size {meta['world_size']}, "
            f"loading at {world}): "
            f"the model's tables must have the same names and shapes as when saved ({type(inner).__name__}: "
            f"{first[:300]})"
        ) from None
    # DCP loads in place into the tensors above; load_state_dict also restores the
    # non-tensor entries (param groups) and anything not aliased.
    back = {v: k for k, v in renamed.items()}
    dmp.load_state_dict({back.get(k, k): v for k, v in state["model"].items()})
    for k, o in keyed.items():
        o.load_state_dict(state[f"optim.{k}"])
    replicated = _torch_load(path / "replicated.pt")
    for k, o in other.items():
        if k in replicated:
            o.load_state_dict(replicated[k])
    own = path / f"extra-rank{rank}.pt"
    return _torch_load(own if own.exists() else path / "extra-rank0.pt")


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001 - a legacy checkpoint's damaged file: name it
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {str(e)[:200]})") from None
