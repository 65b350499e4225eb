"""RunDir and the runner's use of it: a run directory is never reused by accident,
--resume never changes results, --from branches into a new directory, and the stage
pipeline comes from a registry (no method named in the runner or the sweep)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_overrides

from embtables.experiments import run
from embtables.experiments.config import ConfigError
from embtables.experiments.rundir import RunDir, RunDirBusy, RunDirError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished(tiny_synth, tmp_path_factory):
    d = tmp_path_factory.mktemp("rd") / "run"
    s = run(
        "quickstart",
        overrides=tiny_overrides(tiny_synth, **{"train.max_steps": 12, "train.eval_every": 4}),
        run_dir=d,
        quiet=True,
    )
    return d, s


def _snapshot(d: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(d)): p.read_bytes()
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_an_existing_run_dir_is_refused_naming_resume(finished, tiny_synth):
    d, _ = finished
    before = _snapshot(d)
    with pytest.raises(RunDirError, match=r"--resume") as e:
        run(
            "quickstart",
            overrides=tiny_overrides(tiny_synth, **{"train.max_steps": 2}),
            run_dir=d,
            quiet=True,
        )
    assert str(d) in str(e.value) and "--overwrite" in str(e.value)
    assert _snapshot(d) == before  # not one byte changed


def test_overwrite_moves_the_old_run_aside(tiny_synth, tmp_path):
    d = tmp_path / "r"
    o = tiny_overrides(tiny_synth, **{"train.max_steps": 2})
    run("quickstart", overrides=o, run_dir=d, quiet=True)
    before = _snapshot(d)
    s = run("quickstart", overrides={**o, "train.max_steps": 3}, run_dir=d, quiet=True, overwrite=True)
    (old,) = [p for p in tmp_path.iterdir() if p.name.startswith("r.old-")]
    assert _snapshot(old) == before and s["steps"] == 3
    assert json.loads((d / "summary.json").read_text())["steps"] == 3


def test_resume_refuses_a_result_changing_set_and_names_the_keys(finished):
    d, _ = finished
    before = _snapshot(d)
    with pytest.raises(ConfigError) as e:
        run(None, resume=d, overrides=["train.batch_size=512", "seed=3", "train.threads=1"], quiet=True)
    msg = str(e.value)
    assert "train.batch_size" in msg and "seed" in msg and "--from" in msg
    assert (
        "train.threads," not in msg.split("would change")[1].split("which")[0]
    )  # a neutral key is not blamed
    assert _snapshot(d) == before


def test_resume_of_a_finished_run_changes_nothing(finished):
    d, s = finished
    before = _snapshot(d)
    again = run(None, resume=d, overrides=["train.threads=1", "train.progress=false"], quiet=True)
    assert again == s and _snapshot(d) == before


def test_resume_allows_result_neutral_settings(tiny_synth, tmp_path):
    o = tiny_overrides(tiny_synth, **{"train.max_steps": 12, "train.eval_every": 4})
    full = run("quickstart", overrides=o, run_dir=tmp_path / "a", quiet=True)
    run("quickstart", overrides=o, run_dir=tmp_path / "b", quiet=True, stop_after_step=4)
    s = run(None, resume=tmp_path / "b", overrides=["train.log_every=7", "train.progress=false"], quiet=True)
    assert s["test_auc"] == pytest.approx(full["test_auc"], abs=1e-6) and s["steps"] == 12


def test_rundir_states(tmp_path):
    rd = RunDir(tmp_path / "x")
    assert rd.is_empty() and not rd.is_finished()
    rd.create()
    rd.write_config("name: x\n")
    rd.summary_path.write_text('{"auc": 0.7, "config_h')  # cut mid-write (not through RunDir)
    assert not rd.is_finished()
    rd.summary_path.write_text("[0.7]")  # not a run summary
    assert not rd.is_finished()
    rd.write_summary({"auc": 0.7, "config_hash": "abc"})
    assert rd.is_finished() and rd.summary()["auc"] == 0.7
    for step in (4, 8, 12, 16):
        p = rd.checkpoint_path(step)
        p.mkdir(parents=True)
        (p / "checkpoint.json").write_text("{}")
    (rd.checkpoint_root / ".step-00000020.partial").mkdir()
    (rd.checkpoint_root / "step-00000024").mkdir()  # no checkpoint.json: not complete
    assert [p.name for p in rd.checkpoints()] == [f"step-{s:08d}" for s in (4, 8, 12, 16)]
    rd.prune()
    assert [p.name for p in rd.checkpoints()] == ["step-00000012", "step-00000016"]
    rd.metrics_path.write_text('{"step": 4}\n{"step": 8}\n{"step": 12}\n{"st')
    rd.truncate_metrics(8)
    assert rd.metrics_path.read_text() == '{"step": 4}\n{"step": 8}\n'


def test_the_lock_keeps_out_a_second_process(tmp_path):
    rd = RunDir(tmp_path / "x")
    code = (
        "import sys, time\nfrom embtables.experiments.rundir import RunDir\n"
        f"with RunDir({str(rd.path)!r}).lock():\n    print('held', flush=True)\n    time.sleep(60)\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert p.stdout.readline().strip() == "held"
        assert f"pid {p.pid}" in (rd.held_by_other() or "")
        with pytest.raises(RunDirBusy, match=f"in use by pid {p.pid}"):
            with rd.lock():
                pass
    finally:
        p.kill()
        p.wait()
    assert rd.held_by_other() is None  # the kernel released it with the process
    with rd.lock(), rd.lock():  # re-entrant in one process
        assert rd.held_by_other() is None


def test_pipelines_come_from_the_registry_and_runner_and_sweep_name_no_method():
    from embtables.experiments.config import load_config
    from embtables.experiments.stages import TrainStage, pipeline_for

    assert [type(s) for s in pipeline_for(load_config("quickstart"))] == [TrainStage]
    oe = load_config("quickstart", {"embedding.method": "optembed"})
    assert [s.name for s in pipeline_for(oe)] == ["supernet", "search", "retrain"]
    from embtables.embeddings import list_methods

    methods = set(list_methods())
    for name in ("runner.py", "sweep.py", "stages.py", "rundir.py"):
        tree = ast.parse((ROOT / "embtables" / "experiments" / name).read_text())
        consts = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not consts & methods, (name, consts & methods)


# ---- --from RUN --stage S (OptEmbed: reuse a supernet under another budget) -----------------------


def _oe_config(data):
    from test_optembed_pipeline import config

    return config(data)


@pytest.fixture(scope="module")
def optembed_run(tiny_synth, tmp_path_factory):
    d = tmp_path_factory.mktemp("oe") / "base"
    cfg = _oe_config(tiny_synth)
    s = run(cfg, run_dir=d, quiet=True)
    return d, cfg, s


def test_from_stage_starts_a_new_run_dir_reusing_the_supernet(optembed_run, tiny_synth, tmp_path):
    src, _, base = optembed_run
    before = _snapshot(src)
    budget = int(base["embedding_bytes"] * 0.9)  # below what the unbudgeted search chose
    new = tmp_path / "branch"
    s = run(
        None, overrides={"embedding.budget": budget}, run_dir=new, quiet=True, from_run=src, stage="search"
    )
    assert _snapshot(src) == before  # the source run is only read
    done_src = json.loads((src / "optembed/supernet/done.json").read_text())
    done_new = json.loads((new / "optembed/supernet/done.json").read_text())
    assert done_new == done_src  # the supernet was copied, not trained again
    assert (new / "optembed/supernet/metrics.jsonl").read_bytes() == (
        src / "optembed/supernet/metrics.jsonl"
    ).read_bytes()
    assert s["embedding_bytes"] <= budget and s["optembed"]["budget_bytes"] == budget
    assert s["optembed"]["thresholds"] == base["optembed"]["thresholds"]


def test_from_stage_refuses_when_the_reused_stage_would_differ(optembed_run, tmp_path):
    src, _, _ = optembed_run
    with pytest.raises(ConfigError, match=r"stage 'supernet'.*seed"):
        run(None, overrides={"seed": 5}, run_dir=tmp_path / "b", quiet=True, from_run=src, stage="search")
    with pytest.raises(ConfigError, match="stages are supernet, search, retrain"):
        run(None, run_dir=tmp_path / "c", quiet=True, from_run=src, stage="nope")
    with pytest.raises(ConfigError, match="--stage needs --from"):
        run("quickstart", run_dir=tmp_path / "d", quiet=True, stage="search")
    assert not (tmp_path / "b" / "summary.json").exists()


def test_from_stage_retrain_reuses_a_finished_runs_search(optembed_run, tmp_path):
    # The finished run's config.yaml names its exported table; that must not count as a change
    # of the search's settings.
    src, cfg, base = optembed_run
    new = tmp_path / "retrain"
    s = run(cfg, run_dir=new, quiet=True, from_run=src, stage="retrain")
    assert (new / "optembed/arch.pt").read_bytes() == (src / "optembed/arch.pt").read_bytes()
    assert s["optembed"]["search_evaluations"] == base["optembed"]["search_evaluations"]
    assert s["embedding_bytes"] == base["embedding_bytes"]
    assert s["auc"] == pytest.approx(base["auc"], abs=1e-6)  # the same retrain, from the same search
