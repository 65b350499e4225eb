"""The best achievable AUC of a synthetic split: the AUC of its true probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from embtables.experiments.metrics import auc


def oracle_auc(schema, root: Path, split: str, max_rows: int | None = None) -> float | None:
    if not schema.prob_column or split not in schema.splits:
        return None
    labels, probs = [], []
    n = 0
    for f in schema.files(root, split):
        t = pq.read_table(f, columns=[schema.label, schema.prob_column])
        labels.append(t.column(0).to_numpy())
        probs.append(t.column(1).to_numpy())
        n += t.num_rows
        if max_rows and n >= max_rows:
            break
    y = np.concatenate(labels)[:max_rows]
    p = np.concatenate(probs)[:max_rows]
    return auc(y, p)
