"""`embtables predict RUN_DIR DATA --out FILE`: score a dataset with a trained run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch.distributed as dist
import yaml

from embtables.datasets.schema import DatasetSchema, load_schema
from embtables.experiments import metrics as M
from embtables.experiments.config import load_config
from embtables.sharding import init_distributed


def predict(run_dir: str | Path, data: str | Path, out: str | Path, split: str | None = None) -> dict:
    import json

    from embtables.experiments.runner import latest_checkpoint
    from embtables.experiments.trainer import Trainer

    run_dir, data, out = Path(run_dir), Path(data), Path(out)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir}: no config.yaml, so it is not a run directory")
    cfg = load_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    cfg.sharding.world_size = 1
    train_schema = DatasetSchema.from_json(json.loads((run_dir / "data_schema.json").read_text()))
    schema = load_schema(data)
    _check_compatible(train_schema, schema, data)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to predict with (was train.checkpoint false?)")
    ctx = init_distributed("cpu", cfg.sharding.timeout_s)
    try:
        trainer = Trainer(cfg, train_schema, data, ctx, None, for_training=False)
        trainer.load_checkpoint(ckpt)
        splits = [split] if split else sorted(schema.splits)
        tables, report = [], {}
        for s in splits:
            if s not in schema.splits:
                raise KeyError(f"{data} has no split {s!r}; it has {sorted(schema.splits)}")
            p, y = trainer.predict_split(s, root=data)
            tables.append(pa.table({"split": pa.array([s] * len(p)), "row": np.arange(len(p), dtype=np.int64),
                                    "prob": p.astype(np.float32), "label": y.astype(np.float32)}))
            report[s] = {"rows": int(len(p)), "auc": M.auc(y, p), "logloss": M.logloss(y, p)}
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.concat_tables(tables), out)
        for s, r in report.items():
            auc_s = f"{r['auc']:.4f}" if r["auc"] is not None else "n/a"
            print(f"{s}: {r['rows']} rows  auc={auc_s}  logloss={r['logloss']:.4f}")
        print(f"predictions: {out}")
        return report
    finally:
        if ctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _check_compatible(train: DatasetSchema, data: DatasetSchema, path: Path) -> None:
    if train.dense != data.dense or train.categorical_names != data.categorical_names:
        raise ValueError(f"{path}: its features differ from the ones the run was trained on "
                         f"({len(data.dense)} dense / {data.categorical_names[:3]}... vs {len(train.dense)} / "
                         f"{train.categorical_names[:3]}...)")
