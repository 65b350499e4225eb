"""``embtables export RUN_DIR --dtype int4 --out DIR``: a trained run as a serving artefact.

The run's newest checkpoint is loaded into the unsharded model its config builds; every
embedding module's TorchRec tables become TorchRec's quantized inference collections
(embeddings/quantize.py: row-wise, per-row fp16 scale and bias, or fp16 rows); the remap,
the combine and the dense layers stay as trained (fp32). The artefact directory holds::

    DIR/manifest.json       what was exported: dtype, row alignment, bytes per module and
                            table (read from the quantized storage), training memory, versions
    DIR/model.pt            the whole quantized model (``torch.save``; a pickle: load only
                            artefacts you trust), scored by ``embtables predict DIR DATA``
    DIR/data_schema.json    the training data's schema (predict checks a dataset's id space)
    DIR/data_vocab.json     its vocabulary fingerprints, when the run has them
    DIR/program.pt2         ``torch.export`` program of the model, when every embedding method
                            declares itself exportable and tracing succeeds (shapes of the
                            example batch: see manifest ``program``); else the reason is in
                            manifest ``program.skipped``

It needs nothing else: not the training config, not the training data. The directory is
written aside and renamed into place, so a failed export leaves nothing at ``--out``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from embtables.datasets.reader import BatchReader
from embtables.datasets.schema import DatasetSchema
from embtables.embeddings import EmbeddingMethod
from embtables.embeddings.quantize import (
    DEFAULT_ROW_ALIGNMENT,
    SERVING_DTYPES,
    check_alignment,
    check_dtype,
    quantize_tables,
    stored_rows,
)
from embtables.experiments.build import build_model
from embtables.experiments.config import load_config, read_yaml
from embtables.experiments.datacheck import VOCAB_FILE
from embtables.experiments.jsonfile import write_json
from embtables.experiments.rundir import RunDir
from embtables.sharding.checkpoint import load_checkpoint

KIND = "embtables-serving-artefact"
FORMAT = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.pt"
PROGRAM_FILE = "program.pt2"
SCHEMA_FILE = "data_schema.json"


class ExportError(ValueError):
    """A run cannot be exported as asked (the message names the argument)."""


def embedding_modules(model: nn.Module) -> dict[str, EmbeddingMethod]:
    """The model's embtables modules by path (a model may hold several: DIN, DARE)."""
    return {path or "embedding": m for path, m in model.named_modules() if isinstance(m, EmbeddingMethod)}


def load_trained(run_dir: str | Path) -> tuple[nn.Module, Any, DatasetSchema, RunDir, Path]:
    """The run's newest checkpoint in the unsharded model its config builds (eval mode)."""
    rd = RunDir(run_dir)
    if not rd.path.is_dir():
        raise ExportError(f"RUN_DIR {rd.path}: no such directory")
    if not rd.is_run_dir() or not rd.schema_path.exists():
        raise ExportError(f"RUN_DIR {rd.path}: no config.yaml / {SCHEMA_FILE}, so it is not a run directory")
    ckpt = rd.latest_checkpoint()
    if ckpt is None:
        raise ExportError(f"RUN_DIR {rd.path}: no checkpoint to export (was train.checkpoint false?)")
    cfg = load_config(read_yaml(rd.config_path))
    schema = DatasetSchema.from_json(json.loads(rd.schema_path.read_text()))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, schema)
    load_checkpoint(ckpt, model, {}, strict=False)  # DCP loads the sharded save into plain tensors
    return model.eval(), cfg, schema, rd, ckpt


