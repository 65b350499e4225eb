"""docs/torchrec.md's support table is what the methods declare (capabilities()), so it
cannot drift from the code the conformance suite checks; and each claim it makes is a case
the conformance suite runs (test_conformance_dist.py's case lists), so the suite checks the
table row by row."""

from __future__ import annotations

from pathlib import Path

import pytest
from conformance_testing import BUILD_KNOBS, build_conf
from test_conformance_dist import CASES as DIST_CASES
from test_conformance_dist import SLOW_CASES

from embtables.embeddings import get_method, list_methods
from embtables.embeddings.registry import support_table

PAGE = Path(__file__).resolve().parents[1] / "docs" / "torchrec.md"


def test_support_table_in_docs_is_generated_from_the_declarations():
    text = PAGE.read_text()
    start, end = "<!-- support-table:start -->\n", "<!-- support-table:end -->"
    assert start in text and end in text
    table = text[text.index(start) + len(start):text.index(end)]
    assert table == support_table(), \
        "docs/torchrec.md is stale: paste registry.support_table() between the markers"
    for name in list_methods():
        assert f"| `{name}` |" in table


# ---- every claim of the table is a case the conformance suite runs -----------------------
COLUMNS = ["method", "pooled", "sequence", "weighted", "types", "pipelined", "multi-rank", "fx", "export",
           "ids"]


def _rows() -> dict[str, dict[str, str]]:
    text = PAGE.read_text()
    start, end = "<!-- support-table:start -->\n", "<!-- support-table:end -->"
    lines = text[text.index(start) + len(start):text.index(end)].strip().splitlines()[2:]
    rows = {}
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        row = dict(zip(COLUMNS, cells, strict=True))
        rows[row["method"].strip("`")] = row
    return rows


@pytest.mark.parametrize("name", list_methods())
def test_each_claim_of_the_support_table_is_exercised_by_the_conformance_suite(name):
    row, spec = _rows()[name], (name, {})
    c = get_method(name).capabilities()
    mine = [case for case in DIST_CASES
            if len(case) > 2 and isinstance(case[2], tuple) and case[2][0] == name]
    # sharding types: the cell lists exactly the types the multi-rank suite forces for the
    # method's default build (rotating in the default run, every one in the slow run)
    for sequence, cell in zip((False, True), row["types"].split("; "), strict=True):
        supported = c.sequence if sequence else c.pooled
        if cell == "-":
            assert not supported
        elif cell == "data-parallel (no tables)":
            assert supported and build_conf(spec, sequence).table_kind() is None
        elif cell.startswith("see the method's docs"):
            # the table's generator builds without knobs; the suite builds with BUILD_KNOBS
            assert name in BUILD_KNOBS
        else:
            assert cell.split(", ") == list(build_conf(spec, sequence).sharding_types("cpu"))
            forced = {case[5] for case in SLOW_CASES + DIST_CASES
                      if case[0] == "dmp" and case[2] == spec and case[3] is sequence and case[5]}
            assert forced >= set(cell.split(", ")), (cell, forced)
    # multi-rank: 2-rank cases under stock DMP, or the refusal on 2 ranks
    two_rank = [case for case in mine if case[0] == "dmp" and case[1] == 2]
    if row["multi-rank"] == "yes":
        assert two_rank
    else:
        assert not two_rank and ("refusal", 2, f"{name}-multi-rank") in DIST_CASES
    # pipelined: a TrainPipelineSparseDist case, whose test asserts the tables were pipelined
    if row["pipelined"] == "yes":
        assert c.pipelined and any(case[0] == "pipeline" and case[3] == "sparse" for case in mine)
    assert row["pipelined"] == ("yes" if c.pipelined else "no")
    # fx and export: test_conformance.py traces / exports every supported face, or asserts
    # the refusal, by these same flags
    assert row["fx"] == ("yes" if c.fx_traceable else "no")
    assert row["export"] == ("yes" if c.exportable else "no")
