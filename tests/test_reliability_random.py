"""A seeded random-kill loop (slow, run by hand): `embtables run` killed at a random step
(SIGKILL, SIGTERM or Ctrl-C) or failing at a random checkpoint file write (ENOSPC), then
`--resume`; every case must end with the metrics of an uninterrupted run.

    EMBTABLES_RANDOM_CASES=30 python -m pytest tests/test_reliability_random.py -m slow -s
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_overrides

from embtables import faults
from embtables.experiments import run

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"train.epochs": 2, "train.max_steps": 30, "train.eval_every": 4}  # 18 steps an epoch
METRICS = ("valid_auc", "test_auc", "valid_logloss", "test_logloss")


@pytest.mark.slow
def test_random_kills_and_full_disks_always_resume_to_the_same_metrics(tiny_synth, tmp_path):
    straight = run(
        "quickstart", overrides=tiny_overrides(tiny_synth, **STEPS), run_dir=tmp_path / "straight", quiet=True
    )
    rng = random.Random(int(os.environ.get("EMBTABLES_RANDOM_SEED", "0")))
    cases = int(os.environ.get("EMBTABLES_RANDOM_CASES", "20"))
    tried, survived, outcomes = 0, 0, []
    for i in range(cases):
        kind = rng.choice(["kill", "term", "int", "enospc"])
        # 8 checkpoints (steps 4, 8, ..., 28, 30) of 6 files each: writes 1..48
        fault = (
            f"kill_after_step:{rng.randint(1, 29)}:{kind}"
            if kind != "enospc"
            else f"ckpt_write:{rng.randint(1, 48)}"
        )
        d = tmp_path / f"case{i}"
        args = [sys.executable, "-m", "embtables.cli", "run", "quickstart", "--run-dir", str(d)]
        for k, v in tiny_overrides(tiny_synth, **STEPS).items():
            args += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", faults.ENV: fault}
        p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
        tried += 1
        ok = p.returncode != 0
        if ok:
            s = run(None, resume=d, quiet=True) if (d / "config.yaml").exists() else None
            ok = s is not None and all(abs(s[k] - straight[k]) <= 1e-6 for k in METRICS)
        survived += ok
        outcomes.append((fault, p.returncode, ok))
    print(f"\nrandom faults: {tried} tried, {survived} survived (resumed to the uninterrupted metrics)")
    for o in outcomes:
        print("  ", *o)
    assert survived == tried, [o for o in outcomes if not o[2]]
