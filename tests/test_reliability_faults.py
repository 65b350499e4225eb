"""The fault-point hook itself: parsing, counting per process, the actions."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest

from embtables import faults


def test_spec_parses_points_actions_and_ranks():
    assert faults.parse("ckpt_write:3", rank=0) == {"ckpt_write": (3, "enospc")}
    assert faults.parse("kill_after_step:5", rank=0) == {"kill_after_step": (5, "kill")}
    assert faults.parse("ckpt_write:2:eio, kill_after_step:4@1", rank=1) == {
        "ckpt_write": (2, "eio"),
        "kill_after_step": (4, "kill"),
    }
    assert faults.parse("kill_after_step:4@1", rank=0) == {}
    assert faults.parse("kill_after_step:2:stall", rank=0) == {"kill_after_step": (2, "stall")}
    for bad in ("ckpt_write", "ckpt_write:0", "ckpt_write:x", "ckpt_write:1:explode"):
        with pytest.raises(faults.FaultSpecError, match="EMBTABLES_FAULT"):
            faults.parse(bad, rank=0)


def test_the_nth_pass_trips_and_no_other(monkeypatch):
    monkeypatch.setenv(faults.ENV, "ckpt_write:3")
    faults.reset()
    faults.hit("ckpt_write", "a")
    faults.hit("other_point")
    faults.hit("ckpt_write", "b")
    with pytest.raises(OSError) as e:
        faults.hit("ckpt_write", "/x/c")
    assert e.value.errno == errno.ENOSPC and e.value.filename == "/x/c"
    faults.hit("ckpt_write", "d")  # tripped once only
    monkeypatch.delenv(faults.ENV)
    for _ in range(5):
        faults.hit("ckpt_write")


def test_kill_action_kills_the_process():
    code = (
        "from embtables import faults\nfor i in range(5):\n"
        "    faults.hit('kill_after_step')\n    print(i, flush=True)\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        env={**__import__("os").environ, faults.ENV: "kill_after_step:2"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == -9 and p.stdout.split() == ["0"]


def test_faults_is_a_leaf_module():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(faults.__file__).read_text())
    names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [n for n in names if n.startswith("embtables")]
