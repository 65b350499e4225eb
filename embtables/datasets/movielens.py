"""MovieLens -> behaviour-sequence dataset (``embtables data movielens SRC --out DIR``).

Reads three layouts, detected from the files in SRC:

* RecBole atomic files: ``<name>.inter`` (user_id, item_id, rating, timestamp),
  optional ``<name>.user`` (age, gender, occupation, ...) and ``<name>.item``
  (release_year, class = space-separated genres); tab-separated, header ``name:type``.
* GroupLens ml-100k: ``u.data`` (tab: user item rating timestamp), ``u.user``
  (``|``: id|age|gender|occupation|zip), ``u.item`` (``|``: id|title|date|video|url|19 genre flags).
* GroupLens ml-1m: ``ratings.dat`` / ``users.dat`` / ``movies.dat`` (``::``-separated,
  genres ``A|B``, the year in the title's parentheses).

Features: ``user_id``, ``age``, ``gender``, ``occupation`` (user side, when present),
``item_id``, ``genre`` (the first listed genre), ``year`` (item side, when present), and
histories ``hist_item_id``, ``hist_genre``, ``hist_year``. Every id is a vocabulary id
(``1..n`` in order of the sorted raw values; 0 = padding/unknown).
Sample building (labels, splits, order, negatives) is :mod:`embtables.datasets.sequences`.
"""

from __future__ import annotations

import io
import re
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from embtables.datasets.sequences import EventLog, SampleConfig, SideFeatures, build_samples, write_samples
from embtables.errors import clip

GROUPLENS_URLS = {
    "ml-100k": "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
    "ml-1m": "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
}


@dataclass
class RawMovieLens:
    ratings: pd.DataFrame  # user, item, rating, ts (raw ids, original file order)
    users: pd.DataFrame | None  # user + side columns (strings)
    items: pd.DataFrame | None  # item + genre, year (strings)
    layout: str


def _vocab(raw: pd.Series) -> tuple[np.ndarray, dict]:
    """Sorted distinct non-null values -> ids 1..n."""
    uniq = np.sort(raw.dropna().unique())
    return uniq, {v: i + 1 for i, v in enumerate(uniq)}


def _encode(values: pd.Series) -> np.ndarray:
    """Strings -> 1..n by sorted distinct value, missing / empty -> 0."""
    s = values.astype("string").str.strip()
    s = s.mask(s == "")
    codes, uniq = pd.factorize(s, sort=True)  # -1 for NA
    return (codes + 1).astype(np.int64)


def _read_atomic(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3, encoding="utf-8")
    df.columns = [c.split(":")[0] for c in df.columns]
    return df


def _numbers(values: pd.Series, path: Path, column: str, first_line: int, integer: bool = False) -> pd.Series:
    """A column of numbers; the first value that is not one is named with its file and line."""
    num = pd.to_numeric(values, errors="coerce")
    bad = num.isna().to_numpy()
    if integer:
        bad = bad | (num.fillna(0) % 1 != 0).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{path}:{row + first_line}: {column} {clip(values.iloc[row])} is not {kind}")
    return num.astype(np.int64) if integer else num


def detect_layout(src: Path) -> str:
    if src.is_file():
        raise NotADirectoryError(f"{src} is a file; give the MovieLens folder that holds it")
    if list(src.glob("*.inter")):
        return "atomic"
    if (src / "u.data").exists():
        return "ml-100k"
    if (src / "ratings.dat").exists():
        return "ml-1m"
    raise FileNotFoundError(
        f"{src}: no MovieLens files found (expected RecBole atomic *.inter, GroupLens ml-100k u.data, "
        "or ml-1m ratings.dat); use --download to fetch ml-100k / ml-1m from GroupLens"
    )


def read_movielens(src: str | Path) -> RawMovieLens:
    src = Path(src)
    layout = detect_layout(src)
    users = items = None
    if layout == "atomic":
        inter = sorted(src.glob("*.inter"))[0]
        df = _read_atomic(inter)
        need = {"user_id", "item_id", "timestamp"}
        if not need <= set(df.columns):
            raise ValueError(f"{inter}: header needs {sorted(need)}, has {clip(list(df.columns))}")
        ratings = pd.DataFrame({"user": df["user_id"], "item": df["item_id"],
                                "rating": _numbers(df.get("rating", pd.Series(["1"] * len(df))), inter,
                                                   "rating", 2),
                                "ts": _numbers(df["timestamp"], inter, "timestamp", 2, integer=True)})
        upath, ipath = inter.with_suffix(".user"), inter.with_suffix(".item")
        if upath.exists():
            u = _read_atomic(upath)
            users = pd.DataFrame({"user": u["user_id"]})
            for c in ("age", "gender", "occupation"):
                if c in u:
                    users[c] = u[c]
        if ipath.exists():
            it = _read_atomic(ipath)
            items = pd.DataFrame({"item": it["item_id"]})
            if "class" in it:
                items["genre"] = it["class"].str.split(" ").str[0]
            if "release_year" in it:
                items["year"] = it["release_year"]
    elif layout == "ml-100k":
        df = pd.read_csv(src / "u.data", sep="\t", header=None, names=["user", "item", "rating", "ts"],
                         dtype=str, keep_default_na=False)
        ratings = pd.DataFrame({"user": df["user"], "item": df["item"],
                                "rating": _numbers(df["rating"], src / "u.data", "rating", 1),
                                "ts": _numbers(df["ts"], src / "u.data", "timestamp", 1, integer=True)})
        if (src / "u.user").exists():
            u = pd.read_csv(src / "u.user", sep="|", header=None, dtype=str, encoding="latin-1")
            users = pd.DataFrame({"user": u[0], "age": u[1], "gender": u[2], "occupation": u[3]})
        if (src / "u.item").exists():
            it = pd.read_csv(src / "u.item", sep="|", header=None, dtype=str, encoding="latin-1")
            genre_names = _ml100k_genres(src)
            flags = it.iloc[:, 5:5 + len(genre_names)].astype(int).to_numpy()
            first = np.where(flags.any(1), flags.argmax(1), -1)
            items = pd.DataFrame({
                "item": it[0],
                "genre": pd.Series([genre_names[g] if g >= 0 else "" for g in first], dtype=str),
                "year": it[2].fillna("").str[-4:],
            })
    else:  # ml-1m
        df = _read_dat(src / "ratings.dat", ["user", "item", "rating", "ts"])
        dat = src / "ratings.dat"
        ratings = pd.DataFrame({"user": df["user"], "item": df["item"],
                                "rating": _numbers(df["rating"], dat, "rating", 1),
                                "ts": _numbers(df["ts"], dat, "timestamp", 1, integer=True)})
        if (src / "users.dat").exists():
            u = _read_dat(src / "users.dat", ["user", "gender", "age", "occupation", "zip"])
            users = u[["user", "age", "gender", "occupation"]]
        if (src / "movies.dat").exists():
            m = _read_dat(src / "movies.dat", ["item", "title", "genres"])
            year = m["title"].str.extract(r"\((\d{4})\)\s*$", expand=False).fillna("")
            genre = m["genres"].str.split("|").str[0]
            items = pd.DataFrame({"item": m["item"], "genre": genre, "year": year})
    return RawMovieLens(ratings, users, items, layout)