def quantize_model(model: nn.Module, dtype: str, row_alignment: int = DEFAULT_ROW_ALIGNMENT,
                   inplace: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with every embedding module's tables quantized,
    dense layers as they are. Refuses (``NotQuantizable``, naming the method) before
    changing anything."""
    check_dtype(dtype)
    check_alignment(row_alignment)
    for m in embedding_modules(model).values():
        if m.has_tables and not type(m).quantizable_tables:
            quantize_tables(m, dtype, row_alignment)  # raises, naming the method
    out = model if inplace else copy.deepcopy(model)
    for m in embedding_modules(out).values():
        quantize_tables(m, dtype, row_alignment)
    return out.eval()


def module_report(m: EmbeddingMethod, fp32: tuple[int, int] | None = None) -> dict[str, Any]:
    """Bytes of one (quantized) embedding module, from its storage, and its tables' rows."""
    rep: dict[str, Any] = {
        "method": m.method_name, "dim": m.dim, "dtype": getattr(m, "serving_dtype", m.dtype),
        "has_tables": m.has_tables, "memory_bytes": int(m.memory_bytes()),
        "table_bytes": int(m.table_bytes()) if m.has_tables else 0, "dense_bytes": int(m.dense_bytes()),
        "buffer_bytes": int(m.buffer_bytes()),
    }
    if fp32 is not None:  # (memory_bytes, table_bytes) of the fp32 module
        rep["fp32_memory_bytes"], rep["fp32_table_bytes"] = fp32
    if m.has_tables and hasattr(m.tables, "_emb_modules"):
        rows = stored_rows(m.tables)
        rep["tables"] = {n: {"rows": int(r.shape[0]), "row_bytes": int(r.shape[1])} for n, r in rows.items()}
    if not m.has_tables:
        rep["note"] = (f"{m.method_name} has no tables (has_tables=False): nothing quantized, its MLP "
                       "stays fp32")
    return rep


def _strip_init_fns(model: nn.Module) -> None:
    """Table configs keep their (closure) init functions; serving never initialises a
    table, and closures do not pickle."""
    for mod in model.modules():
        for attr in ("_table_configs", "_embedding_bag_configs", "_embedding_configs"):
            for c in getattr(mod, attr, None) or ():
                if getattr(c, "init_fn", None) is not None:
                    c.init_fn = None


def example_batch(data: Path, schema_split: str, batch_size: int):
    reader = BatchReader(data, split=schema_split, batch_size=batch_size, shuffle=False, seed=0, rank=0,
                         world_size=1, drop_last=False, prefetch=0)
    return next(iter(reader))


def _export_program(model: nn.Module, batch, path: Path) -> dict[str, Any]:
    """Save ``torch.export`` of the quantized model, or say why not."""
    refusing = [m.method_name for m in embedding_modules(model).values() if not type(m).exportable]
    if refusing:
        names = ", ".join(sorted(set(refusing)))
        return {"saved": False, "skipped": f"{names}: not exportable with torch.export (the method declares "
                                           "exportable=False); model.pt serves it"}
    args = (batch.dense_features, batch.sparse_features)
    try:
        ep = torch.export.export(model, args, strict=False)
        with torch.no_grad():
            if not torch.allclose(ep.module()(*args), model(*args), atol=1e-6):
                return {"saved": False, "skipped": "the exported program's output differs from the model's"}
        # The example batch holds a KeyedJaggedTensor, which torch.export.load would have to
        # unpickle (not a weights-only type): the program is saved without it.
        ep.example_inputs = None
        torch.export.save(ep, str(path))
    except Exception as e:  # noqa: BLE001 - a model that does not trace: say so, keep model.pt
        first = (str(e).splitlines() or [""])[0][:300]
        return {"saved": False, "skipped": f"torch.export failed: {type(e).__name__}: {first}"}
    kjt = batch.sparse_features
    return {"saved": True, "file": PROGRAM_FILE, "batch_size": int(batch.labels.numel()),
            "ids_per_feature": dict(zip(kjt.keys(), (int(n) for n in kjt.length_per_key()), strict=True)),
            "note": "specialised to these input shapes (rows, ids per feature); model.pt takes any batch"}


def export_run(run_dir: str | Path, dtype: str, out: str | Path, row_alignment: int = DEFAULT_ROW_ALIGNMENT,
               program: bool = True, example_data: str | Path | None = None) -> dict[str, Any]:
    """Export RUN_DIR at ``dtype`` into the new directory ``out``; returns the manifest."""
    if dtype not in SERVING_DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(SERVING_DTYPES)}, got {dtype!r}")
    check_alignment(row_alignment)
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise ExportError(f"--out {out} exists: give a new directory (an artefact is never overwritten)")
    model, cfg, schema, rd, ckpt = load_trained(run_dir)
    fp32 = {k: (int(m.memory_bytes()), int(m.table_bytes()) if m.has_tables else 0)
            for k, m in embedding_modules(model).items()}
    served = quantize_model(model, dtype, row_alignment, inplace=True)
    _strip_init_fns(served)
    summary = rd.summary() or {}
    modules = {k: module_report(m, fp32[k]) for k, m in embedding_modules(served).items()}
    manifest: dict[str, Any] = {
        "kind": KIND, "format": FORMAT, "dtype": dtype, "row_alignment": row_alignment,
        "source": {"run_dir": str(rd.path.resolve()), "checkpoint": ckpt.name, "name": cfg.name,
                   "model": cfg.model.name, "test_auc": summary.get("test_auc")},
        "eval_batch_size": cfg.train.eval_batch_size,
        "modules": modules,
        "serving_bytes": sum(r["memory_bytes"] for r in modules.values()),
        "fp32_bytes": sum(r["fp32_memory_bytes"] for r in modules.values()),
        # Training held fp32 (or fp16) tables plus the embedding optimizer's state; serving
        # holds neither the optimizer nor fp32 rows.
        "training": {"embedding_bytes": summary.get("embedding_bytes"),
                     "optimizer_state_bytes": summary.get("optimizer_state_bytes")},
        "versions": _versions(),
    }
    tmp = out.with_name(f".{out.name}.export-{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        torch.save(served, tmp / MODEL_FILE)
        shutil.copyfile(rd.schema_path, tmp / SCHEMA_FILE)
        if (rd / VOCAB_FILE).exists():
            shutil.copyfile(rd / VOCAB_FILE, tmp / VOCAB_FILE)
        data = Path(example_data or cfg.data.path)
        if not program:
            manifest["program"] = {"saved": False, "skipped": "not asked for (--no-program)"}
        elif not (data / "schema.json").exists():
            manifest["program"] = {"saved": False, "skipped": f"no example batch to trace: {data} (the run's "
                                                              "data) is not there; pass --example-data DIR"}
        else:
            batch = example_batch(data, cfg.data.test_split or cfg.data.valid_split or cfg.data.train_split,
                                  cfg.train.eval_batch_size)
            manifest["program"] = _export_program(served, batch, tmp / PROGRAM_FILE)
        write_json(tmp / MANIFEST, manifest)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _versions() -> dict[str, str]:
    import fbgemm_gpu
    import torchrec

    return {"torch": torch.__version__, "torchrec": getattr(torchrec, "__version__", "?"),
            "fbgemm_gpu": getattr(fbgemm_gpu, "__version__", "?")}


def is_artefact(path: str | Path) -> bool:
    p = Path(path) / MANIFEST
    if not p.exists():
        return False
    try:
        return json.loads(p.read_text()).get("kind") == KIND
    except (OSError, ValueError):
        return False


def load_artefact(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The quantized model (eval mode) and its manifest."""
    path = Path(path)
    if not is_artefact(path):
        raise ExportError(f"{path}: no {MANIFEST} of an exported artefact (`embtables export RUN_DIR ...`)")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: artefact format {manifest.get('format')}, this embtables reads {FORMAT}")
    try:
        model = torch.load(path / MODEL_FILE, weights_only=False)
    except Exception as e:  # noqa: BLE001 - name the file
        why = f"{type(e).__name__}: {str(e)[:200]}"
        raise ExportError(f"{path / MODEL_FILE}: cannot be read ({why})") from None
    return model.eval(), manifest


def print_manifest(out: Path, m: dict[str, Any]) -> None:
    for k, r in m["modules"].items():
        pct = 100.0 * r["memory_bytes"] / r["fp32_memory_bytes"] if r["fp32_memory_bytes"] else float("nan")
        print(f"{k}: {r['method']} dim={r['dim']} {r['dtype']}: {r['memory_bytes']:,} bytes "
              f"({pct:.1f} % of fp32's {r['fp32_memory_bytes']:,})"
              + (f"  [{r['note']}]" if "note" in r else ""))
    p = m["program"]
    print(f"program: {p['file'] if p['saved'] else 'not saved: ' + p['skipped']}")
    print(f"artefact: {out}")


@torch.no_grad()
def score(model: nn.Module, root: str | Path, split: str, batch_size: int,
          max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels of ``split``, in row order (one process, eval mode)."""
    model.eval()
    reader = BatchReader(Path(root), split=split, batch_size=batch_size, shuffle=False, seed=0, rank=0,
                         world_size=1, drop_last=False, prefetch=1)
    probs, labels, n = [], [], 0
    for batch in reader:
        probs.append(torch.sigmoid(model(batch.dense_features, batch.sparse_features).float()).numpy())
        labels.append(batch.labels.numpy())
        n += batch.labels.numel()
        if max_rows and n >= max_rows:
            break
    p = np.concatenate(probs) if probs else np.zeros(0, np.float32)
    y = np.concatenate(labels) if labels else np.zeros(0, np.float32)
    return (p[:max_rows], y[:max_rows]) if max_rows else (p, y)
