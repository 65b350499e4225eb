"""Generic behaviour logs -> sequence dataset (``embtables data behavior SRC --out DIR``).

SRC is a CSV/TSV file (or a Parquet file) with one event per row: user, item,
category, timestamp and optionally a 0/1 label (Amazon reviews, Taobao user
behaviour, any CTR log). Columns are named by flags (``--user-col`` ...) or by a
YAML file (``--columns FILE`` with keys ``user``, ``item``, ``category``,
``timestamp``, ``label``, ``label_threshold``, ``sep``, ``header``). With a label column
the default mode is ``threshold`` (history = earlier clicked events); without one,
``sampled`` (every event a positive plus sampled negatives). Labels must be 0 or 1, unless
``--label-threshold T`` says how to map them (label >= T is a click): a column of
ratings 1-5 or of labels {1, 2} is refused rather than read as all clicks.

Raw ids (any strings or integers) become vocabulary ids ``1..n``; an item's category
is the category of its first event.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from embtables.datasets.sequences import EventLog, SampleConfig, SideFeatures, build_samples, write_samples
from embtables.errors import clip


@dataclass
class ColumnMap:
    user: str = "user"
    item: str = "item"
    category: str | None = "category"
    timestamp: str = "timestamp"
    label: str | None = None
    label_threshold: float | None = None  # label >= this is a click; None: labels must be 0/1
    sep: str | None = None  # None: from the suffix (.tsv/.txt tab, else comma)
    header: bool = True

    @classmethod
    def from_yaml(cls, path: str | Path) -> ColumnMap:
        path = Path(path)
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of column names")
        valid = {f.name for f in fields(cls)}
        bad = sorted(set(data) - valid)
        if bad:
            raise ValueError(f"{path}: unknown key(s) {bad}; valid keys: {', '.join(sorted(valid))}")
        return cls(**data)


def read_events(src: str | Path, cols: ColumnMap) -> pd.DataFrame:
    src = Path(src)
    if src.is_dir():
        raise IsADirectoryError(f"input {src} is a directory, not an event file (CSV, TSV or Parquet)")
    if not src.exists():
        raise FileNotFoundError(f"{src} not found")
    if src.suffix == ".parquet":
        df = pd.read_parquet(src)
    else:
        sep = cols.sep or ("\t" if src.suffix in (".tsv", ".txt") else ",")
        if cols.header:
            df = pd.read_csv(src, sep=sep, dtype=str, keep_default_na=False)
        else:
            df = pd.read_csv(src, sep=sep, dtype=str, header=None, keep_default_na=False)
            df.columns = [str(c) for c in df.columns]  # positional names "0", "1", ...
    wanted = {"user": cols.user, "item": cols.item, "timestamp": cols.timestamp}
    if cols.category:
        wanted["category"] = cols.category
    if cols.label:
        wanted["label"] = cols.label
    missing = {k: v for k, v in wanted.items() if v not in df.columns}
    if missing:
        raise ValueError(
            f"{src}: column(s) {missing} not found (columns: {clip(list(df.columns))}); "
            "name them with --user-col/--item-col/--category-col/--time-col/--label-col or --columns FILE"
        )
    out = pd.DataFrame({k: df[v] for k, v in wanted.items()})
    out["timestamp"] = _timestamps(out["timestamp"], src, cols)
    if cols.label:
        out["label"] = _labels(out["label"], src, cols)
    return out


def _line(row: int, cols: ColumnMap) -> int:
    return row + 1 + cols.header  # file line of a 0-based data row


def _timestamps(raw: pd.Series, src: Path, cols: ColumnMap) -> np.ndarray:
    """Epoch seconds: numbers as they are, or dates -- one or the other for the whole column.
    The row named in an error is the first that is neither (or, in a column of dates, the
    first that is not a date)."""
    num = pd.to_numeric(raw, errors="coerce")
    if not num.isna().any():
        return num.to_numpy().astype(np.int64)
    parsed = pd.to_datetime(raw.where(num.isna()), errors="coerce", utc=True, format="mixed")
    neither = (num.isna() & parsed.isna()).to_numpy()
    if neither.any():
        row = int(np.flatnonzero(neither)[0])
        raise ValueError(f"{src}: line {_line(row, cols)}: timestamp {clip(raw.iloc[row])} is neither a "
                         "number nor a date")
    if num.isna().all():
        return ((parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy().astype(np.int64)
    row = int(np.flatnonzero(num.notna().to_numpy())[0])  # both kinds present
    date = raw.iloc[int(np.flatnonzero(num.isna().to_numpy())[0])]
    raise ValueError(f"{src}: line {_line(row, cols)}: timestamp {clip(raw.iloc[row])} is a number, but the "
                     f"column also holds dates (e.g. {clip(date)}); use one or the other")


def _labels(raw: pd.Series, src: Path, cols: ColumnMap) -> np.ndarray:
    lab = pd.to_numeric(raw, errors="coerce")
    if lab.isna().any():
        row = int(np.flatnonzero(lab.isna().to_numpy())[0])
        raise ValueError(f"{src}: line {_line(row, cols)}: label {clip(raw.iloc[row])} is not a number")
    if cols.label_threshold is not None:
        return (lab >= cols.label_threshold).to_numpy(np.float32)
    bad = ~lab.isin((0, 1)).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        values = np.unique(lab.to_numpy())
        shown = ", ".join(f"{v:g}" for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raise ValueError(f"{src}: line {_line(row, cols)}: label {clip(raw.iloc[row])} is not 0 or 1 (the "
                         f"column holds {shown}); say which are clicks with --label-threshold T "
                         "(label >= T is a click)")
    return lab.to_numpy(np.float32)


def to_event_log(df: pd.DataFrame) -> EventLog:
    user_codes, users = pd.factorize(df["user"].astype(str), sort=True)
    item_codes, items = pd.factorize(df["item"].astype(str), sort=True)
    item_side = SideFeatures("item_id")
    if "category" in df:
        cat_codes, _ = pd.factorize(df["category"].astype(str), sort=True)
        # the category of an item's first event (items keep one category)
        first = np.unique(item_codes, return_index=True)[1]
        per_item = np.zeros(len(items) + 1, np.int64)
        per_item[item_codes[first] + 1] = cat_codes[first] + 1
        item_side.columns["category"] = per_item
    return EventLog(
        user=(user_codes + 1).astype(np.int64), item=(item_codes + 1).astype(np.int64),
        ts=df["timestamp"].to_numpy(np.int64),
        label=df["label"].to_numpy(np.float32) if "label" in df else None,
        num_users=len(users), num_items=len(items), item_side=item_side,
    )


def convert_behavior(src: str | Path, out: str | Path, *, cols: ColumnMap | None = None,
                     cfg: SampleConfig | None = None, name: str | None = None,
                     overwrite: bool = False) -> Path:
    cols = cols or ColumnMap()
    if cols.label_threshold is not None and not cols.label:
        raise ValueError("--label-threshold needs a label column (--label-col)")
    df = read_events(src, cols)
    if cfg is None:
        cfg = SampleConfig(mode="threshold" if cols.label else "sampled",
                           history_from="positive" if cols.label else "all")
    if cfg.mode == "threshold" and not cols.label:
        raise ValueError("threshold mode needs a label column (--label-col); without one use --mode sampled")
    log = to_event_log(df)
    samples = build_samples(log, cfg, name=name or Path(src).stem, source=f"behavior:{Path(src).resolve()}")
    return write_samples(samples, out, overwrite=overwrite)
