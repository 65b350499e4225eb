"""Behaviour-sequence samples: no leakage, negatives, splits, MovieLens layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from embtables.datasets import load_schema
from embtables.datasets.sequences import EpochNegatives, EventLog, SampleConfig, build_samples, write_samples

torch.set_num_threads(1)
SHARED = Path(__file__).resolve().parents[2] / "shared"


def _log(seed: int = 0, users: int = 12, events: int = 300, items: int = 40) -> EventLog:
    """Each event has its own row; many equal timestamps (ts in a small range)."""
    rng = np.random.default_rng(seed)
    user = rng.integers(1, users + 1, events)
    item = rng.integers(1, items + 1, events)
    ts = rng.integers(0, 25, events)  # lots of same-"second" events per user
    return EventLog(user=user, item=item, ts=ts, label=(rng.random(events) < 0.5).astype(np.float32),
                    num_users=users, num_items=items)


def _lists(table, col):
    return table.column(col).to_pylist()


@pytest.mark.parametrize("ties", ["strict", "order"])
def test_history_is_strictly_earlier_and_most_recent(ties):
    log = _log()
    cfg = SampleConfig(mode="threshold", split="loo", max_len=4, ties=ties)
    s = build_samples(log, cfg, name="t")
    # Oracle: plain Python over events ordered by (user, ts, original row).
    n = len(log.user)
    events = sorted(range(n), key=lambda i: (log.user[i], log.ts[i], i))
    expected = {}  # (user, ts, item, label) -> candidate histories (duplicates possible)
    for pos, i in enumerate(events):
        earlier = [j for j in events[:pos] if log.user[j] == log.user[i]
                   and (log.ts[j] < log.ts[i] if ties == "strict" else True)]
        key = (log.user[i], log.ts[i], log.item[i])
        expected.setdefault(key, []).append([log.item[j] for j in earlier][-4:])
    total = 0
    for split, t in s.tables.items():
        for u, ts, it, h in zip(t.column("user_id").to_pylist(), t.column("ts").to_pylist(),
                                t.column("item_id").to_pylist(), _lists(t, "hist_item_id"), strict=False):
            assert h in expected[(u, ts, it)], (split, u, ts, it, h)
            total += 1
            if ties == "strict":
                # no history event at or after the target's timestamp
                user_events = {(log.item[j], log.ts[j]) for j in range(n) if log.user[j] == u}
                assert all(any(e[0] == x and e[1] < ts for e in user_events) for x in h)
    assert total == n  # threshold mode: one sample per event


def test_sampled_negatives_never_interacted_and_resampled_per_epoch(tmp_path):
    log = _log(seed=1, items=30)
    cfg = SampleConfig(mode="sampled", split="loo", max_len=5, neg_ratio=2, eval_negatives=10, seed=3)
    s = build_samples(log, cfg, name="t")
    seen = {}
    for u, i in zip(log.user, log.item, strict=False):
        seen.setdefault(int(u), set()).add(int(i))
    for t in s.tables.values():
        lab = t.column("label").to_numpy()
        users, items = t.column("user_id").to_pylist(), t.column("item_id").to_pylist()
        for u, it, y in zip(users, items, lab, strict=False):
            assert (it in seen[u]) == (y == 1), (u, it, y)
    # eval: every positive followed by exactly 10 distinct negatives
    test = s.tables["test"]
    items = np.array(test.column("item_id").to_pylist()).reshape(-1, 11)
    assert all(len(set(r[1:])) == 10 for r in items)
    out = write_samples(s, tmp_path / "d")
    schema = load_schema(out)
    ep = EpochNegatives(out, schema)
    e0, e1, e1b = ep.table(0, 7), ep.table(1, 7), ep.table(1, 7)
    assert e1.equals(e1b)  # seeded by (seed, epoch)
    n_pos = int((s.tables["train"].column("label").to_numpy() == 1).sum())
    assert e1.num_rows == 3 * n_pos
    assert not np.array_equal(e0.column("item_id").to_numpy(), e1.column("item_id").to_numpy())
    for t in (e0, e1):
        for u, it, y in zip(t.column("user_id").to_pylist(), t.column("item_id").to_pylist(),
                            t.column("label").to_numpy(), strict=False):
            assert (it in seen[u]) == (y == 1)
        # negatives keep their positive's history
        h = _lists(t, "hist_item_id")
        assert all(h[i] == h[i + 1] == h[i + 2] for i in range(0, len(h), 3))


def test_leave_one_out_split():
    log = _log(seed=2)
    s = build_samples(log, SampleConfig(mode="sampled", split="loo", eval_negatives=3, ties="order"),
                      name="t")
    n = len(log.user)
    by_user = {}
    for i in sorted(range(n), key=lambda i: (log.user[i], log.ts[i], i)):
        by_user.setdefault(int(log.user[i]), []).append(i)
    for split, pick in (("test", -1), ("valid", -2)):
        t = s.tables[split]
        pos = t.filter(t.column("label").to_numpy() == 1)
        item_ts = zip(pos.column("item_id").to_pylist(), pos.column("ts").to_pylist(), strict=False)
        got = dict(zip(pos.column("user_id").to_pylist(), item_ts, strict=False))
        want = {u: (int(log.item[ev[pick]]), int(log.ts[ev[pick]]))
                for u, ev in by_user.items() if len(ev) >= 3}
        assert got == want
    train = s.tables["train"]
    n_train_pos = int((train.column("label").to_numpy() == 1).sum())
    assert n_train_pos == sum(len(ev) - 2 if len(ev) >= 3 else len(ev) for ev in by_user.values())


def test_movielens_real_rows(tmp_path):
    src = SHARED / "data" / "ml-100k"
    if not (src / "ml-100k.inter").exists():
        pytest.skip(f"{src} absent (../shared/ holds the real ML-100K files)")
    from embtables.datasets.movielens import convert_movielens

    out = convert_movielens(src, tmp_path / "ml")
    s = load_schema(out)
    # 100,000 ratings of 943 users (each >= 20): one test and one valid positive per user
    assert s.rows == {"train": 2 * (100_000 - 2 * 943), "valid": 943 * 101, "test": 943 * 101}
    cards = {c.name: c.cardinality for c in s.categorical}
    assert cards["user_id"] == 943 and cards["item_id"] == 1682 and cards["gender"] == 2
    assert [q.name for q in s.sequences] == ["hist_item_id", "hist_genre", "hist_year"]
    t = pq.read_table(out / s.splits["test"][0], columns=["hist_item_id"])
    lens = np.diff(t.column("hist_item_id").combine_chunks().offsets.to_numpy())
    assert lens.max() == 50


def _write_grouplens_100k(d: Path) -> None:
    d.mkdir()
    # user item rating ts (tab); user 9 rates 50 and 60 in the same second
    (d / "u.data").write_text("7\t50\t5\t100\n7\t60\t3\t90\n9\t50\t4\t95\n7\t70\t4\t110\n9\t60\t1\t95\n"
                              "9\t80\t2\t120\n")
    (d / "u.user").write_text("7|24|M|technician|85711\n9|53|F|other|94043\n")
    flags = ["0"] * 19
    g1, g2 = flags.copy(), flags.copy()
    g1[5] = "1"  # Comedy
    g2[1] = g2[8] = "1"  # Action, Drama
    (d / "u.item").write_bytes(
        ("50|Star Wars (1977)|01-Jan-1977||http://x|" + "|".join(g2) + "\n"
         "60|Caf\xe9 (1995)|01-Jan-1995||http://x|" + "|".join(g1) + "\n"
         "70|Other|01-Jan-1980||http://x|" + "|".join(g1) + "\n"
         "80|Unknown|||http://x|" + "|".join(flags) + "\n").encode("latin-1"))


def test_grouplens_layouts(tmp_path):
    from embtables.datasets.movielens import read_movielens, to_event_log

    _write_grouplens_100k(tmp_path / "ml100k")
    raw = read_movielens(tmp_path / "ml100k")
    assert raw.layout == "ml-100k"
    log = to_event_log(raw)
    assert log.num_users == 2 and log.num_items == 4
    # genre ids by sorted name: Action 1, Comedy 2; item 80 has no genre flag and no date -> 0
    assert log.item_side.columns["genre"].tolist() == [0, 1, 2, 2, 0]
    assert log.item_side.columns["year"].tolist() == [0, 1, 3, 2, 0]  # 1977, 1995, 1980, none
    assert log.user_side.columns["gender"].tolist() == [0, 2, 1]

    d = tmp_path / "ml1m"
    d.mkdir()
    (d / "ratings.dat").write_text("1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n")
    (d / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    (d / "movies.dat").write_bytes("10::Toy Story (1995)::Animation|Children's\n"
                                   "20::Jumanji (1995)::Adventure\n".encode("latin-1"))
    raw = read_movielens(d)
    assert raw.layout == "ml-1m"
    log = to_event_log(raw)
    assert log.item_side.columns["genre"].tolist() == [0, 2, 1]  # Animation, Adventure
    assert log.ts.tolist() == [978300760, 978302109, 978301968]

    from embtables.datasets.movielens import convert_movielens

    out = convert_movielens(tmp_path / "ml100k", tmp_path / "out",
                            cfg=SampleConfig(eval_negatives=1, ties="strict"))
    t = pq.read_table(out / "train")
    assert t.num_rows == 2 * 2  # one training positive per user (+1 negative each)
    v = pq.read_table(out / "valid")
    keys = zip(v.column("user_id").to_pylist(), v.column("item_id").to_pylist(), strict=False)
    hist = dict(zip(keys, _lists(v, "hist_item_id"), strict=False))
    assert hist[(2, 2)] == []  # user 9's valid target (60 @ 95) never sees the same-second rating of 50
    assert hist[(1, 1)] == [2]  # user 7's valid target (50 @ 100) sees 60 @ 90


def test_download_without_network_fails_fast_and_clearly(tmp_path):
    from embtables.datasets.movielens import download

    with pytest.raises(ConnectionError, match="pass its folder as SRC"):
        download("ml-100k", tmp_path, url="http://127.0.0.1:9/ml-100k.zip", timeout=2)


def test_behavior_log_with_yaml_columns(tmp_path):
    from embtables.datasets.behavior import ColumnMap, convert_behavior

    (tmp_path / "log.csv").write_text(
        "uid,iid,cat,time,click\n"
        "a,x,c1,2020-01-01,1\na,y,c2,2020-01-02,0\na,z,c1,2020-01-03,1\na,x,c1,2020-01-04,1\n"
        "b,y,c2,2020-01-01,1\nb,z,c1,2020-01-02,1\nb,x,c1,2020-01-03,0\n")
    (tmp_path / "cols.yaml").write_text("user: uid\nitem: iid\ncategory: cat\ntimestamp: time\n"
                                        "label: click\n")
    out = convert_behavior(tmp_path / "log.csv", tmp_path / "d",
                           cols=ColumnMap.from_yaml(tmp_path / "cols.yaml"))
    s = load_schema(out)
    assert [q.name for q in s.sequences] == ["hist_item_id", "hist_category"]
    test = pq.read_table(out / "test")
    rows = sorted(zip(test.column("user_id").to_pylist(), test.column("label").to_pylist(),
                      _lists(test, "hist_item_id"), strict=False))
    # user a's last event (x, click) has history of earlier *clicks* only: x, z (y was not clicked)
    assert rows[0] == (1, 1.0, [1, 3])
    with pytest.raises(ValueError, match="unknown key"):
        (tmp_path / "bad.yaml").write_text("usr: uid\n")
        ColumnMap.from_yaml(tmp_path / "bad.yaml")


def test_cli_movielens_threshold_time_split(tmp_path, capsys):
    from embtables.cli import main

    _write_grouplens_100k(tmp_path / "src")
    rc = main(["data", "movielens", str(tmp_path / "src"), "--out", str(tmp_path / "d"),
               "--mode", "threshold", "--threshold", "4", "--split", "time", "--valid-frac", "0.2",
               "--test-frac", "0.2"])
    assert rc == 0, capsys.readouterr()
    s = load_schema(tmp_path / "d")
    assert sum(s.rows.values()) == 6  # threshold: one sample per rating
    labels = {}
    for split in ("train", "valid", "test"):
        t = pq.read_table(tmp_path / "d" / split)
        keys = zip(t.column("user_id").to_pylist(), t.column("ts").to_pylist(),
                   t.column("item_id").to_pylist(), strict=True)
        labels.update(zip(keys, t.column("label").to_pylist(), strict=True))
    assert labels[(1, 100, 1)] == 1.0 and labels[(1, 90, 2)] == 0.0  # ratings 5 and 3 with threshold 4
    assert "threshold" not in capsys.readouterr().err
    assert main(["data", "movielens", str(tmp_path / "src"), "--out", str(tmp_path / "e"), "--mode",
                 "threshold"]) == 1  # no --threshold: a clear error, not a traceback
    assert "--threshold" in capsys.readouterr().err
