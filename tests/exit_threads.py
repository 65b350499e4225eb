"""Runs a script as ``__main__`` (``python exit_threads.py SCRIPT ARGS...``, under
torch.distributed.run like the script itself), then prints the native threads this
process still has once the script's main() has returned, as ``exit threads: [...]``
(Linux: /proc/self/task). A process-group thread still alive there is torn down while the
interpreter exits, which can abort the process."""

from __future__ import annotations

import os
import runpy
import sys


def native_threads() -> list[str]:
    names = []
    for t in sorted(os.listdir("/proc/self/task")):
        with open(f"/proc/self/task/{t}/comm") as f:
            names.append(f.read().strip())
    return names


if __name__ == "__main__":
    script, *args = sys.argv[1:]
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
    sys.stdout.flush()
    # One write, so that the two ranks' lines never interleave.
    os.write(1, f"rank {os.environ.get('RANK')} exit threads: {native_threads()}\n".encode())
