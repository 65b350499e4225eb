"""Synthetic Criteo-style click data with a planted, learnable model.

13 dense integer counts (``I1..I13``, some negative, some missing) and 26 categorical
features (``C1..C26``) whose cardinalities follow the Criteo Kaggle ones scaled by
``scale`` (features under 2,000 ids keep their size). Ids are Zipf-distributed; the
click probability is ``sigmoid(alpha * z + b)`` where ``z`` sums

* a per-id effect for every categorical feature, shrunk for ids expected fewer than
  ~200 times in 1M rows (the long tail of huge features carries almost no signal, so a
  dim-16 model trained on ~1M rows can learn what there is to learn),
* a few pairwise interactions between low-cardinality features (rank-2 dot products,
  which DLRM's dot interaction can represent),
* linear effects of the (standardised, log1p) dense values, as stored.

``alpha`` and ``b`` are calibrated on a pilot sample so the oracle AUC (AUC of the true
probabilities) is ~0.80 and the click rate ~25%, like Criteo. Everything is a
deterministic function of ``seed`` (chunks of 65,536 rows each have their own RNG
stream), vectorised numpy, memory bounded by one chunk plus the model tables.

Categorical ids are ``1..V`` (0 = missing, the converter's raw-mode missing id), so the
same rows written as Criteo TSV (``tsv=``) and converted with ``cat_mode="raw"`` give
back exactly these Parquet columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from tqdm.auto import tqdm

from embtables.datasets.criteo_format import (
    CAT_NAMES,
    CRITEO_KAGGLE_CARDINALITIES,
    DENSE_NAMES,
    LABEL,
    NUM_CAT,
    NUM_DENSE,
    PROB,
    RAW_MISSING_ID,
    dense_transform,
    format_hex,
)
from embtables.datasets.parquet_out import PartWriter, atomic_output_dir, split_counts
from embtables.datasets.schema import CategoricalFeature, DatasetSchema

DEFAULT_ROWS = 1_000_000
DEFAULT_SCALE = 0.05
CHUNK_ROWS = 65536
ID_COUNTS_FILE = "id_counts.npz"  # per-id train counts, one array per categorical feature
TARGET_AUC = 0.80
TARGET_CTR = 0.25
_NOMINAL_ROWS = 1_000_000  # signal is planted for what this many rows can teach
_LEARNABLE_COUNT = 10000.0

# Criteo-like missing rates and log-normal parameters of the dense counts.
_DENSE_MISSING = [0.45, 0.0, 0.21, 0.22, 0.03, 0.22, 0.04, 0.0005, 0.04, 0.45, 0.04, 0.77, 0.22]
_DENSE_MU = [0.5, 2.0, 1.5, 1.5, 7.0, 3.5, 1.0, 2.0, 3.5, 0.2, 0.8, 0.2, 1.5]
_DENSE_SIGMA = [1.2, 1.5, 1.3, 1.0, 2.0, 1.8, 1.5, 1.2, 1.5, 0.8, 1.0, 1.2, 1.1]
_CAT_MISSING = {2: 0.03, 3: 0.03, 5: 0.12, 11: 0.03, 15: 0.03, 18: 0.44, 19: 0.44, 20: 0.03,
                21: 0.76, 23: 0.03, 24: 0.44, 25: 0.44}
_PAIRS = [(4, 5), (8, 13), (16, 19), (21, 22), (5, 24), (13, 22)]  # low-cardinality pairs only


def synth_cardinalities(scale: float = DEFAULT_SCALE) -> list[int]:
    """Vocabulary size per categorical feature at ``scale`` (ids are 1..V)."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return [max(min(c, 2000), int(round(c * scale))) for c in CRITEO_KAGGLE_CARDINALITIES]


@dataclass
class _Model:
    vocab: list[int]
    cdf: list[np.ndarray]  # popularity CDF over ranks
    perm: list[np.ndarray]  # rank -> id (1..V)
    effect: list[np.ndarray]  # rank -> logit contribution
    effect_missing: np.ndarray  # per feature
    inter: list[tuple[int, int, np.ndarray, np.ndarray]]  # (f, g, u_f[rank], u_g[rank])
    beta: np.ndarray  # dense effects (per standardised log1p value)
    dense_mean: np.ndarray
    dense_std: np.ndarray
    alpha: float = 1.0
    bias: float = 0.0


