"""A finished run's summary.json: metrics, sizes, speed, versions, checksums."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import Any

import torch

import embtables
from embtables.experiments.oracle import oracle_auc
from embtables.experiments.trainer import Trainer, finite_or_none, peak_rss_bytes, state_bytes


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "embtables": embtables.__version__}
    for mod in ("torchrec", "fbgemm_gpu"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a version string is informational only
            out[mod] = "unknown"
    return out


def data_checksum(root: Path) -> str:
    """sha256 of schema.json plus each part's name and size: cheap, and changes with the data."""
    h = hashlib.sha256((root / "schema.json").read_bytes())
    for p in sorted(root.rglob("*.parquet")):
        h.update(f"{p.relative_to(root)}:{p.stat().st_size}".encode())
    return h.hexdigest()[:16]


def make_summary(cfg, trainer: Trainer, final: dict, data_root: Path, world_size: int,
                 threads: int) -> dict[str, Any]:
    has_test = "test_auc" in final
    split = cfg.data.test_split if has_test else cfg.data.valid_split
    auc = final.get("test_auc") if has_test else final.get("valid_auc")
    ll = final.get("test_logloss") if has_test else final.get("valid_logloss")
    fused_state = trainer.fused_opt.state_dict()
    dense_state = trainer.dense_opt.state_dict()

    return {
        "name": cfg.name,
        "method": cfg.embedding.method,
        "model": cfg.model.name,
        "dataset": trainer.schema.name,
        "eval_split": split,
        "auc": finite_or_none(auc),
        "logloss": finite_or_none(ll),
        "valid_auc": finite_or_none(final.get("valid_auc")),
        "test_auc": finite_or_none(final.get("test_auc")),
        "valid_logloss": finite_or_none(final.get("valid_logloss")),
        "test_logloss": finite_or_none(final.get("test_logloss")),
        "gauc": finite_or_none(final.get("test_gauc") if has_test else final.get("valid_gauc")),
        "oracle_auc": oracle_auc(trainer.schema, data_root, split, cfg.data.max_eval_rows) if split else None,
        "embedding_dim": cfg.embedding.dim,
        "embedding_budget": cfg.embedding.budget,
        "embedding_params": trainer.sizes.embedding_params,
        "embedding_bytes": trainer.sizes.embedding_bytes,
        "optimizer_state_bytes": state_bytes(fused_state) + state_bytes(dense_state),
        "dense_params": trainer.sizes.dense_params,
        "steps": trainer.step,
        "train_samples": trainer.train_samples,
        "train_seconds": round(trainer.train_seconds, 3),
        "samples_per_second": round(trainer.train_samples / max(trainer.train_seconds, 1e-9), 1),
        "peak_rss_bytes": peak_rss_bytes(),
        "world_size": world_size,
        "threads": threads,
        "seed": cfg.seed,
        "versions": versions(),
        "config_hash": cfg.config_hash(),
        "data_checksum": data_checksum(data_root),
    }
