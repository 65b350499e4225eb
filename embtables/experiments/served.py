"""``embedding.serve_dtype``: a run's result as it will be served. The tables were sized
so that their quantized storage fits the budget (``build.training_budget_for_serving``);
after training, the final checkpoint is loaded into the unsharded model, its tables are
quantized (``export.quantize_model``: the same artefact ``embtables export`` writes) and
the evaluation split is scored with it. The summary's ``auc``, ``logloss`` and
``embedding_bytes`` are then the served model's; the training-precision figures move to
``summary["serving"]["trained"]``, next to the training bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from embtables.experiments import metrics as M
from embtables.experiments.config import ExperimentConfig
from embtables.experiments.export import embedding_modules, load_trained, quantize_model, score


def evaluate_served(cfg: ExperimentConfig, run_dir: Path, data_root: Path, split: str) -> dict[str, Any]:
    """AUC, logloss and bytes of the run's final checkpoint served at ``cfg.embedding.serve_dtype``."""
    dtype = cfg.embedding.serve_dtype
    assert dtype is not None
    model, *_ = load_trained(run_dir)
    served = quantize_model(model, dtype, inplace=True)
    probs, labels = score(served, data_root, split, cfg.train.eval_batch_size, cfg.data.max_eval_rows)
    return {
        "dtype": dtype,
        "split": split,
        "rows": int(labels.size),
        "auc": M.auc(labels, probs),
        "logloss": M.logloss(labels, probs),
        "embedding_bytes": int(sum(m.memory_bytes() for m in embedding_modules(served).values())),
    }


def apply_served(summary: dict[str, Any], served: dict[str, Any]) -> dict[str, Any]:
    """The summary with the served model's figures in the headline fields."""
    split = summary["eval_split"]
    trained = {k: summary.get(k) for k in ("auc", "logloss", f"{split}_auc", f"{split}_logloss")}
    trained["embedding_bytes"] = summary["embedding_bytes"]
    out = dict(summary)
    out["auc"], out["logloss"] = served["auc"], served["logloss"]
    out[f"{split}_auc"], out[f"{split}_logloss"] = served["auc"], served["logloss"]
    out["embedding_bytes"] = served["embedding_bytes"]
    out["training_embedding_bytes"] = summary["embedding_bytes"]
    out["serving"] = {**served, "trained": trained}
    return out
