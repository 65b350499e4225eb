"""MovieLens-1M implicit pairs -> a CTR dataset with sampled negatives
(``embtables data ml1m-implicit SRC --out DIR``).

SRC holds ``train.txt`` and ``test.txt`` (one line per user, ``user item item ...``, ids =
the original MovieLens ids - 1, as published with ReSN and other implicit-feedback work;
the order inside a line is not time) and GroupLens' ``users.dat``
(``user::gender::age::occupation::zip``) and ``movies.dat`` (``movie::title::genres``) with
the original ids.

* Features: ``user_id``, ``gender``, ``age``, ``occupation``, ``zip`` (user side),
  ``movie_id``, ``genre`` (the first listed), ``year`` (from the title); each a vocabulary
  id ``1..n`` in order of the sorted values (0 = unknown).
* Validation: the files have none, so each user's train pairs are split at random
  (``numpy.random.default_rng(seed)``): ``round(valid_frac * n)`` of a user's ``n`` pairs
  (default 10%, at least one pair left in train) become validation positives.
* Negatives: every positive is followed by ``negatives`` (default 1) rows with the same user
  and a movie that user rated in neither file, drawn uniformly (distinct per positive) from
  the movies rated by anyone, fixed at conversion. Train rows are shuffled.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from embtables.datasets.parquet_out import PartWriter, atomic_output_dir
from embtables.datasets.schema import CategoricalFeature, DatasetSchema
from embtables.datasets.sequences import interacted_keys, sample_negatives

USER_SIDE = ("gender", "age", "occupation", "zip")
ITEM_SIDE = ("genre", "year")
FEATURES = ("user_id", *USER_SIDE, "movie_id", *ITEM_SIDE)


def read_pairs(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``user item item ...`` lines -> (original user id, original movie id) per pair."""
    path = Path(path)
    users, items = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                ids = [int(p) for p in parts]
            except ValueError:
                raise ValueError(f"{path}:{lineno}: ids must be integers: {line.strip()[:80]!r}") from None
            users += [ids[0]] * (len(ids) - 1)
            items += ids[1:]
    if not users:
        raise ValueError(f"{path}: no pairs")
    return np.asarray(users, np.int64) + 1, np.asarray(items, np.int64) + 1


