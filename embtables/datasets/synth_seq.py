"""Synthetic Criteo-style data with behaviour sequences and a planted interest structure
(``embtables data synth-seq --out DIR`` / :func:`generate_synth_seq`).

Columns: ``label``, ``prob`` (the true click probability, for oracle AUC), dense
``I1..I{n_dense}``, categoricals ``user_id``, ``item_id``, ``category``,
``C1..C{n_context}``, and ``list<int64>`` histories ``hist_item_id``,
``hist_category`` (oldest first), the same layout the Criteo path writes plus the list
columns.

The planted structure: items belong to ``num_categories`` categories; each user has
``interests_per_user`` favourite categories and a history of 1..``max_len`` behaviours
drawn mostly from them (plus noise). A sample's target item comes half the time from
one of the user's interests, half the time from anywhere. The click logit is driven by
how many of the history's behaviours share the target's category (saturating at
``saturate``), plus a small item popularity, dense and context effect. The relevance is
a *per-row* function of history and target: attention over the history reads it
directly, whereas sum/mean pooling has to recover a count hidden in a pooled vector,
and there are too many users (with few rows each) to learn it from ``user_id``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from embtables.datasets.schema import CategoricalFeature, DatasetSchema, SequenceFeature
from embtables.datasets.sequences import ID_COUNTS_FILE, Samples, list_array, write_samples


@dataclass
class SynthSeqConfig:
    rows: int = 150_000  # total rows, split train/valid/test by the fractions below
    valid_frac: float = 0.1
    test_frac: float = 0.1
    num_users: int = 50_000
    num_items: int = 5_000
    num_categories: int = 100
    interests_per_user: int = 3
    interest_share: float = 0.85  # share of history behaviours drawn from the user's interests
    max_len: int = 50
    min_len: int = 1
    n_dense: int = 4
    n_context: int = 4
    context_cardinality: int = 50
    saturate: int = 3
    relevance_weight: float = 3.0
    bias: float = -2.0
    seed: int = 0


def _simulate(cfg: SynthSeqConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n, k = cfg.rows, cfg.num_categories
    item_cat = rng.integers(1, k + 1, size=cfg.num_items + 1)
    item_cat[0] = 0
    # items of each category, for drawing "an item of category c" (Zipf-like popularity inside it)
    order = np.argsort(item_cat[1:], kind="stable") + 1
    cat_start = np.searchsorted(item_cat[order], np.arange(k + 2))
    pop = rng.normal(0, 1, cfg.num_items + 1)

    def item_of(cats: np.ndarray) -> np.ndarray:
        size = cat_start[cats + 1] - cat_start[cats]
        empty = size == 0
        rank = np.floor(size * rng.random(len(cats)) ** 2).astype(np.int64)  # skew to low ranks
        out = order[np.minimum(cat_start[cats] + rank, len(order) - 1)]
        out[empty] = rng.integers(1, cfg.num_items + 1, int(empty.sum()))
        return out

    interests = rng.integers(1, k + 1, size=(cfg.num_users + 1, cfg.interests_per_user))
    user = rng.integers(1, cfg.num_users + 1, n)
    length = rng.integers(cfg.min_len, cfg.max_len + 1, n)
    row = np.repeat(np.arange(n), length)
    from_interest = rng.random(len(row)) < cfg.interest_share
    hist_cat = np.where(from_interest,
                        interests[user[row], rng.integers(0, cfg.interests_per_user, len(row))],
                        rng.integers(1, k + 1, len(row)))
    hist_item = item_of(hist_cat)
    hist_cat = item_cat[hist_item]
    tgt_from_interest = rng.random(n) < 0.5
    tgt_cat = np.where(tgt_from_interest, interests[user, rng.integers(0, cfg.interests_per_user, n)],
                       rng.integers(1, k + 1, n))
    tgt_item = item_of(tgt_cat)
    tgt_cat = item_cat[tgt_item]
    same = np.bincount(row, weights=(hist_cat == tgt_cat[row]), minlength=n)
    relevance = np.minimum(same, cfg.saturate) / cfg.saturate
    dense = rng.exponential(1.0, (n, cfg.n_dense)).astype(np.float32)
    dense_w = rng.normal(0, 0.3, cfg.n_dense)
    ctx = rng.integers(1, cfg.context_cardinality + 1, (n, cfg.n_context))
    ctx_w = rng.normal(0, 0.3, (cfg.n_context, cfg.context_cardinality + 1))
    logit = (cfg.bias + cfg.relevance_weight * relevance + 0.5 * pop[tgt_item]
             + (np.log1p(dense) * dense_w).sum(1) + ctx_w[np.arange(cfg.n_context), ctx].sum(1))
    prob = 1 / (1 + np.exp(-logit))
    label = (rng.random(n) < prob).astype(np.float32)
    return dict(user=user, length=length, hist_item=hist_item, hist_cat=hist_cat, tgt_item=tgt_item,
                tgt_cat=tgt_cat, dense=dense, ctx=ctx, prob=prob.astype(np.float32), label=label)


def generate_synth_seq(cfg: SynthSeqConfig) -> Samples:
    rng = np.random.default_rng(cfg.seed)
    sim = _simulate(cfg, rng)
    n = cfg.rows
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(sim["length"], out=offsets[1:])
    cols = {"label": sim["label"], "prob": sim["prob"]}
    dense_names = [f"I{i + 1}" for i in range(cfg.n_dense)]
    ctx_names = [f"C{i + 1}" for i in range(cfg.n_context)]
    for i, c in enumerate(dense_names):
        cols[c] = np.log1p(sim["dense"][:, i]).astype(np.float32)
    cols["user_id"] = sim["user"]
    cols["item_id"] = sim["tgt_item"]
    cols["category"] = sim["tgt_cat"]
    for i, c in enumerate(ctx_names):
        cols[c] = sim["ctx"][:, i]
    split = np.searchsorted([1 - cfg.valid_frac - cfg.test_frac, 1 - cfg.test_frac],
                            np.random.default_rng(cfg.seed + 1).random(n), side="right")
    tables = {}
    for s, sname in enumerate(("train", "valid", "test")):
        idx = np.flatnonzero(split == s)
        t = {c: v[idx] for c, v in cols.items()}
        start, ln = offsets[idx], sim["length"][idx]
        flat = np.repeat(start - np.r_[0, np.cumsum(ln)[:-1]], ln) + np.arange(int(ln.sum()))
        t["hist_item_id"] = list_array(sim["hist_item"][flat], ln)
        t["hist_category"] = list_array(sim["hist_cat"][flat], ln)
        tables[sname] = pa.table(t)

    train = tables["train"]
    counts = {}
    for feat, size in (("item_id", cfg.num_items + 1), ("category", cfg.num_categories + 1)):
        hist = train.column("hist_" + feat).combine_chunks()
        counts[feat] = (np.bincount(train.column(feat).to_numpy(), minlength=size)
                        + np.bincount(hist.values.to_numpy(), minlength=size)).astype(np.int64)
    cats = [CategoricalFeature("user_id", cfg.num_users, "vocab", cfg.num_users + 1),
            CategoricalFeature("item_id", cfg.num_items, "vocab", cfg.num_items + 1),
            CategoricalFeature("category", cfg.num_categories, "vocab", cfg.num_categories + 1)]
    cats += [CategoricalFeature(c, cfg.context_cardinality, "vocab", cfg.context_cardinality + 1)
             for c in ctx_names]
    seqs = [SequenceFeature("hist_item_id", cfg.num_items, cfg.max_len, "item_id", cfg.num_items + 1),
            SequenceFeature("hist_category", cfg.num_categories, cfg.max_len, "category",
                            cfg.num_categories + 1)]
    schema = DatasetSchema(
        name="synth-seq", dense=dense_names, categorical=cats, sequences=seqs, label="label",
        prob_column="prob",
        rows={k: t.num_rows for k, t in tables.items()},
        extra={"source": "synth-seq", "kind": "sequence", "synth_seq": asdict(cfg), "user_feature": "user_id",
               "item_feature": "item_id", "id_counts": ID_COUNTS_FILE},
    )
    items = pa.table({"item_id": np.arange(cfg.num_items + 1)})
    user_items = pa.table({"user_id": np.zeros(0, np.int64)})
    return Samples(tables, schema, items, user_items, counts)


def write_synth_seq(cfg: SynthSeqConfig, out: str | Path, overwrite: bool = False) -> Path:
    return write_samples(generate_synth_seq(cfg), out, overwrite=overwrite)
