"""Behaviour-sequence samples from an event log (shared by MovieLens, generic behaviour
logs and the synthetic sequence generator).

An event log is (user, item, timestamp[, label]) with every id already a vocabulary id
in ``1..n`` (0 is reserved: padding / unknown). From it :func:`build_samples` makes one
sample per target event: user features, the target item and its side features, the
user's history of earlier items (and their side features) and a label.

**Event order and leakage.** Events of a user are ordered by ``(timestamp, row in the
source file)`` (a stable sort). ``ties="strict"`` (default) gives an event only the
events with a *smaller timestamp* as history, so none of the many same-second ratings of
ML-100k leak into each other; ``ties="order"`` gives it every event earlier in that
order (RecBole's convention: a stable sort by timestamp, then all earlier positions).
History keeps the ``max_len`` most recent events, oldest first.

**Labels.** ``threshold``: every event is a sample, label = given label (MovieLens:
rating >= t). ``sampled``: every event is a positive, plus negatives drawn uniformly
from the items the user never interacted with (at any time); the negative keeps the
positive's user, history and timestamp.

**Splits.** ``loo`` (leave-one-out by time per user): last event -> test, the one
before -> valid, every earlier one -> train (users with fewer than 3 events stay in
train). ``time``: a global cut on target timestamps (quantiles ``1 - valid_frac -
test_frac`` and ``1 - test_frac``).

**RecBole protocol** (``sampled`` + ``loo``): valid/test rank each user's positive among
``eval_negatives`` (100) sampled negatives, fixed at conversion; train stores every
positive with one set of negatives (epoch 0), and :class:`EpochNegatives` redraws the
training negatives for each epoch seeded by ``(seed, epoch)`` (the dataset's
``extra["negatives"]`` says so; see the trainer hook in docs/readme/sequences.md).

Everything is vectorised numpy over the whole log: no Python loop per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embtables import faults
from embtables.datasets.parquet_out import ROW_GROUP_ROWS, PartWriter, atomic_output_dir
from embtables.datasets.schema import CategoricalFeature, DatasetSchema, SequenceFeature

PAD_ID = 0
META_DIR = "meta"
ITEMS_FILE = f"{META_DIR}/items.parquet"
USER_ITEMS_FILE = f"{META_DIR}/user_items.parquet"
ID_COUNTS_FILE = f"{META_DIR}/id_counts.npz"


# ---- inputs -----------------------------------------------------------------------------


@dataclass
class SideFeatures:
    """Per-id categorical features: ``columns[name][id]`` for ids ``0..n`` (row 0 = the
    padding/unknown id, value 0). ``cardinality`` counts distinct non-zero values."""

    key: str
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    def num_embeddings(self, name: str) -> int:
        return int(self.columns[name].max(initial=0)) + 1


@dataclass
class EventLog:
    user: np.ndarray  # int64 ids 1..num_users
    item: np.ndarray  # int64 ids 1..num_items
    ts: np.ndarray  # int64
    label: np.ndarray | None = None  # 0/1 per event (threshold mode)
    num_users: int = 0
    num_items: int = 0
    user_side: SideFeatures | None = None  # key "user_id"
    item_side: SideFeatures | None = None  # key "item_id"

    def __post_init__(self) -> None:
        n = len(self.user)
        if not (len(self.item) == len(self.ts) == n) or (self.label is not None and len(self.label) != n):
            raise ValueError("event log columns differ in length")
        self.num_users = self.num_users or int(self.user.max(initial=0))
        self.num_items = self.num_items or int(self.item.max(initial=0))
        if n and (self.user.min() < 1 or self.item.min() < 1):
            raise ValueError("event ids must be vocabulary ids >= 1 (0 is the padding id)")


@dataclass
class SampleConfig:
    mode: Literal["sampled", "threshold"] = "sampled"
    split: Literal["loo", "time"] = "loo"
    max_len: int = 50
    ties: Literal["strict", "order"] = "strict"
    neg_ratio: int = 1  # negatives per training positive (sampled mode)
    eval_negatives: int = 100  # negatives per valid/test positive (sampled mode)
    valid_frac: float = 0.1  # time split
    test_frac: float = 0.1
    history_from: Literal["all", "positive"] = "all"  # threshold mode: which events form the history
    min_history: int = 0  # drop samples with a shorter history
    seed: int = 0
    user_feature: str = "user_id"
    item_feature: str = "item_id"
    hist_prefix: str = "hist_"

    def __post_init__(self) -> None:
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        if self.mode == "sampled" and self.neg_ratio < 0:
            raise ValueError(f"neg_ratio must be >= 0, got {self.neg_ratio}")


# ---- vectorised helpers -------------------------------------------------------------------


def ranges_to_flat(start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(start[i], start[i] + length[i])`` for all i, vectorised."""
    length = length.astype(np.int64)
    total = int(length.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.zeros(len(length) + 1, np.int64)
    np.cumsum(length, out=offsets[1:])
    return np.arange(total, dtype=np.int64) - np.repeat(offsets[:-1] - start.astype(np.int64), length)


def list_array(values: np.ndarray, length: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(length) + 1, np.int32 if len(values) < 2**31 else np.int64)
    np.cumsum(length, out=offsets[1:])
    if offsets.dtype == np.int64:
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int64())).cast(
            pa.list_(pa.int64()))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int64()))


