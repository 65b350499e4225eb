"""Generic behaviour logs -> sequence dataset (``embtables data behavior SRC --out DIR``).

SRC is a CSV/TSV file (or a Parquet file) with one event per row: user, item,
category, timestamp and optionally a 0/1 label (Amazon reviews, Taobao user
behaviour, any CTR log). Columns are named by flags (``--user-col`` ...) or by a
YAML file (``--columns FILE`` with keys ``user``, ``item``, ``category``,
``timestamp``, ``label``, ``sep``, ``header``). With a label column the default mode
is ``threshold`` (label >= 1 is a click, history = earlier clicked events); without
one, ``sampled`` (every event a positive plus sampled negatives).

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


@dataclass
class ColumnMap:
    user: str = "user"
    item: str = "item"
    category: str | None = "category"
    timestamp: str = "timestamp"
    label: str | None = None
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
            f"{src}: column(s) {missing} not found (columns: {list(df.columns)}); "
            "name them with --user-col/--item-col/--category-col/--time-col/--label-col or --columns FILE"
        )
    out = pd.DataFrame({k: df[v] for k, v in wanted.items()})
    ts = pd.to_numeric(out["timestamp"], errors="coerce")
    if ts.isna().any():
        # timestamps may be dates: convert to epoch seconds
        parsed = pd.to_datetime(out["timestamp"], errors="coerce", utc=True)
        if parsed.isna().any():
            row = int(np.flatnonzero(parsed.isna().to_numpy())[0])
            raise ValueError(f"{src}: row {row + 1 + cols.header}: timestamp {out['timestamp'].iloc[row]!r} is neither "
                             "a number nor a date")
        ts = parsed.astype("int64") // 10**9
    out["timestamp"] = ts.astype(np.int64)
    if cols.label:
        lab = pd.to_numeric(out["label"], errors="coerce")
        if lab.isna().any():
            row = int(np.flatnonzero(lab.isna().to_numpy())[0])
            raise ValueError(f"{src}: row {row + 1 + cols.header}: label {out['label'].iloc[row]!r} is not a number")
        out["label"] = (lab >= 1).astype(np.float32)
    return out


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
                     cfg: SampleConfig | None = None, name: str | None = None, overwrite: bool = False) -> Path:
    cols = cols or ColumnMap()
    df = read_events(src, cols)
    if cfg is None:
        cfg = SampleConfig(mode="threshold" if cols.label else "sampled",
                           history_from="positive" if cols.label else "all")
    if cfg.mode == "threshold" and not cols.label:
        raise ValueError("threshold mode needs a label column (--label-col); without one use --mode sampled")
    log = to_event_log(df)
    samples = build_samples(log, cfg, name=name or Path(src).stem, source=f"behavior:{Path(src).resolve()}")
    return write_samples(samples, out, overwrite=overwrite)
