"""`predict` refuses a dataset whose ids mean something else than in the training data
(categorical mode, num_embeddings, vocabulary), naming the feature."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_overrides

from embtables.experiments import run
from embtables.experiments.predict import IncompatibleData, predict


def _edit_schema(root: Path, fn) -> None:
    s = json.loads((root / "schema.json").read_text())
    fn(s)
    (root / "schema.json").write_text(json.dumps(s))


def _with_vocab(src: Path, dest: Path, shuffle: str | None = None) -> Path:
    """A copy of ``src`` marked as vocabulary ids, with a vocabulary file per feature
    (``shuffle``: that feature's vocabulary permuted, i.e. the same ids for other values)."""
    shutil.copytree(src, dest)
    s = json.loads((dest / "schema.json").read_text())
    (dest / "vocab").mkdir()
    for c in s["categorical"]:
        c["mode"] = "vocab"
        raw = np.arange(c["num_embeddings"], dtype=np.int64) * 7 + 3
        if c["name"] == shuffle:
            raw = np.random.default_rng(0).permutation(raw)
        pq.write_table(
            pa.table({"raw": raw, "count": np.ones_like(raw)}), dest / "vocab" / f"{c['name']}.parquet"
        )
    s["extra"]["vocab"] = {"dir": "vocab"}
    (dest / "schema.json").write_text(json.dumps(s))
    return dest


@pytest.fixture(scope="module")
def trained(tiny_synth, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pred")
    raw_run = tmp / "raw-run"
    run(
        "quickstart",
        overrides=tiny_overrides(tiny_synth, **{"train.max_steps": 3}),
        run_dir=raw_run,
        quiet=True,
    )
    vdata = _with_vocab(tiny_synth, tmp / "vdata")
    vocab_run = tmp / "vocab-run"
    run(
        "quickstart", overrides=tiny_overrides(vdata, **{"train.max_steps": 3}), run_dir=vocab_run, quiet=True
    )
    return raw_run, vocab_run, vdata


def test_vocabulary_ids_against_a_raw_id_run_are_refused(trained, tiny_synth, tmp_path):
    raw_run, vocab_run, vdata = trained
    with pytest.raises(IncompatibleData, match="feature C1 holds vocab ids, the run was trained on raw ids"):
        predict(raw_run, vdata, tmp_path / "p.parquet")
    with pytest.raises(IncompatibleData, match="feature C1 holds raw ids, the run was trained on vocab ids"):
        predict(vocab_run, tiny_synth, tmp_path / "p.parquet")
    assert not (tmp_path / "p.parquet").exists()


def test_another_num_embeddings_is_refused_naming_the_feature(trained, tiny_synth, tmp_path):
    raw_run, _, _ = trained
    other = tmp_path / "d"
    shutil.copytree(tiny_synth, other)
    _edit_schema(
        other, lambda s: s["categorical"][4].update(num_embeddings=s["categorical"][4]["num_embeddings"] + 9)
    )
    with pytest.raises(IncompatibleData, match="feature C5 has num_embeddings="):
        predict(raw_run, other, tmp_path / "p.parquet")


def test_another_vocabulary_of_the_same_size_is_refused(trained, tiny_synth, tmp_path):
    _, vocab_run, vdata = trained
    same = tmp_path / "same"
    shutil.copytree(vdata, same)
    assert predict(vocab_run, same, tmp_path / "ok.parquet", split="test")["test"]["rows"] > 0
    other = _with_vocab(tiny_synth, tmp_path / "other", shuffle="C7")
    with pytest.raises(IncompatibleData, match="feature C7: its vocabulary differs"):
        predict(vocab_run, other, tmp_path / "p.parquet")
    # A run directory written before the fingerprints were saved: the training data's own are used.
    legacy = tmp_path / "legacy-run"
    shutil.copytree(vocab_run, legacy)
    (legacy / "data_vocab.json").unlink()
    with pytest.raises(IncompatibleData, match="feature C7"):
        predict(legacy, other, tmp_path / "p.parquet")
