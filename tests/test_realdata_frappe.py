"""Frappe -> BARS Frappe_x1: on a small hand-made log (always), and on the real files in
../shared/data/frappe (skipped when absent)."""

from __future__ import annotations

import collections

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import SHARED

from embtables.datasets.frappe import CONTEXT, FIELDS, convert_frappe, encode_log, read_libsvm, read_raw_log
from embtables.datasets.schema import load_schema

FRAPPE = SHARED / "data" / "frappe"
OFFICIAL_TRAIN_POSITIVES = 67_604  # 202,027 official train rows - 134,423 negatives


def split_ids(root, split) -> tuple[np.ndarray, np.ndarray]:
    schema = load_schema(root)
    t = pq.read_table(schema.files(root, split))
    offsets = np.array([schema.extra["global_id_offsets"][f] for f in FIELDS])
    return t.column("label").to_numpy(), np.stack([t.column(f).to_numpy() for f in FIELDS], 1) + offsets


def write_libsvm(path, labels, ids) -> None:
    lines = (
        f"{int(y)} " + " ".join(f"{i}:1" for i in row) + "\n" for y, row in zip(labels, ids, strict=True)
    )
    path.write_text("".join(lines))


def fake_frappe(tmp_path, rng):
    """A raw log of 300 rows (3 contexts x a few values), valid/test = a third of the rows
    as positives plus made-up negatives, laid out as the benchmark does."""
    n = 300
    raw = pd.DataFrame({"user": rng.integers(0, 12, n), "item": rng.integers(0, 40, n), "cnt": 1})
    for c in CONTEXT:
        raw[c] = rng.choice(["x", "y", "z"], n)
    raw.loc[0, ["user", "item"]] = [11, 39]  # every id range is used
    src = tmp_path / "src"
    src.mkdir()
    raw.to_csv(src / "frappe.csv", sep="\t", index=False)
    ids, sizes = encode_log(read_raw_log(src / "frappe.csv"))
    ev = rng.permutation(n)[:100]
    for name, part in (("valid", ev[:60]), ("test", ev[60:])):
        neg = ids[part].copy()
        neg[:, 1] = sizes[0] + rng.integers(0, sizes[1], len(part))
        write_libsvm(
            src / f"{name}.libsvm", np.r_[np.ones(len(part)), np.zeros(len(part))], np.r_[ids[part], neg]
        )
    return src, raw, ids, ev


def test_fake_log_rebuilds_train_exactly(tmp_path):
    rng = np.random.default_rng(0)
    src, raw, ids, ev = fake_frappe(tmp_path, rng)
    schema = convert_frappe(src, tmp_path / "out", seed=3)
    y, x = split_ids(tmp_path / "out", "train")
    train_pos = np.delete(ids, ev, axis=0)
    assert sorted(map(tuple, x[y == 1])) == sorted(map(tuple, train_pos))
    neg = x[y == 0]
    assert len(neg) == 2 * len(train_pos)
    used = set(zip(ids[:, 0], ids[:, 1], strict=True))
    assert not any((u, i) in used for u, i in zip(neg[:, 0], neg[:, 1], strict=True))
    ctx = collections.Counter(tuple(np.r_[r[0], r[2:]]) for r in train_pos)
    neg_ctx = collections.Counter(tuple(np.r_[r[0], r[2:]]) for r in neg)
    assert neg_ctx == collections.Counter({k: 2 * v for k, v in ctx.items()})  # 2 per positive, its context
    for name in ("valid", "test"):
        lab, want = read_libsvm(src / f"{name}.libsvm")
        got_y, got = split_ids(tmp_path / "out", name)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_y, lab)
    assert [c.cardinality for c in schema.categorical] == [12, 40, 3, 3, 3, 3, 3, 3, 3, 3]
    assert schema.dense == []


