"""Assemble README.md from docs/readme/*.md and the generated YAML reference.

    python docs/build_readme.py
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["00-intro.md", "methods.md", "data.md", "experiments.md", "@yaml", "sequences.md", "optembed.md",
         "compare.md", "sharding.md", "benchmarks.md", "design.md", "development.md"]


def yaml_reference() -> str:
    import sys

    sys.path.insert(0, str(ROOT / "docs"))
    import yaml_reference as ref

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ref.main()
    return buf.getvalue()


def build() -> str:
    chunks = []
    for part in PARTS:
        if part == "@yaml":
            chunks.append(yaml_reference())
        else:
            chunks.append((ROOT / "docs" / "readme" / part).read_text().rstrip() + "\n")
    return "\n".join(chunks)


if __name__ == "__main__":
    (ROOT / "README.md").write_text(build())
    print(f"wrote {ROOT / 'README.md'}")
