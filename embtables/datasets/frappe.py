"""Frappe (Baltrunas et al. 2015) -> the BARS ``Frappe_x1`` CTR protocol
(``embtables data frappe SRC --out DIR``).

SRC holds the official ``Frappe_x1`` validation and test files (``valid.libsvm``,
``test.libsvm``: label, then 10 one-hot fields as global ids ``id:1``) and the raw usage log
they were built from (``Mobile_Frappe.zip`` or its ``frappe.csv``). The official train file
is rebuilt from the log:

* Global ids: user = the raw user id, item = raw item + number of users, each context
  column (daytime, weekday, isweekend, homework, cost, weather, country, city) numbered in
  order of first appearance in ``frappe.csv``, fields laid out one after the other
  (0..5381 in all). Checked: every valid/test positive must equal a raw row.
* Train positives: the raw rows left once every valid/test positive has claimed one equal
  row (a multiset difference), i.e. exactly the official train positives.
* Train negatives, the rule the benchmark used (He & Chua 2017): for each train positive,
  ``negatives`` (2) rows with its user and context and an item that user never used in the
  whole log, distinct, drawn with ``numpy.random.default_rng(seed)``. The draw is not the
  original one, so the train split matches the official one in its positives and its rule,
  not row for row (2 per positive also gives 135,208 negatives where the official file has
  134,423: the benchmark drew 2 per log row and then split all rows 70/20/10 at random).

Written columns: ``label`` and the 10 fields as per-field vocabulary ids ``0..n-1``
(global id minus the field's first id); no dense features. Train rows are shuffled.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from embtables.datasets.parquet_out import PartWriter, atomic_output_dir
from embtables.datasets.schema import CategoricalFeature, DatasetSchema
from embtables.datasets.sequences import interacted_keys, sample_negatives

FIELDS = ("user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city")
CONTEXT = FIELDS[2:]
RAW_CSV = "frappe.csv"


def read_libsvm(path: str | Path, num_fields: int = len(FIELDS)) -> tuple[np.ndarray, np.ndarray]:
    """``label id:1 id:1 ...`` lines -> labels [n] float32, global ids [n, num_fields] int64."""
    path = Path(path)
    labels, ids = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != num_fields + 1:
                raise ValueError(
                    f"{path}:{lineno}: expected a label and {num_fields} id:value pairs, got "
                    f"{len(parts)} fields: {line.strip()[:80]!r}"
                )
            try:
                labels.append(float(parts[0]))
                ids.append([int(p.split(":", 1)[0]) for p in parts[1:]])
            except ValueError:
                raise ValueError(f"{path}:{lineno}: not 'label id:1 ...': {line.strip()[:80]!r}") from None
    if not labels:
        raise ValueError(f"{path}: no rows")
    lab = np.asarray(labels, np.float32)
    if not np.isin(lab, (0.0, 1.0)).all():
        raise ValueError(f"{path}: labels must be 0 or 1")
    return lab, np.asarray(ids, np.int64)


def read_raw_log(path: str | Path) -> pd.DataFrame:
    """``frappe.csv`` (tab-separated, header user, item, cnt, context columns) from the CSV
    itself or from ``Mobile_Frappe.zip``."""
    path = Path(path)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/" + RAW_CSV) or n == RAW_CSV]
            if not names:
                raise FileNotFoundError(f"{path}: no {RAW_CSV} inside the archive")
            data = z.read(names[0])
        src = io.BytesIO(data)
    else:
        src = path
    df = pd.read_csv(src, sep="\t", dtype=str, keep_default_na=False)
    missing = [c for c in FIELDS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: {RAW_CSV} lacks column(s) {missing}; it has {list(df.columns)}")
    return df


def encode_log(df: pd.DataFrame) -> tuple[np.ndarray, list[int]]:
    """Raw log -> global ids [n, 10] and the number of ids of each field."""
    user = df["user"].astype(np.int64).to_numpy()
    item = df["item"].astype(np.int64).to_numpy()
    sizes = [int(user.max()) + 1, int(item.max()) + 1]
    cols = [user, item]
    for c in CONTEXT:
        codes, uniq = pd.factorize(df[c], sort=False)  # order of first appearance
        cols.append(codes.astype(np.int64))
        sizes.append(len(uniq))
    offsets = np.cumsum([0, *sizes[:-1]])
    return np.stack(cols, 1) + offsets, sizes


def _occurrence_keys(ids: np.ndarray) -> pd.DataFrame:
    """Rows plus their occurrence number among equal rows (for a multiset difference)."""
    df = pd.DataFrame(ids, columns=list(FIELDS))
    df["occ"] = df.groupby(list(FIELDS), sort=False).cumcount()
    return df


def train_positives(raw_ids: np.ndarray, eval_positives: np.ndarray, source: str = "") -> np.ndarray:
    """Raw rows minus one equal raw row per valid/test positive."""
    raw = _occurrence_keys(raw_ids)
    ev = _occurrence_keys(eval_positives)
    merged = raw.merge(ev.assign(_eval=True), on=[*FIELDS, "occ"], how="left")
    claimed = int(merged["_eval"].notna().sum())
    if claimed != len(eval_positives):
        raise ValueError(
            f"{len(eval_positives) - claimed:,} of the {len(eval_positives):,} valid/test positives match no "
            f"row of the raw log{source}: these are not the Frappe_x1 files for this log (or the ids are "
            "laid out differently)"
        )
    return merged.loc[merged["_eval"].isna(), list(FIELDS)].to_numpy(np.int64)


def rebuild_train(
    raw_ids: np.ndarray, sizes: list[int], positives: np.ndarray, negatives: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positives plus ``negatives`` rows per positive (same user and context, an item the
    user never used in the log, distinct per positive), shuffled."""
    rng = np.random.default_rng(seed)
    n_users, n_items = sizes[0], sizes[1]
    user, item = raw_ids[:, 0], raw_ids[:, 1] - n_users
    keys = interacted_keys(user, item + 1, n_items)  # sample_negatives counts items from 1
    pos_user = positives[:, 0]
    neg_items = sample_negatives(pos_user, negatives, keys, n_items, rng, distinct=negatives > 1) - 1
    neg = np.repeat(positives, negatives, axis=0)
    neg[:, 1] = neg_items.ravel() + n_users
    rows = np.concatenate([positives, neg])
    labels = np.concatenate([np.ones(len(positives), np.float32), np.zeros(len(neg), np.float32)])
    order = rng.permutation(len(rows))
    return labels[order], rows[order]


