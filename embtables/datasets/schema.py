"""`schema.json`: what a converted dataset directory holds.

Layout of a dataset directory::

    DIR/schema.json
    DIR/<split>/part-00000.parquet ...   (split in train / valid / test)

Parquet columns: ``label`` (float32 0/1), one float32 column per dense feature,
one int64 column per categorical feature, one ``list<int64>`` column per sequence
feature, and optionally ``prob`` (float32, the true click probability of a
synthetic row, which gives ``oracle_auc``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from embtables.errors import clip

SCHEMA_FILE = "schema.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CategoricalFeature:
    """One categorical column.

    ``cardinality`` is the number of distinct ids seen at conversion (counted in both
    modes, exactly; "missing" is not counted). In ``vocab`` mode ids are dense in
    ``[0, num_embeddings)``, where ``num_embeddings`` includes the reserved OOV/missing rows
    (Criteo converter: 0 = OOV, 1 = missing); in ``raw`` mode ids are arbitrary
    non-negative 64-bit integers (0 = missing) and ``num_embeddings`` is None (only hashing
    methods can consume them), unless the ids are known to be bounded, as in synthetic
    data, where ``num_embeddings`` is set so that every id is in ``[0, num_embeddings)``.
    """

    name: str
    cardinality: int
    mode: str = "vocab"  # "vocab" | "raw"
    num_embeddings: int | None = None

    @property
    def table_rows(self) -> int:
        """Rows a one-row-per-id table needs (vocab mode), else the distinct count."""
        return self.num_embeddings if self.num_embeddings is not None else self.cardinality


@dataclass(frozen=True)
class SequenceFeature:
    """A ``list<int64>`` column (behaviour history). ``shares_with`` names the
    categorical feature whose id space it uses (history of items shares the target
    item's table)."""

    name: str
    cardinality: int
    max_len: int
    shares_with: str | None = None
    num_embeddings: int | None = None

    @property
    def table_rows(self) -> int:
        return self.num_embeddings if self.num_embeddings is not None else self.cardinality


@dataclass
class DatasetSchema:
    name: str
    dense: list[str]
    categorical: list[CategoricalFeature]
    sequences: list[SequenceFeature] = field(default_factory=list)
    label: str = "label"
    prob_column: str | None = None
    splits: dict[str, list[str]] = field(default_factory=dict)  # split -> relative parquet paths
    rows: dict[str, int] = field(default_factory=dict)  # split -> row count
    extra: dict[str, Any] = field(default_factory=dict)  # source, stats, bad-row counts, options
    format_version: int = FORMAT_VERSION

    @property
    def categorical_names(self) -> list[str]:
        return [f.name for f in self.categorical]

    def files(self, root: str | Path, split: str) -> list[Path]:
        if split not in self.splits:
            raise KeyError(f"dataset {self.name!r} has no split {split!r}; it has {sorted(self.splits)}")
        return [Path(root) / p for p in self.splits[split]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, root: str | Path) -> Path:
        path = Path(root) / SCHEMA_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")
        tmp.replace(path)  # schema.json appears last and atomically: its presence means "complete"
        return path

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DatasetSchema:
        d = dict(d)
        d["categorical"] = [CategoricalFeature(**c) for c in d.get("categorical", [])]
        d["sequences"] = [SequenceFeature(**s) for s in d.get("sequences", [])]
        return cls(**d)


def load_schema(root: str | Path) -> DatasetSchema:
    path = Path(root) / SCHEMA_FILE
    if Path(root).is_file():
        raise NotADirectoryError(
            f"{root} is a file; a dataset is the directory that holds {SCHEMA_FILE} "
            "(convert raw files with `embtables data criteo|behavior|movielens ... --out DIR`)")
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {root} is not a converted dataset (or its conversion did not finish). "
            "Create one with `embtables data synth|criteo|movielens ... --out DIR`."
        )
    try:
        return DatasetSchema.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError, AttributeError, KeyError) as e:  # JSON, or not the layout
        raise ValueError(f"{path}: not a valid embtables schema ({clip(str(e))})") from e
