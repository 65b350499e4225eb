"""A deliberately failing rank for the launcher test; imports nothing heavy so that
spawned processes start fast."""

from __future__ import annotations

import datetime

import torch.distributed as dist


def fail_on_rank(bad_rank: int) -> str:
    """Rank ``bad_rank`` raises; the others block in a collective that can never finish."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    if dist.get_rank() == bad_rank:
        raise ValueError(f"deliberate failure on rank {dist.get_rank()}")
    dist.barrier()
    return "unreachable"
