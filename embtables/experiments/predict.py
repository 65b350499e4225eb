"""`embtables predict RUN_DIR DATA --out FILE`: score a dataset with a trained run, or with
an artefact that `embtables export` wrote (its quantized model; no training config needed).

The dataset must share the run's id space: same features, and for each categorical
feature the same mode (vocabulary ids or raw ids), the same ``num_embeddings`` and, for
vocabulary ids, the same vocabulary. Otherwise ids would index other rows (or none) of
the trained tables and the scores would be silently wrong, so it is refused, naming the
feature.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch.distributed as dist

from embtables.datasets.schema import DatasetSchema, load_schema
from embtables.experiments import metrics as M
from embtables.experiments.build import build_trainer
from embtables.experiments.config import load_config, read_yaml
from embtables.experiments.datacheck import VOCAB_FILE, check_parts, vocab_fingerprints
from embtables.experiments.export import SCHEMA_FILE, is_artefact, load_artefact, score
from embtables.experiments.rundir import RunDir
from embtables.sharding import init_distributed


class IncompatibleData(ValueError):
    """The dataset's ids do not mean what they meant in the training data."""


def check_id_space(train: DatasetSchema, data: DatasetSchema, path: Path, train_vocab: dict[str, str] | None,
                   data_vocab: dict[str, str]) -> None:
    if train.dense != data.dense or train.categorical_names != data.categorical_names:
        raise IncompatibleData(
            f"{path}: its features differ from the ones the run was trained on ({len(data.dense)} dense "
            f"/ {data.categorical_names[:3]}... vs {len(train.dense)} / {train.categorical_names[:3]}...)")
    fix = ("convert it with the training data's vocabulary "
           "(`embtables data criteo ... --vocab-from TRAIN_DATA`)")
    for t, d in zip(train.categorical, data.categorical, strict=True):
        if t.mode != d.mode:
            raise IncompatibleData(f"{path}: feature {t.name} holds {d.mode} ids, the run was trained on "
                                   f"{t.mode} ids: the ids index other rows of the trained table; {fix}")
        if t.num_embeddings != d.num_embeddings:
            raise IncompatibleData(f"{path}: feature {t.name} has num_embeddings={d.num_embeddings}, the "
                                   f"run's training data {t.num_embeddings}: a different id space; {fix}")
        vocab_differs = train_vocab is not None and train_vocab.get(t.name) != data_vocab.get(t.name)
        if t.mode == "vocab" and vocab_differs:
            raise IncompatibleData(f"{path}: feature {t.name}: its vocabulary differs from the training "
                                   f"data's (the same id stands for another value); {fix}")
    for t, d in zip(train.sequences, data.sequences, strict=False):
        if t.name != d.name or t.num_embeddings != d.num_embeddings:
            raise IncompatibleData(f"{path}: sequence feature {d.name} (num_embeddings={d.num_embeddings}) "
                                   f"does not match the run's {t.name} (num_embeddings={t.num_embeddings})")


def _train_vocab(rd: RunDir, cfg) -> dict[str, str] | None:
    """The fingerprints saved with the run; for a run directory written before they were,
    the training data's own, when it is still where the run found it (else None)."""
    saved = rd / VOCAB_FILE
    if saved.exists():
        return json.loads(saved.read_text())
    root = Path(cfg.data.path)
    if (root / "schema.json").exists():
        return vocab_fingerprints(root, load_schema(root))
    return None


def _splits(schema: DatasetSchema, data: Path, split: str | None) -> list[str]:
    splits = [split] if split else sorted(schema.splits)
    for s in splits:
        if s not in schema.splits:
            raise KeyError(f"{data} has no split {s!r}; it has {sorted(schema.splits)}")
    check_parts(schema, data, splits)
    return splits


def _write(out: Path, scored: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """The predictions Parquet (written aside, then renamed) and per-split metrics."""
    tables, report = [], {}
    for s, (p, y) in scored.items():
        tables.append(pa.table({"split": pa.array([s] * len(p)), "row": np.arange(len(p), dtype=np.int64),
                                "prob": p.astype(np.float32), "label": y.astype(np.float32)}))
        report[s] = {"rows": int(len(p)), "auc": M.auc(y, p), "logloss": M.logloss(y, p)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(pa.concat_tables(tables), tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    for s, r in report.items():
        auc_s = f"{r['auc']:.4f}" if r["auc"] is not None else "n/a"
        print(f"{s}: {r['rows']} rows  auc={auc_s}  logloss={r['logloss']:.4f}")
    print(f"predictions: {out}")
    return report


def predict_artefact(path: str | Path, data: str | Path, out: str | Path, split: str | None = None) -> dict:
    """Score ``data`` with an exported artefact (embtables export): its own schema and
    vocabulary fingerprints check the dataset's id space, as for a run."""
    path, data, out = Path(path), Path(data), Path(out)
    model, manifest = load_artefact(path)
    train_schema = DatasetSchema.from_json(json.loads((path / SCHEMA_FILE).read_text()))
    vocab = json.loads((path / VOCAB_FILE).read_text()) if (path / VOCAB_FILE).exists() else None
    schema = load_schema(data)
    check_id_space(train_schema, schema, data, vocab, vocab_fingerprints(data, schema))
    splits = _splits(schema, data, split)
    return _write(out, {s: score(model, data, s, manifest["eval_batch_size"]) for s in splits})


def predict(run_dir: str | Path, data: str | Path, out: str | Path, split: str | None = None) -> dict:
    if is_artefact(run_dir):
        return predict_artefact(run_dir, data, out, split)
    rd, data, out = RunDir(run_dir), Path(data), Path(out)
    if not rd.is_run_dir():
        raise FileNotFoundError(f"{rd.path}: no config.yaml, so it is not a run directory")
    cfg = load_config(read_yaml(rd.config_path))
    cfg.sharding.world_size = 1
    train_schema = DatasetSchema.from_json(json.loads(rd.schema_path.read_text()))
    schema = load_schema(data)
    check_id_space(train_schema, schema, data, _train_vocab(rd, cfg), vocab_fingerprints(data, schema))
    splits = _splits(schema, data, split)
    # The newest checkpoint is the trained model; an older one is not, so a damaged newest
    # one is an error (load_checkpoint names the file), never a silent fall-back.
    ckpt = rd.latest_checkpoint()
    if ckpt is None:
        raise FileNotFoundError(f"{rd.path}: no checkpoint to predict with (was train.checkpoint false?)")
    ctx = init_distributed("cpu", cfg.sharding.timeout_s)
    try:
        trainer = build_trainer(cfg, train_schema, data, ctx, None, for_training=False)
        trainer.load_checkpoint(ckpt)
        return _write(out, {s: trainer.evaluator.predict_split(s, root=data) for s in splits})
    finally:
        if ctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()

