"""`--help` and `doctor` with FBGEMM failing to load or absent: the parser imports neither
torch nor torchrec (subcommands import their implementation only when they run). Each case
runs in a fresh interpreter with a stand-in `fbgemm_gpu` package first on the path whose
import fails the way a broken install fails. (How long `--help` takes: bench/bench_cli.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BROKEN = {
    "fails-to-load": 'raise OSError("libfbgemm_gpu_py.so: undefined symbol: _ZN3c10 (a broken build)")',
    "absent": 'raise ModuleNotFoundError("No module named \'fbgemm_gpu\'", name="fbgemm_gpu")',
}

# Runs `embtables ARGS --help` for every command and subcommand in one interpreter, and
# reports which heavy modules got imported.
PROBE = r"""
import argparse, contextlib, io, json, sys
from embtables.cli import build_parser, main

def commands(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from commands(sub, prefix + (name,))

paths = [()] + list(commands(build_parser()))
codes = {}
for path in paths:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main([*path, "--help"])
        except SystemExit as e:
            codes[" ".join(path)] = (e.code, len(out.getvalue()))
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "torchrec", "fbgemm_gpu"})
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def _env(tmp_path: Path, case: str) -> dict[str, str]:
    shim = tmp_path / "shim" / "fbgemm_gpu"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(BROKEN[case] + "\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "shim"), str(ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_every_help_works_without_fbgemm_and_imports_no_torch(tmp_path, case):
    env = _env(tmp_path, case)
    # the stand-in really breaks the import, as a broken FBGEMM install does
    broken = subprocess.run([sys.executable, "-c", "import fbgemm_gpu"], env=env, capture_output=True,
                            text=True)
    assert broken.returncode != 0 and ("OSError" in broken.stderr or "ModuleNotFoundError" in broken.stderr)

    r = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    codes = report["codes"]
    # every command and subcommand printed its help and exited 0
    for cmd in ("", "run", "predict", "doctor", "list", "data", "data criteo", "data behavior", "size",
                "plan", "compare"):
        assert cmd in codes, sorted(codes)
    assert all(code == 0 and size > 50 for code, size in codes.values()), codes
    assert report["heavy"] == [], f"--help imported {report['heavy']}"


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_doctor_diagnoses_a_broken_fbgemm_instead_of_crashing(tmp_path, case):
    env = _env(tmp_path, case)
    r = subprocess.run([sys.executable, "-m", "embtables.cli", "doctor"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr  # problems found, reported, not a crash
    assert "Traceback" not in r.stdout + r.stderr
    assert "fbgemm_gpu  FAILED TO LOAD" in r.stdout
    assert "FBGEMM does not load" in r.stdout
    assert "torch       2." in r.stdout  # torch itself still loads and is reported


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_command_that_needs_fbgemm_says_so_in_one_line(tmp_path, case):
    r = subprocess.run([sys.executable, "-m", "embtables.cli", "list"], env=_env(tmp_path, case),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    first = r.stderr.splitlines()[0]
    assert first.startswith("error: FBGEMM does not load (") and "`embtables doctor`" in first, r.stderr
    assert "Traceback" not in r.stderr
