"""How long `embtables --help` (and a few subcommands' --help) takes, in fresh interpreters.

    python bench/bench_cli.py [--repeat R]

Each command runs R times (default 5) as `python -m embtables.cli ... --help`; the table
shows the median and best wall time and whether torch got imported (it must not: building
the parser loads no torch, torchrec or FBGEMM). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [[], ["run"], ["data", "criteo"], ["size"], ["plan"], ["compare"]]
PROBE = ("import sys, runpy; sys.argv = ['embtables', *sys.argv[1:], '--help']\n"
         "try:\n    runpy.run_module('embtables.cli', run_name='__main__')\n"
         "except SystemExit:\n    pass\n"
         "sys.stderr.write('torch imported\\n' if 'torch' in sys.modules else 'no torch\\n')\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    print(f"python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}\n")
    print("| command | median s | best s | torch imported |\n| --- | ---: | ---: | --- |")
    for cmd in COMMANDS:
        times, torch_seen = [], False
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", PROBE, *cmd], env=env, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            torch_seen |= "torch imported" in r.stderr
        name = " ".join(["embtables", *cmd, "--help"])
        seen = "yes" if torch_seen else "no"
        print(f"| `{name}` | {statistics.median(times):.3f} | {min(times):.3f} | {seen} |")


if __name__ == "__main__":
    main()
