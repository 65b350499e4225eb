"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of a checkpoint directory::

    PATH/.metadata, PATH/__<rank>_<n>.distcp   DCP: model state (ShardedTensors of every
                                               table shard, dense weights) and the state of
                                               every KeyedOptimizer (the fused embedding
                                               optimizer: momentum shards)
    PATH/replicated.pt                         rank 0: state of the other optimizers and
                                               schedulers (dense, identical on every rank)
    PATH/extra-rank<r>.pt                      each rank's extra state (step, RNG states...)
    PATH/checkpoint.json                       written last by rank 0: world size, keys;
                                               its presence means "complete"

Each rank writes only its own shards, and DCP reads by global offsets, so a checkpoint
saved at one world size loads at another (resharding) when the tables keep their shapes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec.optim.keyed import KeyedOptimizer

MARKER = "checkpoint.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model it is loaded into."""


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _split(optimizers: dict[str, Any]) -> tuple[dict[str, KeyedOptimizer], dict[str, Any]]:
    """KeyedOptimizers (fused embedding optimizer: sharded state) go through DCP; the
    rest (torch optimizers of replicated dense params, LR schedulers) through rank 0."""
    keyed = {k: o for k, o in optimizers.items() if isinstance(o, KeyedOptimizer)}
    other = {k: o for k, o in optimizers.items() if k not in keyed}
    for k, o in other.items():
        if not (hasattr(o, "state_dict") and hasattr(o, "load_state_dict")):
            raise TypeError(f"optimizers[{k!r}] has no state_dict()/load_state_dict()")
    return keyed, other


def save_checkpoint(
    path: str | Path, dmp: nn.Module, optimizers: dict[str, Any], extra_state: dict[str, Any] | None = None
) -> Path:
    """Save on every rank (a collective). Overwrites ``path``."""
    path = Path(path)
    rank, world = _rank_world()
    keyed, other = _split(optimizers)
    if rank == 0:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    _barrier()
    state = {"model": dmp.state_dict(), **{f"optim.{k}": o.state_dict() for k, o in keyed.items()}}
    dcp.save(state, checkpoint_id=str(path))
    torch.save(dict(extra_state or {}), path / f"extra-rank{rank}.pt")
    if rank == 0:
        torch.save({k: o.state_dict() for k, o in other.items()}, path / "replicated.pt")
    _barrier()
    if rank == 0:
        meta = {"format_version": FORMAT_VERSION, "world_size": world,
                "keyed_optimizers": sorted(keyed), "other_optimizers": sorted(other)}
        tmp = path / (MARKER + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        tmp.replace(path / MARKER)
    _barrier()
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    marker = Path(path) / MARKER
    if not marker.exists():
        raise CheckpointError(f"{path}: no {MARKER}; not a checkpoint directory, or its save did not finish")
    return json.loads(marker.read_text())


def _legacy_names(model_state: dict[str, Any], path: Path) -> dict[str, str]:
    """Model key -> the name it had in checkpoints written before ``full``'s state_dict
    took TorchRec's EBC layout (its tables under ``tables.``), for keys saved that way."""
    from embtables.embeddings.full import legacy_key

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
    """Load into an already sharded model and its optimizers (a collective); returns
    this rank's extra state (rank 0's when the checkpoint had fewer ranks)."""
    path = Path(path)
    meta = read_meta(path)
    rank, world = _rank_world()
    keyed, other = _split(optimizers)
    missing = sorted(set(meta["keyed_optimizers"]) - set(keyed)) + sorted(set(meta["other_optimizers"]) - set(other))
    extra_opts = sorted(set(keyed) - set(meta["keyed_optimizers"])) + sorted(set(other) - set(meta["other_optimizers"]))
    if strict and (missing or extra_opts):
        raise CheckpointError(
            f"{path}: optimizers do not match the checkpoint: saved {meta['keyed_optimizers'] + meta['other_optimizers']}, "
            f"given {sorted(optimizers)}"
        )
    state = {"model": dmp.state_dict(), **{f"optim.{k}": o.state_dict() for k, o in keyed.items()}}
    renamed = _legacy_names(state["model"], path)
    state["model"] = {renamed.get(k, k): v for k, v in state["model"].items()}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # DCP wraps per-rank failures; name what most likely differs
        raise CheckpointError(
            f"{path}: cannot load this checkpoint (saved at world size {meta['world_size']}, loading at {world}): "
            f"the model's tables must have the same names and shapes as when saved ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    # DCP loads in place into the tensors above; load_state_dict also restores the
    # non-tensor entries (param groups) and anything not aliased.
    back = {v: k for k, v in renamed.items()}
    dmp.load_state_dict({back.get(k, k): v for k, v in state["model"].items()})
    for k, o in keyed.items():
        o.load_state_dict(state[f"optim.{k}"])
    replicated = torch.load(path / "replicated.pt", weights_only=False)
    for k, o in other.items():
        if k in replicated:
            o.load_state_dict(replicated[k])
    own = path / f"extra-rank{rank}.pt"
    return torch.load(own if own.exists() else path / "extra-rank0.pt", weights_only=False)