def interacted_keys(user: np.ndarray, item: np.ndarray, num_items: int) -> np.ndarray:
    """Sorted unique ``user * (num_items + 1) + item`` keys: O(log n) membership tests."""
    return np.unique(user.astype(np.int64) * (num_items + 1) + item.astype(np.int64))


def sample_negatives(
    users: np.ndarray, n_per_user_row: int, keys: np.ndarray, num_items: int, rng: np.random.Generator,
    distinct: bool = False, max_rounds: int = 1000,
) -> np.ndarray:
    """``[len(users), n]`` items drawn uniformly from ``1..num_items`` minus the items
    each user interacted with (``keys`` from :func:`interacted_keys`), by vectorised
    rejection. ``distinct``: no repeats within a row (used for the 100 eval negatives)."""
    m = len(users)
    out = rng.integers(1, num_items + 1, size=(m, n_per_user_row), dtype=np.int64)
    if m == 0 or n_per_user_row == 0:
        return out
    ukey = users.astype(np.int64)[:, None] * (num_items + 1)
    for _ in range(max_rounds):
        k = ukey + out
        pos = np.searchsorted(keys, k.ravel()).clip(max=len(keys) - 1)
        bad = (keys[pos] == k.ravel()).reshape(m, n_per_user_row)
        if distinct and n_per_user_row > 1:
            order = np.argsort(out, axis=1, kind="stable")
            s = np.take_along_axis(out, order, axis=1)
            dup_sorted = np.zeros_like(bad)
            dup_sorted[:, 1:] = s[:, 1:] == s[:, :-1]
            dup = np.zeros_like(bad)
            np.put_along_axis(dup, order, dup_sorted, axis=1)
            bad |= dup
        nbad = int(bad.sum())
        if nbad == 0:
            return out
        out[bad] = rng.integers(1, num_items + 1, size=nbad, dtype=np.int64)
    raise RuntimeError(
        f"could not sample {n_per_user_row} negatives for some users in {max_rounds} rounds: "
        f"they interacted with almost every one of the {num_items} items"
    )


# ---- building samples ---------------------------------------------------------------------


@dataclass
class Samples:
    """Columns of every split plus what the epoch resampler and the model need."""

    tables: dict[str, pa.Table]
    schema: DatasetSchema
    items: pa.Table  # item_id + item side columns
    user_items: pa.Table  # user_id, items list<int64>
    id_counts: dict[str, np.ndarray]  # feature -> occurrences in training samples (target + history)


def _history_bounds(user: np.ndarray, ts: np.ndarray, eligible: np.ndarray, cfg: SampleConfig):
    """For events sorted by (user, ts, row): [start, end) into the sorted arrays of
    *eligible* events (the history source) for each event's history."""
    n = len(user)
    src = np.flatnonzero(eligible)  # positions of history-source events in sorted order
    # cumulative count of eligible events strictly before position i (in order)
    before = np.concatenate([[0], np.cumsum(eligible)[:-1]]) if n else np.zeros(0, np.int64)
    if cfg.ties == "strict":
        # first position of the (user, ts) tie group: eligible events before it are strictly earlier
        new_group = np.ones(n, bool)
        new_group[1:] = (user[1:] != user[:-1]) | (ts[1:] != ts[:-1])
        group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
        end = before[group_start]
    else:
        end = before
    new_user = np.ones(n, bool)
    new_user[1:] = user[1:] != user[:-1]
    user_start_pos = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))
    user_start = before[user_start_pos]
    start = np.maximum(user_start, end - cfg.max_len)
    return src, start, end


