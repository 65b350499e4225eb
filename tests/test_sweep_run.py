"""`embtables compare` end to end on tiny data: SIGKILL midway and resume (only the
unfinished cells run again), a failed cell recorded with its reason, the report's
table equal to the results file, the plots real images, `embtables report` rebuilding."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import tiny_overrides

from embtables.cli import main as cli_main
from embtables.experiments.sweep import run_sweep
from embtables.experiments.sweep_config import load_sweep

ROOT = Path(__file__).resolve().parents[1]


def _comparison(tmp_path: Path, data: Path, methods: list, budgets: list) -> Path:
    cfg: dict = {"name": "tinycmp"}
    for key, val in tiny_overrides(data, **{"train.epochs": 2}).items():
        node = cfg
        *head, last = key.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = val
    cfg["sweep"] = {"methods": methods, "budgets": budgets, "seeds": [0]}
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _methods() -> list[str]:
    from embtables.embeddings import list_methods

    return ["full", "hash"] if "hash" in list_methods() else ["full", {"method": "full", "label": "full-b"}]


@pytest.fixture(scope="module")
def killed_and_resumed(tiny_synth, tmp_path_factory):
    """Run the sweep as a subprocess, SIGKILL it once the first cell has finished,
    then run it again; returns what each cell looked like at the kill."""
    tmp = tmp_path_factory.mktemp("sweep")
    # 100 bytes is below any method's minimum: that cell must fail and the sweep go on
    cmp_file = _comparison(tmp, tiny_synth, _methods(), [1, "1/4", 100])
    sweep_dir = tmp / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "embtables.cli", "compare", str(cmp_file), "--sweep-dir", str(sweep_dir),
         "--threads", "1", "--quiet"],
        cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    try:
        while not list(sweep_dir.glob("*/summary.json")):
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(
                    f"sweep ended or hung before any cell finished:\n{proc.stdout.read().decode()[-3000:]}"
                )
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep's own process group, started above
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
    at_kill = {
        d.name: ((d / "summary.json").stat().st_mtime_ns if (d / "summary.json").exists() else None)
        for d in sweep_dir.iterdir()
        if d.is_dir()
    }
    # A cell's directory is made just before its status.json: the kill can land in between,
    # so "started" is what status.json recorded, not that the directory exists.
    attempts_at_kill = {
        d.name: json.loads((d / "status.json").read_text()).get("attempts", 0)
        if (d / "status.json").exists()
        else 0
        for d in sweep_dir.iterdir()
        if d.is_dir()
    }
    assert not (sweep_dir / "report.md").exists()
    plan = load_sweep(cmp_file)
    out = run_sweep(plan, sweep_dir, threads=1, progress=False)
    return plan, sweep_dir, at_kill, out, attempts_at_kill


def test_rerun_runs_only_unfinished_cells(killed_and_resumed):
    plan, sweep_dir, at_kill, out, attempts_at_kill = killed_and_resumed
    finished = {k for k, v in at_kill.items() if v is not None}
    runnable = [c for c in plan.cells if c.skip_reason is None]
    assert 1 <= len(finished) < len(runnable), "the kill must leave work for the rerun"
    assert out["ran"] == len(runnable) - len(finished)
    for c in runnable:
        d = sweep_dir / c.cell_id
        st = json.loads((d / "status.json").read_text())
        if c.cell_id in finished:  # not touched again: same summary file, one attempt
            assert (d / "summary.json").stat().st_mtime_ns == at_kill[c.cell_id]
            assert st["attempts"] == 1 and st["status"] == "done"
        else:
            assert st["attempts"] == attempts_at_kill.get(c.cell_id, 0) + 1, (c.cell_id, st)
    df = pd.read_csv(sweep_dir / "results.csv")
    assert sorted(df["cell_id"]) == sorted(c.cell_id for c in plan.cells)
    assert set(df["status"]) <= {"done", "failed", "skipped"}  # nothing pending: the report is complete
    # a second rerun has nothing left to do
    again = run_sweep(plan, sweep_dir, threads=1, progress=False, retry_failed=False)
    assert again["ran"] == 0


def test_failed_cell_has_its_reason_and_the_sweep_went_on(killed_and_resumed):
    plan, sweep_dir, _, out, _ = killed_and_resumed
    df = pd.read_csv(sweep_dir / "results.csv").set_index("cell_id")
    small = [c for c in plan.cells if c.budget.label == "100"]
    compressing = [c for c in small if c.method.name != "full"]
    for c in compressing:
        st = json.loads((sweep_dir / c.cell_id / "status.json").read_text())
        assert st["status"] == "failed" and st["error_type"] == "BudgetTooSmall", st
        assert "below the minimum" in st["error"] and st["min_bytes"] > 100
        assert (sweep_dir / c.cell_id / "error.txt").read_text().startswith("Traceback")
        assert df.loc[c.cell_id, "status"] == "failed" and "minimum" in df.loc[c.cell_id, "error"]
    for c in small:
        if c.method.name == "full":  # by design: not run, shown as n/a
            assert (
                df.loc[c.cell_id, "status"] == "skipped" and "cannot compress" in df.loc[c.cell_id, "error"]
            )
    # cells after the failing ones in plan order still ran
    assert (df["status"] == "done").sum() == len(
        [c for c in plan.cells if c.budget.label != "100" and not c.skip_reason]
    )
    md = Path(out["report"]).read_text()
    assert "failed: budget < minimum" in md and "n/a (cannot compress)" in md


def _auc_table(md: str) -> dict[tuple[str, str], str]:
    lines = md.split("\n## ", 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| method |"))
    budgets = [b.strip() for b in lines[start].strip("|").split("|")][1:]
    out = {}
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        for b, text in zip(budgets, cells[1:], strict=True):
            out[(cells[0], b)] = text
    return out


def test_table_numbers_equal_the_results_file(killed_and_resumed):
    _, sweep_dir, _, out, _ = killed_and_resumed
    df = pd.read_csv(sweep_dir / "results.csv")
    table = _auc_table(Path(out["report"]).read_text())
    done = df[df["status"] == "done"]
    assert len(done) >= 3
    best = done.groupby("budget")["auc"].max()
    for (method, budget), g in done.groupby(["method_label", "budget"]):
        text = table[(method, str(budget))]
        m = re.fullmatch(r"(\*\*)?([0-9.]+)(?: ± ([0-9.]+))?(\*\*)?", text)
        assert m, text
        assert float(m.group(2)) == pytest.approx(g["auc"].mean(), abs=5e-5)
        assert bool(m.group(1)) == (g["auc"].mean() == best[budget])
    # and the summaries agree with the results file
    for _, r in done.iterrows():
        s = json.loads((sweep_dir / r["cell_id"] / "summary.json").read_text())
        assert s["auc"] == pytest.approx(r["auc"]) and s["embedding_bytes"] == r["embedding_bytes"]


def test_plots_are_real_images(killed_and_resumed):
    from PIL import Image

    _, _, _, out, _ = killed_and_resumed
    names = sorted(Path(p).name for p in out["plots"])
    assert names == ["auc_vs_bytes.png", "time_vs_budget.png"]
    for p in out["plots"]:
        assert Path(p).stat().st_size > 10_000
        with Image.open(p) as im:
            assert im.size[0] >= 600 and im.size[1] >= 400
            px = np.asarray(im.convert("L"), dtype=np.float32)
        assert px.std() > 10 and (px < 100).mean() > 0.005  # not blank: lines and text drawn


def test_report_command_rebuilds_from_the_cells(killed_and_resumed, capsys):
    _, sweep_dir, _, out, _ = killed_and_resumed
    before = Path(out["report"]).read_text()
    csv_before = pd.read_csv(sweep_dir / "results.csv")
    for name in (
        "report.md",
        "results.csv",
        "results.parquet",
        "auc_vs_bytes.png",
        "time_vs_budget.png",
        "sweep.json",
    ):
        (sweep_dir / name).unlink()
    assert cli_main(["report", str(sweep_dir), "--quiet"]) == 0
    after = (sweep_dir / "report.md").read_text()
    assert _auc_table(after) == _auc_table(before)
    assert (sweep_dir / "auc_vs_bytes.png").exists() and (sweep_dir / "results.parquet").exists()
    cols = ["cell_id", "status", "auc"]
    pd.testing.assert_frame_equal(
        pd.read_csv(sweep_dir / "results.csv")[cols].sort_values("cell_id").reset_index(drop=True),
        csv_before[cols].sort_values("cell_id").reset_index(drop=True),
    )


@pytest.mark.slow
def test_parallel_jobs_give_the_same_results(killed_and_resumed, tmp_path):
    plan, sweep_dir, _, _, _ = killed_and_resumed
    out = run_sweep(plan, tmp_path / "par", jobs=2, threads=1, progress=False)
    a = pd.read_csv(sweep_dir / "results.csv").set_index("cell_id")
    b = pd.read_csv(out["results_csv"]).set_index("cell_id")
    assert (a["status"] == b.loc[a.index, "status"]).all()
    np.testing.assert_allclose(a["auc"].to_numpy(float), b.loc[a.index, "auc"].to_numpy(float), atol=1e-6)


def test_a_cell_stopped_after_a_checkpoint_resumes_from_it(tiny_synth, tmp_path):
    """Deterministic version of a kill mid-cell: the rerun continues from the checkpoint
    and ends with the metrics of an uninterrupted cell."""
    from embtables.experiments import run

    cmp_file = _comparison(tmp_path, tiny_synth, ["full"], [1])
    cfg = yaml.safe_load(cmp_file.read_text())
    cfg["train"]["eval_every"] = 7
    cmp_file.write_text(yaml.safe_dump(cfg))
    plan = load_sweep(cmp_file)
    (cell,) = plan.cells
    stopped = run(
        cell.config.model_dump(mode="json"),
        run_dir=tmp_path / "a" / cell.cell_id,
        quiet=True,
        stop_after_step=7,
    )
    assert stopped["stopped_at_step"] == 7
    resumed = run_sweep(plan, tmp_path / "a", threads=1, progress=False, report=False)
    straight = run_sweep(plan, tmp_path / "b", threads=1, progress=False, report=False)
    assert resumed["ran"] == straight["ran"] == 1
    st = json.loads((tmp_path / "a" / cell.cell_id / "status.json").read_text())
    assert st["status"] == "done" and st.get("resumed") is True
    a, b = (json.loads((tmp_path / d / cell.cell_id / "summary.json").read_text()) for d in ("a", "b"))
    assert abs(a["test_auc"] - b["test_auc"]) <= 1e-6 and a["steps"] == b["steps"]
