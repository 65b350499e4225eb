"""JSON files that readers may look at while they are being written (run summaries, sweep
cell status): written atomically, read as None when absent or unreadable."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_json(path: Path, obj: Any, *, default: Callable[[Any], Any] | None = None) -> None:
    """Atomic: a reader (or a killed writer) never sees half a file. A sweep takes a cell
    whose summary.json exists as finished, so that file must never exist half-written.
    ``default`` as in :func:`json.dumps` (None: a value JSON cannot hold is an error)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=default) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
