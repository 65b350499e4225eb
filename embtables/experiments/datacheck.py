"""Checks of a dataset directory before a run or a prediction uses it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embtables.datasets.schema import DatasetSchema

VOCAB_FILE = "data_vocab.json"  # in a run directory: the training data's vocabulary fingerprints


def check_parts(schema, root: Path, splits: list[str | None]) -> None:
    """Every Parquet part of ``splits`` opens and holds the rows schema.json says: a
    truncated or missing part is refused here, naming it, before anything is written."""
    for split in dict.fromkeys(s for s in splits if s and s in schema.splits):
        rows = 0
        for f in schema.files(root, split):
            try:
                rows += pq.read_metadata(f).num_rows
            except FileNotFoundError:
                raise FileNotFoundError(f"{f}: missing, but {root / 'schema.json'} lists it; the dataset is "
                                        "incomplete: convert it again") from None
            except (OSError, pa.ArrowException) as e:
                raise ValueError(f"{f}: not a readable Parquet file ({str(e)[:200]}); the dataset is damaged "
                                 "(a truncated copy?): copy or convert it again") from None
        want = schema.rows.get(split)
        if want is not None and rows != want:
            raise ValueError(f"{root}: split {split!r} holds {rows:,} rows, its schema.json says {want:,}; "
                             "the dataset is damaged or was changed after conversion: convert it again")



def vocab_fingerprints(data_root: Path, schema: DatasetSchema) -> dict[str, str]:
    """sha256 of each vocabulary-mode feature's id -> value list (``DIR/vocab/<feature>.parquet``,
    column ``raw``): equal exactly when the same id means the same value."""
    info = schema.extra.get("vocab") or {}
    vdir = Path(data_root) / info.get("dir", "vocab")
    out = {}
    for f in schema.categorical:
        path = vdir / f"{f.name}.parquet"
        if f.mode == "vocab" and path.exists():
            raw = pq.read_table(path, columns=["raw"]).column("raw").to_numpy()
            out[f.name] = hashlib.sha256(np.ascontiguousarray(raw).tobytes()).hexdigest()[:16]
    return out
