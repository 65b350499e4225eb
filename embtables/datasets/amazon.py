"""Amazon review sequences as preprocessed for S3-Rec (Zhou et al. 2020; Beauty,
Sports_and_Outdoors, Toys_and_Games, Yelp) -> behaviour-sequence dataset
(``embtables data amazon SEQ.txt --attributes SEQ_item2attributes.json --out DIR``).

``NAME.txt``: one line per user, ``user item1 item2 ...`` in time order (5-core: every
user and item has at least 5 interactions); there are no timestamps, so an event's position
in its line is its time. ``NAME_item2attributes.json``: item -> attribute ids (brand and
categories, ~3.7 per item). The sequence format holds one category per item, so the item's
``category`` is one of its attributes: ``rarest`` (default: the one fewest catalogue items
share, the most specific; ties -> the smaller id) or ``first`` (the first listed).

Samples follow :mod:`embtables.datasets.sequences` (the MovieLens protocol): the user's
earlier items (and their categories) as history, leave-one-out by position (last item ->
test, the one before -> valid), one sampled negative per training positive (redrawn per
epoch by the trainer) and 100 per valid/test positive.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np

from embtables.datasets.sequences import EventLog, SampleConfig, SideFeatures, build_samples, write_samples


def read_sequences(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw (user, item, position) per event, in file order."""
    path = Path(path)
    users, items, pos = [], [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise ValueError(
                    f"{path}:{lineno}: expected 'user item1 item2 ...', got {line.strip()[:80]!r}"
                )
            try:
                ids = [int(p) for p in parts]
            except ValueError:
                raise ValueError(f"{path}:{lineno}: ids must be integers: {line.strip()[:80]!r}") from None
            users += [ids[0]] * (len(ids) - 1)
            items += ids[1:]
            pos += range(len(ids) - 1)
    if not users:
        raise ValueError(f"{path}: no sequences")
    return np.asarray(users, np.int64), np.asarray(items, np.int64), np.asarray(pos, np.int64)


def item_categories(
    attrs: dict[str, list[int]], items: np.ndarray, rule: Literal["rarest", "first"] = "rarest"
) -> np.ndarray:
    """Raw category (attribute id, -1 = none) of each raw item in ``items``."""
    freq = Counter(a for v in attrs.values() for a in v)
    out = np.full(len(items), -1, np.int64)
    for i, it in enumerate(items):
        a = attrs.get(str(int(it))) or []
        if a:
            out[i] = a[0] if rule == "first" else min(a, key=lambda x: (freq[x], x))
    return out


def to_event_log(
    seq_path: str | Path, attr_path: str | Path | None, rule: Literal["rarest", "first"] = "rarest"
) -> EventLog:
    user_raw, item_raw, pos = read_sequences(seq_path)
    user_vals, user = np.unique(user_raw, return_inverse=True)
    item_vals, item = np.unique(item_raw, return_inverse=True)
    side = SideFeatures("item_id")
    if attr_path is not None:
        attr_path = Path(attr_path)
        try:
            attrs = json.loads(attr_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{attr_path}: not JSON ({e})") from None
        if not isinstance(attrs, dict):
            raise ValueError(f"{attr_path}: expected an object mapping item -> list of attribute ids")
        cats = item_categories(attrs, item_vals, rule)
        known = cats >= 0
        vocab = np.unique(cats[known])
        coded = np.zeros(len(item_vals), np.int64)
        coded[known] = np.searchsorted(vocab, cats[known]) + 1
        side.columns["category"] = np.r_[0, coded]
    return EventLog(
        user=user.astype(np.int64) + 1,
        item=item.astype(np.int64) + 1,
        ts=pos,
        num_users=len(user_vals),
        num_items=len(item_vals),
        item_side=side,
    )


def convert_amazon(
    seq_path: str | Path,
    out: str | Path,
    *,
    attributes: str | Path | None = None,
    category: Literal["rarest", "first"] = "rarest",
    cfg: SampleConfig | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    seq_path = Path(seq_path)
    if not seq_path.is_file():
        raise FileNotFoundError(
            f"{seq_path}: no such file (S3-Rec's NAME.txt: 'user item1 item2 ...' per line)"
        )
    if attributes is not None and not Path(attributes).is_file():
        raise FileNotFoundError(
            f"--attributes {attributes}: no such file (S3-Rec's NAME_item2attributes.json)"
        )
    cfg = cfg or SampleConfig()  # positions are distinct within a user: both tie rules agree
    log = to_event_log(seq_path, attributes, category)
    samples = build_samples(log, cfg, name=name or seq_path.stem, source=f"amazon-s3rec:{seq_path.resolve()}")
    samples.schema.extra["category_rule"] = category if attributes is not None else None
    return write_samples(samples, out, overwrite=overwrite)
