"""docs/torchrec.md's support table is what the methods declare (capabilities()), so it
cannot drift from the code the conformance suite checks."""

from __future__ import annotations

from pathlib import Path

from embtables.embeddings import list_methods
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