def test_eval_positive_missing_from_the_log_is_an_error(tmp_path):
    src, _, _, _ = fake_frappe(tmp_path, np.random.default_rng(1))
    lines = (src / "test.libsvm").read_text().splitlines()
    first = lines[0].split()
    first[1] = "0:1" if first[1] != "0:1" else "1:1"  # another user: no such raw row
    lines[0] = " ".join(first)
    (src / "test.libsvm").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="match no row of the raw log"):
        convert_frappe(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_libsvm_line_names_file_and_line(tmp_path):
    p = tmp_path / "valid.libsvm"
    p.write_text("1 0:1 1:1 2:1 3:1 4:1 5:1 6:1 7:1 8:1 9:1\n0 1:1 2:1\n")
    with pytest.raises(ValueError, match=r"valid.libsvm:2: expected a label and 10"):
        read_libsvm(p)


# ---- the real files ----------------------------------------------------------------------

needs_frappe = pytest.mark.skipif(
    not all((FRAPPE / f).exists() for f in ("valid.libsvm", "test.libsvm", "Mobile_Frappe.zip")),
    reason=f"Frappe files not found in {FRAPPE} (research-use data, not shipped: see docs/real-data.md)",
)


@pytest.fixture(scope="module")
def frappe_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("frappe") / "frappe"
    convert_frappe(FRAPPE, out)
    return out


@needs_frappe
def test_real_frappe_layout_and_official_splits(frappe_root):
    schema = load_schema(frappe_root)
    assert [c.cardinality for c in schema.categorical] == [957, 4082, 7, 7, 2, 3, 2, 9, 80, 233]
    assert sum(c.cardinality for c in schema.categorical) == 5382
    assert schema.rows["valid"] == 57_722 and schema.rows["test"] == 28_860
    for name in ("valid", "test"):
        lab, want = read_libsvm(FRAPPE / f"{name}.libsvm")
        got_y, got = split_ids(frappe_root, name)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_y, lab)


@needs_frappe
def test_real_frappe_train_positives_are_the_official_count_and_complete_the_log(frappe_root):
    y, x = split_ids(frappe_root, "train")
    assert int(y.sum()) == OFFICIAL_TRAIN_POSITIVES
    raw, _ = encode_log(read_raw_log(FRAPPE / "Mobile_Frappe.zip"))
    ev = [split_ids(frappe_root, s) for s in ("valid", "test")]
    pos = np.concatenate([x[y == 1]] + [i[lab == 1] for lab, i in ev])
    assert collections.Counter(map(tuple, pos)) == collections.Counter(map(tuple, raw))


@needs_frappe
def test_real_frappe_negatives_follow_the_benchmarks_rule(frappe_root):
    """The official valid/test negatives and ours: a real row's user and context, an item the
    user never used."""
    raw, _ = encode_log(read_raw_log(FRAPPE / "Mobile_Frappe.zip"))
    used = set(zip(raw[:, 0], raw[:, 1], strict=True))
    contexts = set(map(tuple, np.c_[raw[:, :1], raw[:, 2:]]))
    for s in ("train", "valid", "test"):
        y, x = split_ids(frappe_root, s)
        neg = x[y == 0]
        assert not any((u, i) in used for u, i in zip(neg[:, 0], neg[:, 1], strict=True)), s
        assert all(tuple(r) in contexts for r in np.c_[neg[:, :1], neg[:, 2:]]), s


def test_cli_converts_and_reports_errors(tmp_path, capsys):
    from embtables.cli import main

    src, _, _, _ = fake_frappe(tmp_path, np.random.default_rng(2))
    assert main(["data", "frappe", str(src), "--out", str(tmp_path / "o"), "--seed", "1"]) == 0
    assert "user (12)" in capsys.readouterr().out
    assert load_schema(tmp_path / "o").extra["seed"] == 1
    assert main(["data", "frappe", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2")]) == 1
    assert "not a folder" in capsys.readouterr().err


@needs_frappe
@pytest.mark.parametrize("model", ["dlrm", "deepfm"])
def test_shipped_config_learns_on_real_frappe(frappe_root, tmp_path, model):
    """The shipped `frappe` config on the converted data (no dense features: DLRM's bottom
    MLP sees an empty input), 60 steps."""
    from embtables.experiments import run

    o = {
        "data.path": str(frappe_root),
        "model.name": model,
        "train.max_steps": 60,
        "train.threads": 1,
        "train.progress": False,
        "train.checkpoint": False,
        "data.max_eval_rows": 20000,
    }
    s = run("frappe", overrides=o, run_dir=tmp_path / "r", quiet=True)
    assert s["steps"] == 60 and s["test_auc"] > 0.85, s["test_auc"]
