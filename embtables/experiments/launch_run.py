"""`embtables run CONFIG --nproc N`: the runner in N local processes, one run directory.

The processes come from :func:`embtables.sharding.launch.launch` (torchrun's environment,
every rank ended at once when one fails); each rank quiets the libraries' logs as the
`embtables` command does in the parent, then runs :func:`embtables.experiments.runner.run`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from embtables.experiments.config import load_config
from embtables.experiments.runner import claim_new_run_dir, new_run_dir, run
from embtables.logs import quiet_libraries
from embtables.sharding.launch import launch


def _run_rank(config, overrides, run_dir, resume, options=None) -> dict[str, Any] | None:
    """One rank's run (module level, so that spawned processes can unpickle it): the
    summary on rank 0, None on the others."""
    quiet_libraries()
    summary = run(config, overrides=overrides, run_dir=run_dir, resume=resume, **(options or {}))
    return summary if int(os.environ.get("RANK", "0")) == 0 else None


def launch_run(config, overrides: list[str] | None, run_dir: str | None, resume: str | None, nproc: int,
               timeout_s: float | None = None, *, overwrite: bool = False, from_run: str | None = None,
               stage: str | None = None) -> int:
    """`embtables run CONFIG --nproc N`: the runner in N local processes, one run directory."""
    if resume is None and run_dir is None:
        # Every rank must write to the same directory: name it once, here.
        run_dir = str(new_run_dir(load_config(config, overrides)))
    if resume is None:
        # Checked once, here, before any rank starts (the ranks then see an empty directory).
        moved = claim_new_run_dir(Path(run_dir), overwrite)
        if moved is not None:
            print(f"== --overwrite: moved the old {run_dir} to {moved}")
    options = {"from_run": from_run, "stage": stage}
    launch(_run_rank, nproc, (config, overrides, run_dir, resume, options), timeout_s=timeout_s)
    return 0