def build_samples(log: EventLog, cfg: SampleConfig, name: str, source: str = "") -> Samples:
    rng = np.random.default_rng(cfg.seed)
    n = len(log.user)
    order = np.lexsort((np.arange(n), log.ts, log.user))  # by user, then (ts, original row)
    user, item, ts = log.user[order], log.item[order], log.ts[order]
    label = None if log.label is None else log.label[order].astype(np.float32)
    if cfg.mode == "threshold" and label is None:
        raise ValueError("threshold mode needs a label per event (e.g. rating >= threshold)")

    eligible = np.ones(n, bool)
    if cfg.mode == "threshold" and cfg.history_from == "positive":
        eligible = label > 0
    src, hstart, hend = _history_bounds(user, ts, eligible, cfg)
    hlen = hend - hstart

    # split per event (the sample's target event)
    split = np.zeros(n, np.int8)  # 0 train, 1 valid, 2 test
    if cfg.split == "loo":
        last = np.ones(n, bool)
        last[:-1] = user[1:] != user[:-1]
        count = np.bincount(user, minlength=log.num_users + 1)[user]
        second = np.zeros(n, bool)
        second[:-1] = last[1:]
        split[last & (count >= 3)] = 2
        split[second & (count >= 3)] = 1
    else:
        t_valid, t_test = np.quantile(ts, [1 - cfg.valid_frac - cfg.test_frac, 1 - cfg.test_frac])
        split[ts >= t_valid] = 1
        split[ts >= t_test] = 2
    keep = hlen >= cfg.min_history

    item_side = log.item_side or SideFeatures("item_id", {})
    user_side = log.user_side or SideFeatures("user_id", {})
    keys = interacted_keys(user, item, log.num_items)

    tables: dict[str, pa.Table] = {}
    for s, sname in enumerate(("train", "valid", "test")):
        idx = np.flatnonzero((split == s) & keep)
        if cfg.mode == "sampled":
            k = cfg.neg_ratio if sname == "train" else cfg.eval_negatives
            _check_negatives_exist(user[idx], k, keys, log.num_items, distinct=sname != "train")
            negs = sample_negatives(user[idx], k, keys, log.num_items, rng, distinct=sname != "train")
            # row layout: each positive followed by its k negatives (kept together, so a
            # user's ranking group is contiguous in valid/test)
            rows = np.repeat(idx, k + 1)
            tgt = np.concatenate([item[idx][:, None], negs], axis=1).ravel()
            lab = np.tile(np.r_[1.0, np.zeros(k)].astype(np.float32), len(idx))
        else:
            rows, tgt, lab = idx, item[idx], label[idx]
        tables[sname] = _sample_table(rows, tgt, lab, user, ts, src, hstart, hlen, item, item_side,
                                      user_side, cfg)

    _check_splits(tables, cfg, n)
    # catalogue for per-epoch negatives and frequencies for the DIN regulariser
    items = pa.table({cfg.item_feature: np.arange(log.num_items + 1, dtype=np.int64),
                      **{c: v.astype(np.int64) for c, v in item_side.columns.items()}})
    user_items = pa.table({
        cfg.user_feature: np.arange(log.num_users + 1, dtype=np.int64),
        "items": _user_item_lists(user, item, log.num_users),
    })
    id_counts = _id_counts(tables["train"], cfg, item_side, log)

    schema = _make_schema(name, log, item_side, user_side, cfg, tables, source)
    return Samples(tables, schema, items, user_items, id_counts)