def _find(src: Path, names: tuple[str, ...], what: str) -> Path:
    for n in names:
        if (src / n).exists():
            return src / n
    raise FileNotFoundError(
        f"{src}: no {what} (looked for {', '.join(names)}). Frappe_x1's valid/test files come "
        "with BARS / the AFN code; the raw log is Mobile_Frappe.zip (see docs/real-data.md)"
    )


def convert_frappe(
    src: str | Path,
    out: str | Path,
    *,
    negatives: int = 2,
    seed: int = 0,
    overwrite: bool = False,
    name: str = "frappe",
) -> DatasetSchema:
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(
            f"{src}: not a folder (give the folder holding valid.libsvm, test.libsvm and "
            "Mobile_Frappe.zip or frappe.csv)"
        )
    if negatives < 1:
        raise ValueError(f"--negatives must be >= 1, got {negatives}")
    raw_path = _find(src, ("Mobile_Frappe.zip", RAW_CSV, f"Mobile_Frappe/frappe/{RAW_CSV}"), "raw Frappe log")
    splits = {s: read_libsvm(_find(src, (f"{s}.libsvm",), f"{s}.libsvm")) for s in ("valid", "test")}
    raw_ids, sizes = encode_log(read_raw_log(raw_path))
    total = sum(sizes)
    for s, (_, ids) in splits.items():
        if ids.min() < 0 or ids.max() >= total:
            raise ValueError(
                f"{src / (s + '.libsvm')}: ids outside 0..{total - 1}, the id range of {raw_path}"
            )
    eval_pos = np.concatenate([ids[lab > 0] for lab, ids in splits.values()])
    pos = train_positives(raw_ids, eval_pos, f" {raw_path}")
    splits = {"train": rebuild_train(raw_ids, sizes, pos, negatives, seed), **splits}
    offsets = np.cumsum([0, *sizes[:-1]])
    for s, (_, ids) in splits.items():
        f = np.searchsorted(offsets, ids, side="right") - 1
        if not (f == np.arange(len(FIELDS))).all():
            raise ValueError(
                f"{s}: some id lies outside its field's range (fields are laid out {list(offsets)})"
            )

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        files, rows = {}, {}
        for s, (lab, ids) in splits.items():
            local = ids - offsets
            table = pa.table({"label": lab, **{c: local[:, j] for j, c in enumerate(FIELDS)}})
            w = PartWriter(tmp, s, table.schema)
            w.write(table)
            w.close()
            files[s], rows[s] = w.files, w.rows
        schema = DatasetSchema(
            name=name,
            dense=[],
            categorical=[CategoricalFeature(c, n, "vocab", n) for c, n in zip(FIELDS, sizes, strict=True)],
            splits=files,
            rows=rows,
            extra={
                "source": f"frappe:{src.resolve()}",
                "protocol": "BARS Frappe_x1 (train rebuilt from the raw log)",
                "global_id_offsets": dict(zip(FIELDS, map(int, offsets), strict=True)),
                "train_positives": len(pos),
                "train_negatives_per_positive": negatives,
                "seed": seed,
                "ctr": {s: float(lab.mean()) for s, (lab, _) in splits.items()},
            },
        )
        schema.save(tmp)
    return schema
