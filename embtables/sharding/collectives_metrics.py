"""Global metrics over every rank's predictions: gather (unequal lengths allowed), then
compute AUC / logloss exactly as a single process would on the concatenation."""

from __future__ import annotations

import torch
import torch.distributed as dist

from embtables.metrics import auc, logloss


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_1d(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor from every rank, in rank order, on every rank."""
    x = x.detach().reshape(-1)
    if not _active():
        return x.clone()
    # nccl moves only device tensors; gloo only host tensors.
    nccl = dist.get_backend() == "nccl"
    dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    n = torch.tensor([x.numel()], dtype=torch.long, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes_i = [int(s) for s in sizes]
    longest = max(sizes_i)
    padded = torch.zeros(longest, dtype=x.dtype, device=dev)
    padded[: x.numel()] = x.to(dev)
    parts = [torch.empty_like(padded) for _ in sizes_i]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes_i, strict=True)]).cpu()


def gather_predictions(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' (probs, labels), concatenated in rank order, on every rank (float64)."""
    if probs.numel() != labels.numel():
        raise ValueError(f"probs ({probs.numel()}) and labels ({labels.numel()}) differ in length")
    return all_gather_1d(probs.to(torch.float64)), all_gather_1d(labels.to(torch.float64))


def global_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float | int | None]:
    """AUC, logloss and count over all ranks' predictions; the same on every rank.
    AUC is None when only one class is present."""
    p, y = gather_predictions(probs, labels)
    y_np, p_np = y.numpy(), p.numpy()
    return {"auc": auc(y_np, p_np), "logloss": logloss(y_np, p_np), "count": int(p.numel())}