def _check_negatives_exist(users: np.ndarray, k: int, keys: np.ndarray, num_items: int,
                           distinct: bool) -> None:
    """Refuse up front when some user has fewer never-seen items than the negatives asked
    for (rejection sampling would only give up after its rounds, blaming the data)."""
    if k == 0 or len(users) == 0:
        return
    seen = np.bincount(keys // (num_items + 1), minlength=int(users.max()) + 1)[users]
    free = num_items - seen
    need = k if distinct else 1
    short = free < need
    if not short.any():
        return
    flag = "--eval-negatives" if distinct else "--neg-ratio"
    if num_items - 1 < need:
        raise ValueError(f"the catalogue has only {num_items} items: {flag} {k} asks for {k} distinct items "
                         f"besides each positive; lower {flag} to at most {max(int(free.min()), 0)}")
    users_short = len(np.unique(users[short]))
    raise ValueError(f"{users_short:,} users interacted with so many of the {num_items} items "
                     f"that fewer than {need} are left to draw as negatives ({flag} {k}); lower {flag} to at "
                     f"most {max(int(free.min()), 0)}")


def _check_splits(tables: dict[str, pa.Table], cfg: SampleConfig, events: int) -> None:
    """A split the configuration asks for must get samples (train always; valid/test under
    ``loo``, or with a fraction above 0 under ``time``)."""
    asked = {"train": True, "valid": cfg.split == "loo" or cfg.valid_frac > 0,
             "test": cfg.split == "loo" or cfg.test_frac > 0}
    empty = [s for s, t in tables.items() if asked[s] and t.num_rows == 0]
    if not empty:
        return
    if events == 0:
        raise ValueError("the event log is empty (no rows after the header)")
    why = ("under --split loo only users with 3 or more events get a valid and a test sample"
           if cfg.split == "loo" and "train" not in empty else
           f"--split {cfg.split}, --min-history {cfg.min_history}")
    raise ValueError(f"split {'/'.join(empty)} has no samples ({events:,} events; {why})")


def _sample_table(rows, tgt, lab, user, ts, src, hstart, hlen, item, item_side, user_side, cfg) -> pa.Table:
    cols: dict[str, pa.Array | np.ndarray] = {"label": lab.astype(np.float32)}
    u = user[rows]
    cols[cfg.user_feature] = u
    for c, v in user_side.columns.items():
        cols[c] = v[u]
    cols[cfg.item_feature] = tgt.astype(np.int64)
    for c, v in item_side.columns.items():
        cols[c] = v[tgt]
    lengths = hlen[rows]
    flat = src[ranges_to_flat(hstart[rows], lengths)]
    hist_items = item[flat]
    cols[cfg.hist_prefix + cfg.item_feature] = list_array(hist_items, lengths)
    for c, v in item_side.columns.items():
        cols[cfg.hist_prefix + c] = list_array(v[hist_items], lengths)
    cols["ts"] = ts[rows]
    return pa.table(cols)


def _user_item_lists(user: np.ndarray, item: np.ndarray, num_users: int) -> pa.ListArray:
    keyed = np.unique(user.astype(np.int64) * (2**32) + item)
    u, it = keyed // 2**32, keyed % 2**32
    lengths = np.bincount(u, minlength=num_users + 1)
    return list_array(it, lengths)


def _id_counts(train: pa.Table, cfg: SampleConfig, item_side: SideFeatures,
               log: EventLog) -> dict[str, np.ndarray]:
    """n_j of the DIN paper: occurrences of id j in the training samples (as target or in
    a history), counted with ``bincount`` over all of them; user features: rows."""
    out: dict[str, np.ndarray] = {}
    for feat in [cfg.item_feature, *item_side.columns]:
        size = (log.num_items + 1) if feat == cfg.item_feature else item_side.num_embeddings(feat)
        tgt = train.column(feat).to_numpy()
        hist = train.column(cfg.hist_prefix + feat).combine_chunks()
        off = hist.offsets.to_numpy()
        vals = hist.values.to_numpy()[off[0]:off[-1]]
        out[feat] = (np.bincount(tgt, minlength=size) + np.bincount(vals, minlength=size)).astype(np.int64)
    for feat in [cfg.user_feature, *(log.user_side.columns if log.user_side else [])]:
        out[feat] = np.bincount(train.column(feat).to_numpy()).astype(np.int64)
    return out


def _make_schema(name, log, item_side, user_side, cfg, tables, source) -> DatasetSchema:
    def cat(n: str, values: np.ndarray) -> CategoricalFeature:
        num = int(values.max(initial=0)) + 1
        return CategoricalFeature(n, cardinality=int(np.count_nonzero(np.unique(values))), mode="vocab",
                                  num_embeddings=num)

    cats = [CategoricalFeature(cfg.user_feature, log.num_users, "vocab", log.num_users + 1)]
    cats += [cat(c, v) for c, v in user_side.columns.items()]
    cats.append(CategoricalFeature(cfg.item_feature, log.num_items, "vocab", log.num_items + 1))
    item_cats = [cat(c, v) for c, v in item_side.columns.items()]
    cats += item_cats
    seqs = [SequenceFeature(cfg.hist_prefix + cfg.item_feature, log.num_items, cfg.max_len,
                            shares_with=cfg.item_feature, num_embeddings=log.num_items + 1)]
    seqs += [SequenceFeature(cfg.hist_prefix + c.name, c.cardinality, cfg.max_len, shares_with=c.name,
                             num_embeddings=c.num_embeddings) for c in item_cats]
    extra = {
        "source": source,
        "kind": "sequence",
        "sample": {k: getattr(cfg, k) for k in ("mode", "split", "max_len", "ties", "neg_ratio",
                                                 "eval_negatives", "valid_frac", "test_frac", "history_from",
                                                 "min_history", "seed")},
        "user_feature": cfg.user_feature,  # GAUC groups rows by this categorical
        "item_feature": cfg.item_feature,
        "id_counts": ID_COUNTS_FILE,
        "events": int(len(log.user)),
        "extra_columns": ["ts"],
    }
    if cfg.mode == "sampled":
        extra["negatives"] = {
            "resample_per_epoch": True,
            "ratio": cfg.neg_ratio,
            "items": ITEMS_FILE,
            "user_items": USER_ITEMS_FILE,
            "item_side_features": list(item_side.columns),
            "eval_group_size": cfg.eval_negatives + 1,
        }
    return DatasetSchema(name=name, dense=[], categorical=cats, sequences=seqs, label="label",
                         prob_column=None, rows={k: t.num_rows for k, t in tables.items()}, extra=extra)


# ---- writing --------------------------------------------------------------------------


def write_samples(samples: Samples, out: str | Path, overwrite: bool = False,
                  row_group_rows: int | None = None) -> Path:
    """Parquet parts per split + meta/ files + schema.json (last, atomically)."""
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        splits: dict[str, list[str]] = {}
        for sname, table in samples.tables.items():
            w = PartWriter(tmp, sname, table.schema, row_group_rows=row_group_rows or ROW_GROUP_ROWS)
            w.write(table)
            w.close()
            splits[sname] = w.files
            faults.hit("convert_block", str(out))  # a split written
        (tmp / META_DIR).mkdir(exist_ok=True)
        pq.write_table(samples.items, tmp / ITEMS_FILE)
        pq.write_table(samples.user_items, tmp / USER_ITEMS_FILE)
        np.savez(tmp / ID_COUNTS_FILE, **samples.id_counts)
        samples.schema.splits = splits
        samples.schema.save(tmp)
    return Path(out)


def load_id_counts(root: str | Path) -> dict[str, np.ndarray]:
    path = Path(root) / ID_COUNTS_FILE
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# ---- per-epoch training negatives ---------------------------------------------------------


class EpochNegatives:
    """Redraws the training negatives of a ``sampled`` dataset for each epoch.

    The stored train split holds every positive followed by its epoch-0 negatives; this
    keeps the positives, draws ``ratio`` fresh negatives per positive from
    ``numpy.random.default_rng([seed, epoch])`` (never an item the user interacted
    with) and returns the epoch's table (same columns, positives then negatives
    interleaved as stored). ``files(epoch, seed, cache_dir)`` writes it as Parquet for
    a file-based reader.
    """

    def __init__(self, root: str | Path, schema: DatasetSchema, split: str = "train") -> None:
        neg = schema.extra.get("negatives")
        if not neg:
            raise ValueError(f"{root}: dataset has no resampled negatives (extra.negatives missing)")
        self.root, self.schema, self.ratio = Path(root), schema, int(neg["ratio"])
        self.item_feature = schema.extra["item_feature"]
        self.user_feature = schema.extra["user_feature"]
        self.side = list(neg["item_side_features"])
        table = pa.concat_tables([pq.read_table(p) for p in schema.files(root, split)])
        lab = table.column(schema.label).to_numpy()
        self.positives = table.filter(pa.array(lab > 0))
        items = pq.read_table(self.root / neg["items"])
        self.item_cols = {c: items.column(c).to_numpy() for c in self.side}
        self.num_items = items.num_rows - 1
        ui = pq.read_table(self.root / neg["user_items"])
        lists = ui.column("items").combine_chunks()
        lens = np.diff(lists.offsets.to_numpy())
        users = np.repeat(ui.column(self.user_feature).to_numpy(), lens)
        self.keys = interacted_keys(users, lists.values.to_numpy(), self.num_items)

    def table(self, epoch: int, seed: int) -> pa.Table:
        rng = np.random.default_rng([seed, epoch])
        pos = self.positives
        n, k = pos.num_rows, self.ratio
        users = pos.column(self.user_feature).to_numpy()
        negs = sample_negatives(users, k, self.keys, self.num_items, rng).ravel()
        take = np.repeat(np.arange(n), k + 1)
        out = pos.take(pa.array(take))
        is_neg = np.tile(np.r_[False, np.ones(k, bool)], n)
        tgt = out.column(self.item_feature).to_numpy().copy()
        tgt[is_neg] = negs
        cols = {self.schema.label: np.where(is_neg, 0.0, 1.0).astype(np.float32), self.item_feature: tgt}
        for c in self.side:
            cols[c] = self.item_cols[c][tgt]
        for c, v in cols.items():
            i = out.schema.get_field_index(c)
            out = out.set_column(i, out.schema.field(c), pa.array(v, out.schema.field(c).type))
        return out

    def files(self, epoch: int, seed: int, cache_dir: str | Path) -> list[Path]:
        path = Path(cache_dir) / f"train-seed{seed}-epoch{epoch}.parquet"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            pq.write_table(self.table(epoch, seed), tmp, row_group_size=65536)
            tmp.replace(path)
        return [path]


# ---- in-memory batches (small sequence datasets, tests, benchmarks) -----------------------


def read_split(root: str | Path, schema: DatasetSchema, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in schema.files(root, split)])


