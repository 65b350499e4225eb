"""Checkpoints that are damaged, partial or cannot be written: a clear error naming the
file, --resume falls back to the older sound checkpoint, a full disk leaves no partial
step and loses nothing that was complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_overrides

from embtables import faults
from embtables.experiments import run
from embtables.experiments.predict import predict
from embtables.experiments.rundir import RunDir
from embtables.sharding.checkpoint import MANIFEST, CheckpointDiskFull, CheckpointError, CheckpointWarning

# 12 steps of 256 rows, a checkpoint every 4 steps: step-4, step-8, step-12 (final).
STEPS = {"train.max_steps": 12, "train.eval_every": 4}
METRICS = ("valid_auc", "test_auc", "valid_logloss", "test_logloss")


@pytest.fixture(scope="module")
def straight(tiny_synth, tmp_path_factory):
    d = tmp_path_factory.mktemp("straight") / "r"
    return run("quickstart", overrides=tiny_overrides(tiny_synth, **STEPS), run_dir=d, quiet=True), d


def _same_metrics(a: dict, b: dict) -> None:
    for k in METRICS:
        assert a[k] == pytest.approx(b[k], abs=1e-6), k
    assert a["steps"] == b["steps"]


def _flip(path: Path, n: int = 2000) -> None:
    b = bytearray(path.read_bytes())
    start = len(b) // 3
    for i in range(start, min(len(b), start + n)):
        b[i] ^= 0xFF
    path.write_bytes(bytes(b))


def _distcp(ck: Path) -> Path:
    return max(ck.glob("*.distcp"), key=lambda p: p.stat().st_size)


def test_two_complete_checkpoints_with_manifests_are_kept(straight):
    _, d = straight
    cks = RunDir(d).checkpoints()
    assert [c.name for c in cks] == ["step-00000008", "step-00000012"]
    for ck in cks:
        files = json.loads((ck / MANIFEST).read_text())["files"]
        on_disk = {p.name for p in ck.iterdir()} - {MANIFEST}
        assert set(files) == on_disk and all(v["bytes"] == (ck / k).stat().st_size for k, v in files.items())
    assert not list((d / "checkpoints").glob(".*"))  # no partial save left


def test_flipped_bytes_are_a_clear_error_naming_the_file(straight, tiny_synth, tmp_path):
    _, src = straight
    d = tmp_path / "r"
    shutil.copytree(src, d)
    summary = (d / "summary.json").read_bytes()
    target = _distcp(RunDir(d).latest_checkpoint())
    _flip(target)
    with pytest.raises(CheckpointError, match=f"{target}.*corrupted"):
        predict(d, tiny_synth, tmp_path / "p.parquet")
    assert not (tmp_path / "p.parquet").exists() and (d / "summary.json").read_bytes() == summary


def test_a_truncated_file_is_named(straight, tiny_synth, tmp_path):
    _, src = straight
    d = tmp_path / "r"
    shutil.copytree(src, d)
    target = RunDir(d).latest_checkpoint() / "extra-rank0.pt"
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{target}: 100 bytes, the manifest says"):
        predict(d, tiny_synth, tmp_path / "p.parquet")


def test_resume_falls_back_to_the_older_checkpoint_and_says_so(straight, tiny_synth, tmp_path, capsys):
    full, _ = straight
    d = tmp_path / "r"
    o = tiny_overrides(tiny_synth, **{**STEPS, "train.max_steps": 16})  # checkpoints 4, 8, 12; stop at 12
    ref = run("quickstart", overrides=o, run_dir=tmp_path / "ref", quiet=True)
    run("quickstart", overrides=o, run_dir=d, quiet=True, stop_after_step=12)
    cks = RunDir(d).checkpoints()
    assert [c.name for c in cks] == ["step-00000008", "step-00000012"]
    _flip(_distcp(cks[-1]))
    capsys.readouterr()
    s = run(None, resume=d, overrides=["train.progress=false"])
    out = capsys.readouterr().out
    assert "step-00000012 failed its check" in out and "resumed from" in out and "step-00000008" in out
    _same_metrics(s, ref)
    steps = [json.loads(x)["step"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12, 16]  # step 12's record, written after the fallback point, redone once


def test_resume_refuses_when_no_checkpoint_is_sound(tiny_synth, tmp_path):
    d = tmp_path / "r"
    run(
        "quickstart",
        overrides=tiny_overrides(tiny_synth, **{**STEPS, "train.max_steps": 16}),
        run_dir=d,
        quiet=True,
        stop_after_step=12,
    )
    for ck in RunDir(d).checkpoints():
        _flip(_distcp(ck))
    with pytest.raises(CheckpointError, match="no checkpoint passes its check"):
        run(None, resume=d, quiet=True)
    assert not (d / "summary.json").exists()


def test_a_checkpoint_without_manifest_loads_with_a_warning(straight, tiny_synth, tmp_path):
    full, src = straight
    d = tmp_path / "legacy"
    shutil.copytree(src, d)
    for ck in RunDir(d).checkpoints():
        (ck / MANIFEST).unlink()  # as written before manifests existed
    with pytest.warns(CheckpointWarning, match="without verifying"):
        report = predict(d, tiny_synth, tmp_path / "p.parquet", split="test")
    assert report["test"]["auc"] == pytest.approx(full["test_auc"], abs=1e-6)


def test_full_disk_while_saving_leaves_no_partial_step_and_resumes(
    straight, tiny_synth, tmp_path, monkeypatch
):
    full, _ = straight
    d = tmp_path / "r"
    # Six files a checkpoint (1 .distcp, .metadata, extra, replicated, checkpoint.json, manifest):
    # the 9th write is the third file of the second checkpoint (step 8).
    monkeypatch.setenv(faults.ENV, "ckpt_write:9")
    faults.reset()
    with pytest.raises(CheckpointDiskFull, match=r"no space left on device while writing .*step-00000008"):
        run("quickstart", overrides=tiny_overrides(tiny_synth, **STEPS), run_dir=d, quiet=True)
    monkeypatch.delenv(faults.ENV)
    assert [c.name for c in RunDir(d).checkpoints()] == ["step-00000004"]  # what was complete is intact
    assert not list((d / "checkpoints").glob("*00000008*")) and not list((d / "checkpoints").glob(".*"))
    assert not (d / "summary.json").exists()
    _same_metrics(run(None, resume=d, quiet=True), full)


def test_full_disk_is_one_line_from_the_cli(tiny_synth, tmp_path, monkeypatch, capsys):
    from embtables.cli import main

    monkeypatch.setenv(faults.ENV, "ckpt_write:2")
    faults.reset()
    args = ["run", "quickstart", "--run-dir", str(tmp_path / "r")]
    for k, v in tiny_overrides(tiny_synth, **STEPS).items():
        args += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no space left on device while writing" in err and "Traceback" not in err