def _build_model(seed: int, scale: float) -> _Model:
    rng = np.random.default_rng([seed, 0])
    vocab = synth_cardinalities(scale)
    cdf, perm, effect = [], [], []
    for v in vocab:
        a = 0.6 if v <= 30 else (1.0 if v <= 2000 else 1.1)
        w = (np.arange(v, dtype=np.float64) + 2.0) ** -a
        p = w / w.sum()
        c = np.cumsum(p)
        c[-1] = 1.0
        cdf.append(c)
        perm.append(rng.permutation(v).astype(np.int64) + 1)
        sigma = 0.6 if v <= 400 else (0.4 if v <= 2000 else 0.3)
        shrink = np.sqrt(np.minimum(1.0, p * _NOMINAL_ROWS / _LEARNABLE_COUNT))
        effect.append(rng.normal(0.0, sigma, v) * shrink)
    effect_missing = rng.normal(0.0, 0.3, NUM_CAT)
    inter = []
    for f, g in _PAIRS:
        uf = [rng.normal(0.0, 0.35, (vocab[k], 2)) * np.sqrt(np.minimum(
            1.0, np.diff(cdf[k], prepend=0.0) * _NOMINAL_ROWS / _LEARNABLE_COUNT))[:, None] for k in (f, g)]
        inter.append((f, g, uf[0], uf[1]))
    beta = rng.normal(0.0, 0.35, NUM_DENSE)
    d, dm = _dense_counts(rng, 50_000)
    obs = dense_transform(d.reshape(-1), dm.reshape(-1)).reshape(d.shape).astype(np.float64)
    mean, std = obs.mean(axis=0), obs.std(axis=0) + 1e-6
    return _Model(vocab, cdf, perm, effect, effect_missing, inter, beta, mean, std)


