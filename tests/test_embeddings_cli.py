"""`embtables plan`: sizes from a dataset's schema.json without building tables."""

from __future__ import annotations

import re

import pytest

from embtables.cli import main
from embtables.datasets.schema import CategoricalFeature, DatasetSchema


@pytest.fixture
def data_dir(tmp_path):
    cats = [CategoricalFeature(f"C{i}", n, num_embeddings=n) for i, n in enumerate([3, 150, 4000, 200_000])]
    DatasetSchema(name="t", dense=["I1"], categorical=cats).save(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("method", "knobs"), [("hash", []), ("qr", ["--knob", "operation=concat"]),
                                               ("unified", ["--knob", "probes=2"]), ("mch", [])])
def test_plan_prints_sizes_within_budget(data_dir, capsys, method, knobs):
    assert main(["size", str(data_dir), "--method", method, "--budget", "0.1", *knobs]) == 0
    out = capsys.readouterr().out
    total = int(re.search(r"\(([\d,]+) bytes\)", out).group(1).replace(",", ""))
    assert 0.5 * 0.1 * 204_153 * 16 * 4 < total <= 0.1 * 204_153 * 16 * 4
    if method != "unified":
        assert "C3" in out


def test_size_rejects_unknown_knob(data_dir, capsys):
    assert main(["size", str(data_dir), "--method", "hash", "--knob", "bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "valid knobs: rows" in err and "Traceback" not in err
