"""`run(config) -> summary`: one experiment from config to run directory."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from embtables.datasets.schema import load_schema
from embtables.experiments.config import ExperimentConfig, load_config
from embtables.experiments.jsonfile import write_json
from embtables.experiments.trainer import StopRequested, Trainer, finite_or_none, peak_rss_bytes, state_bytes
from embtables.sharding import init_distributed


def versions() -> dict[str, str]:
    import embtables

    out = {"python": platform.python_version(), "torch": torch.__version__, "embtables": embtables.__version__}
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


def resolve_data_root(path: str) -> Path:
    root = Path(path).expanduser()
    if not (root / "schema.json").exists():
        hint = ""
        if root.name == "synth-criteo" or str(path) == "data/synth-criteo":
            hint = " Generate it with `make data` or `embtables data synth --rows 1000000 --out data/synth-criteo`."
        raise FileNotFoundError(f"data.path: {root} holds no schema.json, so it is not a converted dataset.{hint}")
    return root


def new_run_dir(cfg: ExperimentConfig, base: Path = Path("runs")) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d = base / f"{cfg.name}-{stamp}"
    i = 1
    while d.exists():
        d = base / f"{cfg.name}-{stamp}-{i}"
        i += 1
    return d


def run(
    config: str | Path | dict[str, Any] | ExperimentConfig,
    overrides: list[str] | dict[str, Any] | None = None,
    run_dir: str | Path | None = None,
    resume: str | Path | None = None,
    *,
    stop_after_step: int | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train and evaluate one experiment; returns the summary (also in run_dir/summary.json).

    ``resume``: a run directory; its saved config is used and training continues from
    its last checkpoint. ``stop_after_step`` stops after the first checkpoint at or past
    that step (to test resuming).
    """
    if resume is not None:
        run_dir = Path(resume)
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.exists():
            raise FileNotFoundError(f"--resume {run_dir}: no config.yaml there, so it is not a run directory")
        cfg = load_config(yaml.safe_load(cfg_path.read_text()), overrides)
    else:
        cfg = load_config(config, overrides)
    if quiet:
        cfg.train.progress = False
    ctx = init_distributed(cfg.sharding.device, cfg.sharding.timeout_s)
    try:
        return _run(cfg, ctx, run_dir, resume, stop_after_step, quiet)
    finally:
        if ctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg, ctx, run_dir, resume, stop_after_step, quiet) -> dict[str, Any]:
    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // max(1, _local_world_size()))
    torch.set_num_threads(threads)
    data_root = resolve_data_root(cfg.data.path)
    schema = load_schema(data_root)
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        # The dataset's schema travels with the run, so `predict` can rebuild the model anywhere.
        shutil.copyfile(data_root / "schema.json", run_dir / "data_schema.json")
        if not quiet:
            print(f"== {cfg.name}: method={cfg.embedding.method} model={cfg.model.name} data={data_root} "
                  f"world_size={ctx.world_size} threads={threads}\n== run directory: {run_dir}")
    # --- OptEmbed hook: three stages (supernet, search, retrain) in its own pipeline ---
    if cfg.embedding.method == "optembed":
        from embtables.experiments.optembed_pipeline import run_optembed

        return run_optembed(cfg, ctx, run_dir, data_root, schema, resume, stop_after_step, quiet, threads)
    # --- end OptEmbed hook ---
    trainer = Trainer(cfg, schema, data_root, ctx, run_dir)
    if resume is not None:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"--resume {run_dir}: no complete checkpoint in {run_dir / 'checkpoints'}")
        trainer.load_checkpoint(ckpt)
        if ctx.is_main:
            _truncate_metrics(run_dir / "metrics.jsonl", trainer.step)
            if not quiet:
                print(f"== resumed from {ckpt} (step {trainer.step})")
    try:
        final = trainer.train(stop_after_step=stop_after_step)
    except StopRequested:
        return {"stopped_at_step": trainer.step, "run_dir": str(run_dir)}
    summary = make_summary(cfg, trainer, final, data_root, ctx.world_size, threads)
    summary["run_dir"] = str(run_dir)
    if ctx.is_main:
        write_json(run_dir / "summary.json", summary)  # atomic: its presence means "finished"
        _prune_checkpoints(run_dir)
        if not quiet:
            auc_s = f"{summary['auc']:.4f}" if summary["auc"] is not None else "n/a"
            orc = f"  oracle_auc={summary['oracle_auc']:.4f}" if summary["oracle_auc"] is not None else ""
            print(f"== {summary['eval_split']}: auc={auc_s} logloss={summary['logloss']:.4f}{orc}  "
                  f"({summary['samples_per_second']:,.0f} samples/s, {summary['train_seconds']:.1f}s)")
            print(f"== results: {run_dir}/summary.json")
    return summary


def make_summary(cfg, trainer: Trainer, final: dict, data_root: Path, world_size: int, threads: int) -> dict[str, Any]:
    from embtables.experiments.oracle import oracle_auc

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


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = run_dir / "checkpoints"
    if not root.exists():
        return None
    # checkpoint.json is written last: a directory without it is an interrupted save.
    done = [p for p in sorted(root.glob("step-*")) if (p / "checkpoint.json").exists()]
    return done[-1] if done else None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop eval records written after the checkpoint we resume from."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _prune_checkpoints(run_dir: Path, keep: int = 1) -> None:
    """Keep only the newest checkpoint of a finished run (for predict/fine-tuning)."""
    root = run_dir / "checkpoints"
    if not root.exists():
        return
    for p in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def _local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