def read_dat(path: Path, names: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (GroupLens ml-1m's {path.name}, see docs/real-data.md)")
    rows = [line.split("::") for line in path.read_bytes().decode("latin-1").splitlines() if line]
    bad = [i for i, r in enumerate(rows) if len(r) != len(names)]
    if bad:
        raise ValueError(
            f"{path}:{bad[0] + 1}: expected {len(names)} '::'-separated fields ({', '.join(names)})"
        )
    return pd.DataFrame(rows, columns=names)


def _codes(values: pd.Series) -> tuple[np.ndarray, int]:
    """Strings -> 1..n by sorted distinct value (0 = missing / empty); n."""
    s = values.astype("string").str.strip()
    codes, uniq = pd.factorize(s.mask(s == ""), sort=True)
    return (codes + 1).astype(np.int64), len(uniq)


def carve_valid(user: np.ndarray, frac: float, rng: np.random.Generator) -> np.ndarray:
    """True for a random ``round(frac * n_u)`` of each user's pairs (never all of them)."""
    order = np.lexsort((rng.random(len(user)), user))
    u = user[order]
    start = np.r_[0, np.flatnonzero(u[1:] != u[:-1]) + 1]
    counts = np.diff(np.r_[start, len(u)])
    rank = np.arange(len(u)) - np.repeat(start, counts)
    take = np.minimum(np.rint(frac * counts), counts - 1).astype(np.int64)
    out = np.zeros(len(user), bool)
    out[order] = rank < np.repeat(take, counts)
    return out


def convert_ml1m(
    src: str | Path,
    out: str | Path,
    *,
    valid_frac: float = 0.1,
    negatives: int = 1,
    seed: int = 0,
    overwrite: bool = False,
    name: str = "ml-1m-implicit",
) -> DatasetSchema:
    src = Path(src)
    for f in ("train.txt", "test.txt"):
        if not (src / f).is_file():
            raise FileNotFoundError(
                f"{src / f}: missing (implicit ML-1M pairs 'user item item ...', see docs/real-data.md)"
            )
    if not 0 < valid_frac < 1:
        raise ValueError(f"--valid-frac must be in (0, 1), got {valid_frac}")
    if negatives < 1:
        raise ValueError(f"--negatives must be >= 1, got {negatives}")
    rng = np.random.default_rng(seed)
    users = read_dat(src / "users.dat", ["user", "gender", "age", "occupation", "zip"])
    movies = read_dat(src / "movies.dat", ["movie", "title", "genres"])
    movies["genre"] = movies["genres"].str.split("|").str[0]
    movies["year"] = movies["title"].str.extract(r"\((\d{4})\)\s*$", expand=False).fillna("")
    user_ids = users["user"].astype(np.int64).to_numpy()
    movie_ids = movies["movie"].astype(np.int64).to_numpy()
    uside = {c: _codes(users[c]) for c in USER_SIDE}
    iside = {c: _codes(movies[c]) for c in ITEM_SIDE}

    tr_u, tr_i = read_pairs(src / "train.txt")
    te_u, te_i = read_pairs(src / "test.txt")
    for what, ids, known in (("user", np.r_[tr_u, te_u], user_ids), ("movie", np.r_[tr_i, te_i], movie_ids)):
        unknown = np.setdiff1d(ids, known)
        if len(unknown):
            raise ValueError(
                f"{src}: {len(unknown)} {what} id(s) of the pair files are not in "
                f"{'users' if what == 'user' else 'movies'}.dat (e.g. {unknown[0]}); ids there "
                "must be the original ids - 1"
            )
    # Row positions (0-based) in users.dat / movies.dat of every pair.
    u_sorted, m_sorted = np.argsort(user_ids), np.argsort(movie_ids)
    upos = lambda u: u_sorted[np.searchsorted(user_ids[u_sorted], u)]  # noqa: E731
    mpos = lambda m: m_sorted[np.searchsorted(movie_ids[m_sorted], m)]  # noqa: E731
    tr_u, tr_i, te_u, te_i = upos(tr_u), mpos(tr_i), upos(te_u), mpos(te_i)

    rated = np.unique(np.r_[tr_i, te_i])  # negatives come from the movies anyone rated
    rank = np.full(len(movie_ids), -1, np.int64)
    rank[rated] = np.arange(len(rated))
    keys = interacted_keys(np.r_[tr_u, te_u], rank[np.r_[tr_i, te_i]] + 1, len(rated))
    is_valid = carve_valid(tr_u, valid_frac, rng)
    positives = {
        "train": (tr_u[~is_valid], tr_i[~is_valid]),
        "valid": (tr_u[is_valid], tr_i[is_valid]),
        "test": (te_u, te_i),
    }

    tables = {}
    for s, (u, i) in positives.items():
        neg = rated[sample_negatives(u, negatives, keys, len(rated), rng, distinct=negatives > 1) - 1]
        uu = np.repeat(u, negatives + 1)
        ii = np.concatenate([i[:, None], neg], axis=1).ravel()
        lab = np.tile(np.r_[1.0, np.zeros(negatives)].astype(np.float32), len(u))
        if s == "train":
            order = rng.permutation(len(uu))
            uu, ii, lab = uu[order], ii[order], lab[order]
        cols = {"label": lab, "user_id": uu + 1}
        cols.update({c: uside[c][0][uu] for c in USER_SIDE})
        cols["movie_id"] = ii + 1
        cols.update({c: iside[c][0][ii] for c in ITEM_SIDE})
        tables[s] = pa.table(cols)

    sizes = {
        "user_id": len(user_ids),
        "movie_id": len(movie_ids),
        **{c: n for c, (_, n) in uside.items()},
        **{c: n for c, (_, n) in iside.items()},
    }
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        files, rows = {}, {}
        for s, t in tables.items():
            w = PartWriter(tmp, s, t.schema)
            w.write(t)
            w.close()
            files[s], rows[s] = w.files, w.rows
        schema = DatasetSchema(
            name=name,
            dense=[],
            categorical=[CategoricalFeature(c, sizes[c], "vocab", sizes[c] + 1) for c in FEATURES],
            splits=files,
            rows=rows,
            extra={
                "source": f"ml1m-implicit:{src.resolve()}",
                "user_feature": "user_id",
                "item_feature": "movie_id",
                "valid": f"random {valid_frac:g} of each user's train pairs (seed {seed})",
                "negatives_per_positive": negatives,
                "negative_items": int(len(rated)),
                "seed": seed,
                "positives": {s: int(len(u)) for s, (u, _) in positives.items()},
            },
        )
        schema.save(tmp)
    return schema
