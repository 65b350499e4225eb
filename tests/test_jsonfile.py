"""Run summaries and sweep status files are replaced whole or not at all."""

from __future__ import annotations

import pytest

from embtables.experiments.jsonfile import read_json, write_json


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("cannot serialise")


def test_a_failed_write_leaves_the_previous_file_whole_and_no_temporary(tmp_path):
    p = tmp_path / "summary.json"
    write_json(p, {"auc": 0.5})
    with pytest.raises(RuntimeError, match="cannot serialise"):
        write_json(p, {"auc": _Unprintable()}, default=str)
    with pytest.raises(TypeError, match="not JSON serializable"):  # strict unless told otherwise
        write_json(p, {"auc": _Unprintable()})
    assert read_json(p) == {"auc": 0.5}
    assert [f.name for f in tmp_path.iterdir()] == ["summary.json"]


def test_read_json_is_none_for_missing_or_half_written_files(tmp_path):
    assert read_json(tmp_path / "absent.json") is None
    (tmp_path / "half.json").write_text('{"auc": 0.')
    assert read_json(tmp_path / "half.json") is None