def _latent(m: _Model, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Sample features of ``n`` rows and the unscaled logit ``z``."""
    ranks = np.empty((n, NUM_CAT), dtype=np.int64)
    missing = np.zeros((n, NUM_CAT), dtype=bool)
    for k in range(NUM_CAT):
        ranks[:, k] = np.searchsorted(m.cdf[k], rng.random(n), side="right")
        if k in _CAT_MISSING:
            missing[:, k] = rng.random(n) < _CAT_MISSING[k]
    np.minimum(ranks, np.array(m.vocab) - 1, out=ranks)
    z = np.zeros(n)
    for k in range(NUM_CAT):
        z += np.where(missing[:, k], m.effect_missing[k], m.effect[k][ranks[:, k]])
    for f, g, uf, ug in m.inter:
        both = ~(missing[:, f] | missing[:, g])
        z += both * np.einsum("ij,ij->i", uf[ranks[:, f]], ug[ranks[:, g]])
    dense, dmiss = _dense_counts(rng, n)
    # dense effects act on what a model sees (the stored log1p value), not on a hidden latent
    obs = dense_transform(dense.reshape(-1), dmiss.reshape(-1)).reshape(n, NUM_DENSE).astype(np.float64)
    z += ((obs - m.dense_mean) / m.dense_std * m.beta).sum(axis=1)  # missing is stored as 0: same effect
    ids = np.empty_like(ranks)
    for k in range(NUM_CAT):
        ids[:, k] = m.perm[k][ranks[:, k]]
    ids[missing] = RAW_MISSING_ID
    return {"z": z, "ids": ids, "dense": dense, "dense_missing": dmiss}


def _dense_counts(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Log-normal integer counts (I2 with small negatives, as in Criteo) and missing masks."""
    latent = rng.standard_normal((n, NUM_DENSE))
    dmiss = rng.random((n, NUM_DENSE)) < np.array(_DENSE_MISSING)
    raw = np.exp(np.array(_DENSE_MU) + np.array(_DENSE_SIGMA) * latent)
    dense = np.floor(raw - 0.5).clip(min=0.0)
    dense[:, 1] = np.floor(raw[:, 1]) - 3.0
    return np.minimum(dense, 2.0**40).astype(np.int64), dmiss


def expected_auc(prob: np.ndarray, score: np.ndarray | None = None) -> float:
    """AUC a perfect ranking by ``score`` (default: ``prob``) gets in expectation when
    labels are Bernoulli(prob): no label noise, so it calibrates deterministically."""
    score = prob if score is None else score
    order = np.argsort(score, kind="stable")
    p = prob[order]
    neg_below = np.cumsum(1.0 - p) - (1.0 - p)
    return float((p * neg_below).sum() / (p.sum() * (1.0 - p).sum()))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _calibrate(m: _Model, seed: int, pilot_rows: int = 100_000) -> None:
    """Choose alpha (oracle AUC) and bias (click rate) on a pilot sample of the model."""
    zr = _latent(m, np.random.default_rng([seed, 2]), pilot_rows)["z"]
    z = (zr - zr.mean()) / zr.std()

    def bias_for(alpha: float) -> float:
        lo, hi = -10.0, 10.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _sigmoid(alpha * z + mid).mean() < TARGET_CTR else (lo, mid)
        return (lo + hi) / 2

    lo, hi = 0.05, 10.0
    for _ in range(25):
        mid = (lo + hi) / 2
        auc = expected_auc(_sigmoid(mid * z + bias_for(mid)), z)
        lo, hi = (mid, hi) if auc < TARGET_AUC else (lo, mid)
    alpha = (lo + hi) / 2
    m.alpha = alpha / zr.std()  # fold the standardisation into alpha and bias
    m.bias = bias_for(alpha) - m.alpha * zr.mean()


def _chunk_table(m: _Model, seed: int, chunk: int, n: int) -> tuple[pa.Table, dict[str, np.ndarray]]:
    rng = np.random.default_rng([seed, 1, chunk])
    s = _latent(m, rng, n)
    prob = _sigmoid(m.alpha * s["z"] + m.bias).astype(np.float32)
    label = (rng.random(n) < prob).astype(np.float32)
    cols: dict[str, pa.Array] = {LABEL: pa.array(label)}
    for j, name in enumerate(DENSE_NAMES):
        cols[name] = pa.array(dense_transform(s["dense"][:, j], s["dense_missing"][:, j]))
    for k, name in enumerate(CAT_NAMES):
        cols[name] = pa.array(s["ids"][:, k])
    cols[PROB] = pa.array(prob)
    return pa.table(cols), {"label": label, **s}


def parquet_schema() -> pa.Schema:
    return pa.schema([(LABEL, pa.float32())] + [(n, pa.float32()) for n in DENSE_NAMES]
                     + [(n, pa.int64()) for n in CAT_NAMES] + [(PROB, pa.float32())])


def _tsv_table(raw: dict[str, np.ndarray]) -> pa.Table:
    cols: dict[str, pa.Array] = {LABEL: pa.array(raw["label"].astype(np.int8))}
    for j, name in enumerate(DENSE_NAMES):
        cols[name] = pa.array(raw["dense"][:, j], mask=raw["dense_missing"][:, j])
    for k, name in enumerate(CAT_NAMES):
        cols[name] = format_hex(raw["ids"][:, k])
    return pa.table(cols)


def generate_synth(out: str | Path, rows: int = DEFAULT_ROWS, *, seed: int = 0, scale: float = DEFAULT_SCALE,
                   split: tuple[float, ...] = (0.8, 0.1, 0.1), tsv: str | Path | None = None,
                   overwrite: bool = False, progress: bool = True) -> DatasetSchema:
    """Write a synthetic Criteo-style dataset to ``out`` (Parquet parts + schema.json)
    and, with ``tsv``, the same rows as an official-format Criteo TSV (``.gz`` -> gzip).
    Returns the schema."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    split_names = ["train", "valid", "test"][: len(split)]
    counts = split_counts(rows, split)
    bounds = np.cumsum([0] + counts)
    m = _build_model(seed, scale)
    _calibrate(m, seed)
    seen = [np.zeros(v + 1, dtype=bool) for v in m.vocab]
    # Per-id counts over the train split (frequency-aware methods read them: `hybrid`); ids
    # are permuted, so their order says nothing about frequency.
    id_counts = [np.zeros(v + 1, dtype=np.int64) for v in m.vocab]
    schema_pa = parquet_schema()
    tsv_sink = tsv_writer = None
    with atomic_output_dir(out, overwrite) as tmp:
        writers = {s: PartWriter(tmp, s, schema_pa) for s in split_names}
        labels = {s: [] for s in split_names}
        probs = {s: [] for s in split_names}
        try:
            if tsv is not None:
                tsv = Path(tsv)
                tsv_sink = (pa.CompressedOutputStream(str(tsv), "gzip") if tsv.suffix == ".gz"
                            else pa.OSFile(str(tsv), "wb"))
            bar = tqdm(total=rows, unit="rows", unit_scale=True, desc="synth", disable=not progress)
            for chunk, start in enumerate(range(0, rows, CHUNK_ROWS)):
                n = min(CHUNK_ROWS, rows - start)
                table, raw = _chunk_table(m, seed, chunk, n)
                for k in range(NUM_CAT):
                    seen[k][raw["ids"][:, k]] = True
                if tsv_sink is not None:
                    t = _tsv_table(raw)
                    if tsv_writer is None:
                        tsv_writer = pacsv.CSVWriter(tsv_sink, t.schema, write_options=pacsv.WriteOptions(
                            include_header=False, delimiter="\t", quoting_style="none"))
                    tsv_writer.write_table(t)
                for i, s in enumerate(split_names):
                    lo, hi = max(bounds[i], start) - start, min(bounds[i + 1], start + n) - start
                    if hi > lo and s == "train":
                        for k in range(NUM_CAT):
                            id_counts[k] += np.bincount(raw["ids"][lo:hi, k], minlength=id_counts[k].shape[0])
                    if hi > lo:
                        part = table.slice(lo, hi - lo)
                        writers[s].write(part)
                        labels[s].append(raw["label"][lo:hi])
                        probs[s].append(table.column(PROB).to_numpy()[lo:hi])
                bar.update(n)
            bar.close()
            for w in writers.values():
                w.close()
        finally:
            if tsv_writer is not None:
                tsv_writer.close()
            if tsv_sink is not None:
                tsv_sink.close()
        from sklearn.metrics import roc_auc_score

        oracle, ctr = {}, {}
        for s in split_names:
            y = np.concatenate(labels[s]) if labels[s] else np.zeros(0)
            p = np.concatenate(probs[s]) if probs[s] else np.zeros(0)
            ctr[s] = float(y.mean()) if len(y) else None
            oracle[s] = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None
        cats = [CategoricalFeature(name, int(seen[k][1:].sum()), mode="raw", num_embeddings=m.vocab[k] + 1)
                for k, name in enumerate(CAT_NAMES)]
        schema = DatasetSchema(
            name="synth-criteo", dense=list(DENSE_NAMES), categorical=cats, prob_column=PROB,
            splits={s: writers[s].files for s in split_names}, rows={s: writers[s].rows for s in split_names},
            extra={"source": "synth", "seed": seed, "scale": scale, "split": list(split),
                   "cat_mode": "raw", "missing_id": RAW_MISSING_ID, "dense_transform": "log1p",
                   "oracle_auc": oracle, "ctr": ctr, "vocab_sizes": m.vocab, "id_counts": ID_COUNTS_FILE,
                   "model": {"alpha": m.alpha, "bias": m.bias,
                             "pairs": [[CAT_NAMES[f], CAT_NAMES[g]] for f, g in _PAIRS]}},
        )
        np.savez(Path(tmp) / ID_COUNTS_FILE, **{name: id_counts[k] for k, name in enumerate(CAT_NAMES)})
        schema.save(tmp)
    return schema