class TableBatcher:
    """Arrow table (one split, in memory) -> ``Batch`` with the reader's layout:
    dense float32 [B, n_dense], KJT keys = categorical then sequence features in schema
    order, labels float32 [B]. Columns are converted to numpy once; each batch is a few
    vectorised gathers."""

    def __init__(self, table: pa.Table, schema: DatasetSchema) -> None:
        self.schema = schema
        self.n = table.num_rows
        self.label = table.column(schema.label).to_numpy().astype(np.float32)
        self.dense = (np.stack([table.column(c).to_numpy().astype(np.float32) for c in schema.dense], 1)
                      if schema.dense else np.zeros((self.n, 0), np.float32))
        self.cat = np.stack([table.column(c.name).to_numpy().astype(np.int64) for c in schema.categorical], 1)
        self.seq = []
        for s in schema.sequences:
            arr = table.column(s.name).combine_chunks()
            off = arr.offsets.to_numpy().astype(np.int64)
            vals = arr.values.to_numpy().astype(np.int64)[off[0]:off[-1]]
            self.seq.append((off - off[0], vals))
        self.keys = [c.name for c in schema.categorical] + [s.name for s in schema.sequences]
        self.prob = table.column(schema.prob_column).to_numpy() if schema.prob_column else None

    def batch(self, rows: np.ndarray) -> Batch:
        b = len(rows)
        values = [self.cat[rows].T.ravel()]
        lengths = [np.ones(b * self.cat.shape[1], np.int64)]
        for off, vals in self.seq:
            start, ln = off[rows], off[rows + 1] - off[rows]
            values.append(vals[ranges_to_flat(start, ln)])
            lengths.append(ln)
        kjt = KeyedJaggedTensor(
            keys=self.keys,
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
        )
        return Batch(dense_features=torch.from_numpy(self.dense[rows]), sparse_features=kjt,
                     labels=torch.from_numpy(self.label[rows]))

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False):
        order = np.random.default_rng(seed).permutation(self.n) if shuffle else np.arange(self.n)
        stop = self.n - (self.n % batch_size if drop_last else 0)
        for i in range(0, stop, batch_size):
            yield self.batch(order[i:i + batch_size])
