"""The layout of a comparison directory, which the sweep writes and the report reads.

``<sweep_dir>/sweep.json`` is the plan; each cell is an ordinary run directory
``<sweep_dir>/<cell-id>/`` plus the sweep's own records in it: ``cell.json`` (what the cell
is), ``status.json`` (how its last attempt went) and ``error.txt`` (the traceback of a
failed attempt).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from embtables.experiments import jsonfile
from embtables.experiments.jsonfile import read_json
from embtables.experiments.rundir import RunDir

PLAN_FILE = "sweep.json"
CELL_FILE = "cell.json"
STATUS_FILE = "status.json"
# The status text of a cell outside its method entry's `budgets:` (the report keys on it).
SKIP_NOT_LISTED = "not run: not one of this method's budgets"
SUMMARY_FILE = "summary.json"
ERROR_FILE = "error.txt"
# Sweep records (cell metadata, knobs, statuses) may hold values JSON has no type for: they
# are written as their str().
write_json = partial(jsonfile.write_json, default=str)


def cell_state(cell_dir: Path) -> str:
    """done | failed | skipped | running | pending (from the files alone)."""
    if RunDir(cell_dir).is_finished():
        return "done"
    st = read_json(cell_dir / STATUS_FILE)
    return st["status"] if st and st.get("status") in ("failed", "skipped", "running") else "pending"
