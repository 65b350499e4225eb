"""S3-Rec Amazon sequences -> behaviour-sequence samples: a hand-made file (always) and the
real Beauty files in ../shared/data/amazon-s3rec (skipped when absent)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SHARED

from embtables.datasets.amazon import convert_amazon, read_sequences
from embtables.datasets.schema import load_schema
from embtables.datasets.sequences import SampleConfig

AMAZON = SHARED / "data" / "amazon-s3rec"


def split(root, name):
    return pq.read_table(load_schema(root).files(root, name)).to_pydict()


def test_small_file_histories_categories_and_leave_one_out(tmp_path):
    (tmp_path / "s.txt").write_text("7 10 11 12 13\n3 12 10 14 11 15 10\n")
    # attribute 5 is on 3 items, 6 on 2, 8 on 1: the rarest attribute of item 10 is 8
    (tmp_path / "a.json").write_text(json.dumps({"10": [5, 8], "11": [5, 6], "12": [6], "13": [5], "14": []}))
    cfg = SampleConfig(neg_ratio=1, eval_negatives=1)
    out = convert_amazon(tmp_path / "s.txt", tmp_path / "o", attributes=tmp_path / "a.json", cfg=cfg)
    schema = load_schema(out)
    assert [c.name for c in schema.categorical] == ["user_id", "item_id", "category"]
    item = {10: 1, 11: 2, 12: 3, 13: 4, 14: 5, 15: 6}  # vocabulary ids: sorted raw ids from 1
    cat = {
        10: 3,
        11: 2,
        12: 2,
        13: 1,
        14: 0,
        15: 0,
    }  # rarest attribute -> ids of 5, 6, 8 = 1, 2, 3; none -> 0
    test = split(out, "test")
    pos = [i for i, y in enumerate(test["label"]) if y == 1]
    by_user = {test["user_id"][i]: i for i in pos}
    u7, u3 = by_user[2], by_user[1]  # users sorted: raw 3 -> 1, raw 7 -> 2
    assert test["item_id"][u7] == item[13] and test["hist_item_id"][u7] == [item[x] for x in (10, 11, 12)]
    assert test["item_id"][u3] == item[10]
    assert test["hist_item_id"][u3] == [item[x] for x in (12, 10, 14, 11, 15)]
    assert test["hist_category"][u3] == [cat[x] for x in (12, 10, 14, 11, 15)]
    assert test["category"][u3] == cat[10]
    valid = split(out, "valid")
    vpos = {valid["user_id"][i]: valid["item_id"][i] for i, y in enumerate(valid["label"]) if y == 1}
    assert vpos == {2: item[12], 1: item[15]}
    train = split(out, "train")
    assert sum(train["label"]) == (4 - 2) + (6 - 2)


def test_first_attribute_rule_and_bad_lines(tmp_path):
    (tmp_path / "s.txt").write_text("1 10 11 12\n2 13 14 15\n")  # user 2: items user 1 can draw as negatives
    (tmp_path / "a.json").write_text(json.dumps({"10": [5, 8], "11": [6], "12": [5]}))
    out = convert_amazon(
        tmp_path / "s.txt",
        tmp_path / "o",
        attributes=tmp_path / "a.json",
        category="first",
        cfg=SampleConfig(eval_negatives=1),
    )
    t = split(out, "test")
    assert t["user_id"][0] == 1 and t["hist_category"][0] == [1, 2]  # 10 -> 5 -> 1, 11 -> 6 -> 2
    (tmp_path / "bad.txt").write_text("1 10 11\n2 x 3\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: ids must be integers"):
        read_sequences(tmp_path / "bad.txt")
    with pytest.raises(FileNotFoundError, match="--attributes"):
        convert_amazon(tmp_path / "s.txt", tmp_path / "o2", attributes=tmp_path / "missing.json")


needs_beauty = pytest.mark.skipif(
    not (AMAZON / "Beauty.txt").exists() or not (AMAZON / "Beauty_item2attributes.json").exists(),
    reason=f"S3-Rec Beauty files not found in {AMAZON} "
    "(Amazon review data, research use: see docs/real-data.md)",
)


@needs_beauty
def test_real_beauty_counts_and_a_users_test_row(tmp_path):
    out = convert_amazon(
        AMAZON / "Beauty.txt", tmp_path / "beauty", attributes=AMAZON / "Beauty_item2attributes.json"
    )
    s = load_schema(out)
    users, events = 22_363, 198_502
    assert s.rows == {"train": 2 * (events - 2 * users), "valid": users * 101, "test": users * 101}
    card = {c.name: c.cardinality for c in s.categorical}
    assert card["user_id"] == users and card["item_id"] == 12_101
    assert 500 < card["category"] < 700  # 637 attributes, each item's rarest one
    line = (AMAZON / "Beauty.txt").read_text().splitlines()[8].split()  # raw user 9, ids are 1..n already
    t = pq.read_table(s.files(out, "test"), filters=[("user_id", "=", int(line[0])), ("label", "=", 1.0)])
    row = t.to_pylist()[0]
    items = [int(x) for x in line[1:]]
    assert row["item_id"] == items[-1]
    assert row["hist_item_id"] == items[:-1][-50:]
    assert np.all(
        np.diff(np.flatnonzero(np.array(pq.read_table(s.files(out, "test")).column("label")))) == 101
    )
