"""Converters on bad or unusual input: empty results are errors, labels must be 0/1 unless
mapped, messages quote at most 200 characters and name the user's paths, the Kaggle CSV
converts, stale temporaries of dead conversions are removed, and a conversion killed after
block N leaves nothing that looks complete and reruns to the same dataset."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from embtables.cli import main as cli_main
from embtables.datasets.behavior import ColumnMap, convert_behavior, read_events
from embtables.datasets.criteo import BadRowError, EmptySplitError, convert_criteo
from embtables.datasets.criteo_format import CAT_NAMES, DENSE_NAMES
from embtables.datasets.parquet_out import atomic_output_dir
from embtables.datasets.schema import load_schema
from embtables.datasets.sequences import SampleConfig
from embtables.datasets.synth import generate_synth

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "criteo-sample" / "criteo_sample.csv"
HEADER = ["label", *DENSE_NAMES, *CAT_NAMES]


@pytest.fixture(scope="module")
def tsv(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("src")
    generate_synth(d / "direct", 3000, seed=3, scale=0.001, tsv=d / "s.tsv", progress=False)
    return d / "s.tsv"


def _tables(root: Path) -> dict[str, object]:
    s = load_schema(root)
    return {sp: pq.read_table([root / f for f in s.splits[sp]]) if s.splits[sp] else None for sp in s.splits}


def _leftovers(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f"{name}.tmp-*")) + sorted(parent.glob(f"{name}.old-*"))


# ---- empty results ---------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", "\t".join(HEADER).encode() + b"\n"], ids=["empty", "header-only"])
def test_empty_or_header_only_file_is_an_error(tmp_path, content, capsys):
    src = tmp_path / "in.tsv"
    src.write_bytes(content)
    with pytest.raises(EmptySplitError, match="no data rows"):
        convert_criteo([src], tmp_path / "o", cat_mode="raw", progress=False)
    assert cli_main(["data", "criteo", str(src), "--out", str(tmp_path / "o"), "--quiet"]) != 0
    assert "no data rows" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not _leftovers(tmp_path, "o")


def test_skip_with_every_row_bad_is_an_error(tmp_path):
    src = tmp_path / "bad.tsv"
    src.write_text("1\t2\t3\n" * 5)
    with pytest.raises(EmptySplitError, match=r"every row was bad \(column_count 5\).*bad\.tsv:1"):
        convert_criteo([src], tmp_path / "o", cat_mode="raw", on_bad_row="skip", split=(1, 0, 0),
                       progress=False)
    assert not (tmp_path / "o").exists()


def test_a_split_asked_for_that_gets_no_rows_is_an_error(tsv, tmp_path):
    lines = tsv.read_bytes().splitlines(keepends=True)
    (tmp_path / "few.tsv").write_bytes(b"".join(lines[:4]))  # 10% of 4 rows is no whole row
    with pytest.raises(EmptySplitError, match="split valid got none of the 4 rows"):
        convert_criteo([tmp_path / "few.tsv"], tmp_path / "o", cat_mode="raw", progress=False)
    s = convert_criteo([tmp_path / "few.tsv"], tmp_path / "o", cat_mode="raw", split=(0.5, 0, 0.5),
                       progress=False)
    assert s.rows == {"train": 2, "valid": 0, "test": 2}  # a fraction of 0: not asked for
    (tmp_path / "bad.tsv").write_text("x\n")
    with pytest.raises(EmptySplitError, match=r"split test: its files \(.*bad\.tsv\) hold no good rows"):
        convert_criteo({"train": [tmp_path / "few.tsv"], "test": [tmp_path / "bad.tsv"]}, tmp_path / "f",
                       cat_mode="raw", on_bad_row="skip", progress=False)


# ---- messages ----------------------------------------------------------------------------


def test_a_huge_bad_field_is_quoted_cut_to_200_characters(tsv, tmp_path):
    fields = tsv.read_text().splitlines()[0].split("\t")
    fields[3] = "9" * 10_000_000  # a 10 MB dense field
    (tmp_path / "huge.tsv").write_text("\t".join(fields) + "\n")
    with pytest.raises(BadRowError) as e:
        convert_criteo([tmp_path / "huge.tsv"], tmp_path / "o", cat_mode="raw", progress=False)
    msg = str(e.value)
    assert len(msg) < 1000, len(msg)  # was 10.5 MB
    assert "I3='" + "9" * 200 + "'... (10,000,000 characters in all)" in msg
    assert "huge.tsv:1:" in msg


def test_truncated_gzip_names_the_file(tsv, tmp_path):
    data = gzip.compress(tsv.read_bytes())
    (tmp_path / "cut.tsv.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.tsv\.gz: truncated or corrupt gzip file"):
        convert_criteo([tmp_path / "cut.tsv.gz"], tmp_path / "o", cat_mode="raw", split=(1, 0, 0),
                       progress=False)
    assert not (tmp_path / "o").exists() and not _leftovers(tmp_path, "o")


def test_a_directory_as_input_says_so(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        convert_criteo([tmp_path / "dir"], tmp_path / "o", progress=False)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_events(tmp_path / "dir", ColumnMap())


def test_out_errors_name_the_users_path_not_the_temporary(tsv, tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "data"
    assert cli_main(["data", "criteo", str(tsv), "--out", str(out), "--quiet", "--cat-mode", "raw"]) == 2
    err = capsys.readouterr().err
    assert "afile" in err and ".tmp-" not in err and "is a file" in err

    # a full disk while writing Parquet (pyarrow's error has no errno and no file name)
    import pyarrow.parquet as pqm

    def full(self, *a, **k):
        raise OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pqm.ParquetWriter, "write_table", full)
    out = tmp_path / "full"
    assert cli_main(["data", "criteo", str(tsv), "--out", str(out), "--quiet", "--cat-mode", "raw"]) == 2
    err = capsys.readouterr().err
    part = out / "train" / "part-00000.parquet"
    assert err.splitlines()[0] == f"error: no space left on device while writing {part}"
    assert not out.exists() and not _leftovers(tmp_path, "full")


# ---- the Kaggle CSV ---------------------------------------------------------------------


def _kaggle_csv(lines: list[list[str]], path: Path) -> Path:
    head = ["Id", "Label", *DENSE_NAMES, *CAT_NAMES]
    body = [",".join([str(10_000_000 + i), *row]) for i, row in enumerate(lines)]
    path.write_text("\n".join([",".join(head), *body]) + "\n")
    return path


def test_kaggle_csv_with_id_column_converts_like_the_tsv(tsv, tmp_path):
    rows = [line.split("\t") for line in tsv.read_text().splitlines()]
    src = _kaggle_csv(rows, tmp_path / "train.csv")
    for mode in ("raw", "vocab"):
        a = convert_criteo([src], tmp_path / f"k{mode}", cat_mode=mode, block_mb=0.07, progress=False)
        b = convert_criteo([tsv], tmp_path / f"t{mode}", cat_mode=mode, progress=False)
        assert a.rows == b.rows == {"train": 2400, "valid": 300, "test": 300}
        assert a.categorical == b.categorical
        ta, tb = _tables(tmp_path / f"k{mode}"), _tables(tmp_path / f"t{mode}")
        assert all(ta[s].equals(tb[s]) for s in ta)
    assert a.extra["files"][0]["id_column"] is True
    # the same rows without the header: refused, saying how it would be read
    (tmp_path / "nohead.csv").write_text("".join(src.read_text().splitlines(keepends=True)[1:]))
    with pytest.raises(BadRowError, match="expected 40 fields, got 41 .*Kaggle's CSV"):
        convert_criteo([tmp_path / "nohead.csv"], tmp_path / "n", cat_mode="raw", progress=False)


def test_kaggle_format_of_the_real_sample(tmp_path):
    if not SAMPLE.exists():
        pytest.skip(f"Criteo sample not found at {SAMPLE} (only in the development checkout)")
    lines = SAMPLE.read_text().splitlines()
    assert lines[0].split(",")[0] == "label"  # DeepCTR's header: no Id; build Kaggle's layout from it
    src = _kaggle_csv([line.split(",") for line in lines[1:]], tmp_path / "kaggle.csv")
    a = convert_criteo([src], tmp_path / "k", cat_mode="vocab", split=(1, 0, 0), progress=False)
    convert_criteo([SAMPLE], tmp_path / "s", cat_mode="vocab", split=(1, 0, 0), progress=False)
    assert a.rows["train"] == 200
    assert _tables(tmp_path / "k")["train"].equals(_tables(tmp_path / "s")["train"])


# ---- behaviour logs -----------------------------------------------------------------------


def _log(path: Path, labels, times=None) -> Path:
    users = ["a", "a", "a", "a", "b", "b", "b", "b"]
    items = ["x", "y", "z", "w", "y", "z", "x", "w"]
    times = times or [str(i) for i in range(1, 9)]
    rows = [",".join(r) for r in zip(users, items, ["c"] * 8, times, [str(x) for x in labels], strict=True)]
    path.write_text("user,item,category,timestamp,label\n" + "\n".join(rows) + "\n")
    return path


def test_behavior_labels_other_than_0_1_need_a_threshold(tmp_path, capsys):
    src = _log(tmp_path / "log.csv", [1, 2, 2, 1, 2, 1, 2, 2])
    with pytest.raises(ValueError, match=r"line 3: label '2' is not 0 or 1 \(the column holds 1, 2\).*"
                                         r"--label-threshold"):
        convert_behavior(src, tmp_path / "d", cols=ColumnMap(label="label"))
    assert cli_main(["data", "behavior", str(src), "--out", str(tmp_path / "d"), "--label-col", "label"]) == 1
    assert "--label-threshold" in capsys.readouterr().err and not (tmp_path / "d").exists()
    assert cli_main(["data", "behavior", str(src), "--out", str(tmp_path / "d"), "--label-col", "label",
                     "--label-threshold", "2", "--history-from", "all"]) == 0
    got = pd.concat([pq.read_table(tmp_path / "d" / s).to_pandas() for s in ("train", "valid", "test")])
    by_event = dict(zip(zip(got["user_id"], got["ts"], strict=True), got["label"], strict=True))
    # user a = id 1, events at ts 1..4 with labels 1, 2, 2, 1 -> clicks only where label >= 2
    assert [by_event[(1, t)] for t in (1, 2, 3, 4)] == [0.0, 1.0, 1.0, 0.0]


def test_behavior_bad_timestamp_names_its_own_line(tmp_path):
    times = ["100", "200", "300", "soon", "500", "600", "700", "800"]
    src = _log(tmp_path / "log.csv", [1] * 8, times)
    with pytest.raises(ValueError, match=r"line 5: timestamp 'soon' is neither a number nor a date"):
        read_events(src, ColumnMap(label="label"))  # was: line 2, the first numeric timestamp
    dates = [f"2020-01-0{i}" for i in range(1, 9)]
    parsed = read_events(_log(tmp_path / "d.csv", [1] * 8, dates), ColumnMap())
    assert parsed["timestamp"].iloc[1] == 1577923200  # 2020-01-02 00:00 UTC


def test_catalogue_smaller_than_eval_negatives_says_so(tmp_path):
    events = [("a", "x"), ("a", "y"), ("a", "z"), ("a", "w"), ("b", "y"), ("b", "z"), ("b", "x"), ("b", "w"),
              ("c", "p"), ("c", "q")]  # 6 items; a and b leave 2 of them unseen
    src = tmp_path / "log.csv"
    src.write_text("user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for t, (u, i) in enumerate(events)))
    cols = ColumnMap(category=None)
    with pytest.raises(ValueError, match=r"the catalogue has only 6 items: --eval-negatives 100 .*at most 2"):
        convert_behavior(src, tmp_path / "d", cols=cols, cfg=SampleConfig(mode="sampled", eval_negatives=100))
    with pytest.raises(ValueError, match=r"2 users interacted with so many of the 6 items that fewer than 3 "
                                         r".*--eval-negatives 3\); lower --eval-negatives to at most 2"):
        convert_behavior(src, tmp_path / "d", cols=cols, cfg=SampleConfig(mode="sampled", eval_negatives=3))
    convert_behavior(src, tmp_path / "d", cols=cols, cfg=SampleConfig(mode="sampled", eval_negatives=2))
    assert load_schema(tmp_path / "d").rows["test"] == 2 * 3


def test_behavior_split_without_samples_is_an_error(tmp_path):
    (tmp_path / "log.csv").write_text("user,item,category,timestamp\na,x,c,1\nb,y,c,2\na,y,c,3\n")
    with pytest.raises(ValueError, match=r"split valid/test has no samples .*3 or more events"):
        convert_behavior(tmp_path / "log.csv", tmp_path / "d", cfg=SampleConfig(mode="sampled", neg_ratio=0,
                                                                                eval_negatives=0))
    assert not (tmp_path / "d").exists()


# ---- stale temporaries and kills ----------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_dead_processes_are_removed(tsv, tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = tmp_path / f"o.tmp-{_dead_pid()}-deadbeef"
        live = tmp_path / f"o.tmp-{sleeper.pid}-cafe0123"
        old = tmp_path / f"o.old-{_dead_pid()}-00c0ffee"
        other = tmp_path / "other.tmp-1-aaaa0000"
        for d in (dead, live, old, other):
            (d / "train").mkdir(parents=True)
        convert_criteo([tsv], tmp_path / "o", cat_mode="raw", progress=False)
        assert not dead.exists() and not old.exists()
        assert live.exists() and other.exists()  # a live process's, and another --out's
    finally:
        sleeper.kill()
        sleeper.wait()


def test_atomic_output_dir_keeps_no_owner_file_in_the_result(tmp_path):
    with atomic_output_dir(tmp_path / "o") as tmp:
        (tmp / "x").write_text("1")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["x"]


def _cli(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("EMBTABLES_FAULT", None)
    if fault:
        env["EMBTABLES_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "embtables.cli", *args], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("mode", ["raw", "vocab"])
def test_criteo_killed_after_block_n_reruns_to_the_same_dataset(tsv, tmp_path, mode):
    args = ["data", "criteo", str(tsv), "--cat-mode", mode, "--block-mb", "0.07", "--quiet"]
    assert _cli([*args, "--out", str(tmp_path / "ref")]).returncode == 0
    out = tmp_path / "o"
    killed = _cli([*args, "--out", str(out)], fault="convert_block:3")
    assert killed.returncode == -9, killed.stderr
    assert not out.exists() and len(_leftovers(tmp_path, "o")) == 1  # half-written, and it does not look done
    assert not (_leftovers(tmp_path, "o")[0] / "schema.json").exists()
    rerun = _cli([*args, "--out", str(out)])
    assert rerun.returncode == 0, rerun.stderr
    assert not _leftovers(tmp_path, "o")  # the dead run's temporary is gone
    assert load_schema(out).rows == load_schema(tmp_path / "ref").rows
    ta, tr = _tables(out), _tables(tmp_path / "ref")
    assert all(ta[s].equals(tr[s]) for s in tr)


def test_behavior_killed_after_block_n_reruns_to_the_same_dataset(tmp_path):
    rng = np.random.default_rng(0)
    n = 3000
    df = pd.DataFrame({"user": rng.integers(0, 100, n), "item": rng.integers(0, 400, n),
                       "category": rng.integers(0, 9, n), "timestamp": rng.integers(0, 10**6, n)})
    df.to_csv(tmp_path / "log.csv", index=False)
    args = ["data", "behavior", str(tmp_path / "log.csv"), "--eval-negatives", "20"]
    assert _cli([*args, "--out", str(tmp_path / "ref")]).returncode == 0
    out = tmp_path / "o"
    killed = _cli([*args, "--out", str(out)], fault="convert_block:2")
    assert killed.returncode == -9, killed.stderr
    assert not out.exists() and len(_leftovers(tmp_path, "o")) == 1
    assert _cli([*args, "--out", str(out)]).returncode == 0
    assert not _leftovers(tmp_path, "o")
    ta, tr = _tables(out), _tables(tmp_path / "ref")
    assert set(ta) == set(tr) and all(ta[s].equals(tr[s]) for s in tr)


def test_movielens_bad_timestamp_names_file_and_line(tmp_path):
    from embtables.datasets.movielens import read_movielens

    (tmp_path / "u.data").write_text("1\t10\t5\t881250949\n2\t11\t4\tyesterday\n")
    with pytest.raises(ValueError, match=r"u\.data:2: timestamp 'yesterday' is not an integer"):
        read_movielens(tmp_path)
    with pytest.raises(NotADirectoryError, match="give the MovieLens folder"):
        read_movielens(tmp_path / "u.data")
    (tmp_path / "u.data").write_text("1\t10\t5\t881250949\n2\t11\t4\t881250950\n")
    assert read_movielens(tmp_path).ratings["ts"].tolist() == [881250949, 881250950]


def test_criteo_injected_full_disk_after_block_n_leaves_nothing(tsv, tmp_path):
    out = tmp_path / "o"
    r = _cli(["data", "criteo", str(tsv), "--cat-mode", "raw", "--block-mb", "0.07", "--quiet",
              "--out", str(out)],
             fault="convert_block:2:enospc")
    assert r.returncode == 2
    assert r.stderr.splitlines()[0] == f"error: no space left on device while writing {out}", r.stderr
    assert not out.exists() and not _leftovers(tmp_path, "o")


@pytest.mark.slow
def test_seeded_random_kills_during_conversions(tsv, tmp_path):
    """By hand (`-m slow`): conversions killed after a random block (or past the last one, so
    not at all), each rerun compared with an uninterrupted conversion. Prints the counts."""
    rng = np.random.default_rng(2026)
    log = tmp_path / "log.csv"
    n = 3000
    pd.DataFrame({"user": rng.integers(0, 100, n), "item": rng.integers(0, 400, n),
                  "category": rng.integers(0, 9, n),
                  "timestamp": rng.integers(0, 10**6, n)}).to_csv(log, index=False)
    commands = {
        "criteo-raw": ["data", "criteo", str(tsv), "--cat-mode", "raw", "--block-mb", "0.07", "--quiet"],
        "criteo-vocab": ["data", "criteo", str(tsv), "--cat-mode", "vocab", "--block-mb", "0.07", "--quiet"],
        "behavior": ["data", "behavior", str(log), "--eval-negatives", "20"],
    }
    refs = {}
    for name, args in commands.items():
        assert _cli([*args, "--out", str(tmp_path / f"ref-{name}")]).returncode == 0
        refs[name] = _tables(tmp_path / f"ref-{name}")
    tried = killed = survived = 0
    for case in range(24):
        name = list(commands)[case % len(commands)]
        block = int(rng.integers(1, 10))
        out = tmp_path / f"case{case}"
        r = _cli([*commands[name], "--out", str(out)], fault=f"convert_block:{block}")
        tried += 1
        if r.returncode == -9:
            killed += 1
            assert not out.exists()
            assert _cli([*commands[name], "--out", str(out)]).returncode == 0
        else:
            assert r.returncode == 0, r.stderr  # fewer blocks than `block`: it finished
        got = _tables(out)
        assert not _leftovers(tmp_path, out.name) and set(got) == set(refs[name])
        assert all(got[s].equals(refs[name][s]) for s in got)
        survived += 1
    print(f"\nrandom kills during conversions: {tried} cases, {killed} killed, {survived} equal to an "
          "uninterrupted conversion after the rerun")


def test_a_file_or_a_broken_schema_as_dataset_is_named(tsv, tmp_path):
    with pytest.raises(NotADirectoryError, match=r"s\.tsv is a file; a dataset is the directory"):
        load_schema(tsv)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "schema.json").write_text('{"name": "x", "categorical": [{"nme": 1}]')
    with pytest.raises(ValueError, match=r"schema\.json: not a valid embtables schema"):
        load_schema(tmp_path / "d")
    (tmp_path / "d" / "schema.json").write_text('["not", "a", "mapping"]')
    with pytest.raises(ValueError, match=r"schema\.json: not a valid embtables schema"):
        load_schema(tmp_path / "d")