def _read_dat(path: Path, names: list[str]) -> pd.DataFrame:
    text = path.read_bytes().decode("latin-1")
    rows = [line.split("::") for line in text.splitlines() if line]
    bad = [i for i, r in enumerate(rows) if len(r) != len(names)]
    if bad:
        raise ValueError(f"{path}:{bad[0] + 1}: expected {len(names)} '::'-separated fields "
                         f"({', '.join(names)})")
    return pd.DataFrame(rows, columns=names)


def _ml100k_genres(src: Path) -> list[str]:
    path = src / "u.genre"
    if path.exists():
        g = pd.read_csv(path, sep="|", header=None, dtype=str, encoding="latin-1").dropna()
        return list(g.sort_values(1, key=lambda s: s.astype(int))[0])
    return ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
            "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
            "War", "Western"]


def to_event_log(raw: RawMovieLens, threshold: float | None = None) -> EventLog:
    r = raw.ratings
    user_vals, _ = _vocab(r["user"])
    item_vals, _ = _vocab(r["item"])
    user = np.searchsorted(user_vals, r["user"].to_numpy()) + 1
    item = np.searchsorted(item_vals, r["item"].to_numpy()) + 1
    label = None if threshold is None else (r["rating"].to_numpy() >= threshold).astype(np.float32)
    user_side = SideFeatures("user_id")
    if raw.users is not None:
        u = raw.users.drop_duplicates("user").set_index("user").reindex(user_vals)
        for c in u.columns:
            user_side.columns[c] = np.r_[0, _encode(u[c])]
    item_side = SideFeatures("item_id")
    if raw.items is not None:
        it = raw.items.drop_duplicates("item").set_index("item").reindex(item_vals)
        for c in ("genre", "year"):
            if c in it:
                item_side.columns[c] = np.r_[0, _encode(it[c])]
    return EventLog(user=user.astype(np.int64), item=item.astype(np.int64), ts=r["ts"].to_numpy(np.int64),
                    label=label, num_users=len(user_vals), num_items=len(item_vals),
                    user_side=user_side, item_side=item_side)


def download(name: str, dest: Path, url: str | None = None, timeout: float = 20.0) -> Path:
    """Fetch and unzip a GroupLens archive into ``dest``; returns the data folder."""
    url = url or GROUPLENS_URLS.get(name)
    if url is None:
        raise ValueError(f"unknown MovieLens name {name!r} for --download; "
                         f"known: {', '.join(GROUPLENS_URLS)}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (https URL from a fixed table or the user)
            blob = resp.read()
    except urllib.error.HTTPError as e:
        raise ConnectionError(
            f"could not download {url}: the server answered HTTP {e.code} ({e.reason}). Download the archive "
            "elsewhere, unzip it and pass its folder as SRC"
        ) from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise ConnectionError(
            f"could not download {url} ({getattr(e, 'reason', e)}): this machine seems to have no network. "
            f"Download the archive elsewhere, unzip it and pass its folder as SRC "
            f"(for ml-100k the folder holding u.data, or RecBole's ml-100k.inter/.user/.item)"
        ) from None
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        z.extractall(dest)
    sub = dest / name
    return sub if sub.exists() else dest


def convert_movielens(
    src: str | Path, out: str | Path, *, cfg: SampleConfig | None = None, threshold: float | None = None,
    name: str | None = None, overwrite: bool = False,
) -> Path:
    """Convert MovieLens at ``src`` into a dataset directory ``out``.

    ``cfg.mode == "threshold"`` needs ``threshold`` (rating >= threshold is a click)."""
    cfg = cfg or SampleConfig()
    if cfg.mode == "threshold" and threshold is None:
        raise ValueError("threshold mode needs --threshold (a rating >= threshold is a click)")
    raw = read_movielens(src)
    log = to_event_log(raw, threshold if cfg.mode == "threshold" else None)
    src_name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", Path(src).resolve().name)
    samples = build_samples(log, cfg, name=src_name, source=f"movielens:{raw.layout}:{Path(src).resolve()}")
    samples.schema.extra["threshold"] = threshold
    return write_samples(samples, out, overwrite=overwrite)
