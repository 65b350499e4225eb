"""Kills through fixed fault points (EMBTABLES_FAULT), in `embtables run` and `embtables
compare` subprocesses: after each the tool resumes to the metrics of an uninterrupted run,
or refuses clearly, and nothing that was complete is lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides

from embtables import faults
from embtables.experiments import run
from embtables.experiments.rundir import RunDir
from embtables.experiments.sweep import run_sweep
from embtables.experiments.sweep_config import load_sweep

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"train.max_steps": 12, "train.eval_every": 4}
METRICS = ("valid_auc", "test_auc", "valid_logloss", "test_logloss")


def _env(fault: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop(faults.ENV, None)
    if fault:
        env[faults.ENV] = fault
    return env


def _cli_run(data: Path, run_dir: Path, fault: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "embtables.cli", "run", "quickstart", "--run-dir", str(run_dir)]
    for k, v in tiny_overrides(data, **STEPS).items():
        args += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    return subprocess.run(args, env=_env(fault), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def straight(tiny_synth, tmp_path_factory):
    return run(
        "quickstart",
        overrides=tiny_overrides(tiny_synth, **STEPS),
        run_dir=tmp_path_factory.mktemp("straight") / "r",
        quiet=True,
    )


def _same(a: dict, b: dict) -> None:
    for k in METRICS:
        assert a[k] == pytest.approx(b[k], abs=1e-6), k
    assert a["steps"] == b["steps"]


def test_sigkill_mid_run_then_resume_gives_the_same_metrics(straight, tiny_synth, tmp_path):
    d = tmp_path / "r"
    p = _cli_run(tiny_synth, d, "kill_after_step:10")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert [c.name for c in RunDir(d).checkpoints()] == ["step-00000004", "step-00000008"]
    assert not RunDir(d).is_finished()
    _same(run(None, resume=d, quiet=True), straight)


def test_sigterm_checkpoints_and_exits_resumable(straight, tiny_synth, tmp_path):
    d = tmp_path / "r"
    p = _cli_run(tiny_synth, d, "kill_after_step:6:term")
    assert p.returncode == 143  # 128 + SIGTERM, as a process ended by it
    assert f"stopped by SIGTERM after a checkpoint; continue with: embtables run --resume {d}" in p.stderr
    assert "Traceback" not in p.stderr
    assert RunDir(d).latest_checkpoint().name == "step-00000006"  # the step it was told at, not step 4
    _same(run(None, resume=d, quiet=True), straight)


def test_ctrl_c_says_how_to_resume(straight, tiny_synth, tmp_path):
    d = tmp_path / "r"
    p = _cli_run(tiny_synth, d, "kill_after_step:6:int")
    assert p.returncode == 130
    assert "Ctrl-C: stopping after this step with a checkpoint" in p.stderr
    assert f"embtables run --resume {d}" in p.stderr
    _same(run(None, resume=d, quiet=True), straight)


def test_a_truncated_parquet_part_is_refused_naming_it_before_anything_is_written(tiny_synth, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_synth, data)
    from embtables.datasets.schema import load_schema

    part = load_schema(data).files(data, "valid")[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{part}: not a readable Parquet file"):
        run("quickstart", overrides=tiny_overrides(data, **STEPS), run_dir=tmp_path / "r", quiet=True)
    assert not (tmp_path / "r").exists()


# ---- compare -----------------------------------------------------------------------------------


def _comparison(tmp_path: Path, data: Path) -> Path:
    cfg: dict = {"name": "killcmp"}
    # Long enough cells (7 epochs of 18 steps) for the kill to land while both run.
    for key, val in tiny_overrides(
        data, **{"train.epochs": 7, "train.max_steps": 120, "train.eval_every": 20}
    ).items():
        node = cfg
        *head, last = key.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = val
    cfg["sweep"] = {"methods": ["full", "hash"], "budgets": [1], "seeds": [0]}
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.fixture(scope="module")
def reference_sweep(tiny_synth, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmpref")
    plan = load_sweep(_comparison(tmp, tiny_synth))
    out = run_sweep(plan, tmp / "out", threads=1, progress=False, report=False)
    assert out["done"] == 2
    return {c.cell_id: json.loads((tmp / "out" / c.cell_id / "summary.json").read_text()) for c in plan.cells}


@pytest.mark.parametrize(
    "sig", [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)], ids=["SIGKILL", "SIGTERM"]
)
def test_killing_compare_ends_its_workers_and_the_rerun_completes(reference_sweep, tiny_synth, tmp_path, sig):
    cmp_file = _comparison(tmp_path, tiny_synth)
    sweep_dir = tmp_path / "out"
    log = tmp_path / "compare.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embtables.cli",
            "compare",
            str(cmp_file),
            "--sweep-dir",
            str(sweep_dir),
            "--jobs",
            "2",
            "--threads",
            "1",
            "--quiet",
        ],
        # Every cell stalls 8 s at step 25 (after its step-20 checkpoint): the kill lands while
        # both run, whatever the machine's speed.
        env={**_env("kill_after_step:25:stall"), "EMBTABLES_FAULT_STALL_S": "8"},
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    deadline = time.time() + 240
    workers: set[int] = set()
    try:
        # Kill once both cells run in workers and both have a checkpoint to go on from.
        while True:
            st = [json.loads(p.read_text()) for p in sweep_dir.glob("*/status.json")]
            workers = {s["pid"] for s in st if s.get("status") == "running"}
            ready = list(sweep_dir.glob("*/checkpoints/step-00000020/manifest.json"))
            if len(workers) == 2 and len(ready) == 2:
                break
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"compare ended or hung before the kill: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        proc.send_signal(sig)  # to the sweep only: its workers must notice (SIGKILL) or be told (SIGTERM)
    finally:
        proc.wait(timeout=90)
    if sig == signal.SIGTERM:
        assert proc.returncode != 0 and "run the same command again to continue" in log.read_text()
    t0 = time.time()
    while any(_alive(w) for w in workers) and time.time() - t0 < 60:
        time.sleep(0.2)
    left = [w for w in workers if _alive(w)]
    assert not left, (
        "workers of a killed compare are still running",
        [Path(f"/proc/{w}/status").read_text()[:300] for w in left],
        [p.read_text() for p in sweep_dir.glob("*/status.json")],
    )
    statuses = [json.loads(p.read_text())["status"] for p in sweep_dir.glob("*/status.json")]
    assert statuses == ["interrupted"] * 2  # each worker checkpointed and recorded itself on its way out
    for cell in sweep_dir.glob("*/cell.json"):  # ... after a checkpoint at the step it was told at
        assert RunDir(cell.parent).latest_checkpoint().name > "step-00000020"
    plan = load_sweep(cmp_file)
    out = run_sweep(plan, sweep_dir, threads=1, progress=False, report=False)
    assert out["done"] + out["already_finished"] == 2 and out["failed"] == 0
    for cell_id, ref in reference_sweep.items():
        got = json.loads((sweep_dir / cell_id / "summary.json").read_text())
        _same(got, ref)


def test_a_cell_held_by_a_live_process_is_not_run_again(tiny_synth, tmp_path):
    cmp_file = _comparison(tmp_path, tiny_synth)
    plan = load_sweep(cmp_file)
    held = plan.cells[0]
    cdir = tmp_path / "out" / held.cell_id
    code = (
        "import time\nfrom embtables.experiments.rundir import RunDir\n"
        f"with RunDir({str(cdir)!r}).lock():\n    print('held', flush=True)\n    time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        out = run_sweep(plan, tmp_path / "out", threads=1, progress=False, report=False)
        assert out["busy"] == 1 and out["done"] == 1
        assert not (cdir / "summary.json").exists() and not (cdir / "status.json").exists()
    finally:
        holder.kill()
        holder.wait()
    out = run_sweep(plan, tmp_path / "out", threads=1, progress=False, report=False)
    assert out["done"] == 1 and out["already_finished"] == 1 and RunDir(cdir).is_finished()


def test_a_half_written_summary_does_not_make_a_cell_finished(tiny_synth, tmp_path):
    cmp_file = _comparison(tmp_path, tiny_synth)
    plan = load_sweep(cmp_file)
    cell = plan.cells[0]
    cdir = tmp_path / "out" / cell.cell_id
    cdir.mkdir(parents=True)
    (cdir / "summary.json").write_text('{"name": "killcmp", "auc": 0.')  # what a non-atomic writer leaves
    out = run_sweep(plan, tmp_path / "out", threads=1, progress=False, report=False)
    assert out["done"] == 2 and out["already_finished"] == 0
    assert RunDir(cdir).is_finished() and json.loads((cdir / "summary.json").read_text())["steps"] == 120
