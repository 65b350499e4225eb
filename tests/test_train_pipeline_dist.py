"""Two gloo ranks (`--nproc 2`) through TrainPipelineSparseDist: the metrics of the plain
loop, exact step counts and evaluation points (with evaluation batches padded on a rank
that runs out first), and SIGTERM to one rank between evaluations (batches in flight)
then --resume ends with the metrics of the uninterrupted run."""

from __future__ import annotations

import json

import pytest

from embtables import faults
from embtables.experiments.rundir import RunDir
from embtables.sharding.launch import LaunchInterrupted, launch_run

METRICS = ("valid_auc", "test_auc", "valid_logloss", "test_logloss")


def _overrides(data, pipeline: str) -> list[str]:
    return [f"data.path={data}", "train.progress=false", "train.batch_size=256", "train.max_steps=10",
            "train.eval_every=4", "train.eval_batch_size=700", "embedding.dim=8",
            "model.dlrm.bottom_mlp=[16]", "model.dlrm.top_mlp=[16]", "train.threads=1",
            "data.shuffle_buffer=1024",
            f"train.pipeline={pipeline}"]


def _steps(run_dir) -> list[int]:
    return [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # four 2-rank launches: minutes on a loaded 2-core machine
def test_two_ranks_pipeline_equals_loop_and_resumes_after_sigterm(tiny_synth, tmp_path, monkeypatch):
    launch_run("quickstart", _overrides(tiny_synth, "loop"), str(tmp_path / "loop"), None, 2, timeout_s=600)
    launch_run("quickstart", _overrides(tiny_synth, "sparse_dist"), str(tmp_path / "pipe"), None, 2,
               timeout_s=600)
    loop = json.loads((tmp_path / "loop" / "summary.json").read_text())
    pipe = json.loads((tmp_path / "pipe" / "summary.json").read_text())
    for k in METRICS:
        assert pipe[k] == pytest.approx(loop[k], abs=1e-6), k
    assert pipe["steps"] == loop["steps"] == 10 and pipe["world_size"] == 2
    assert _steps(tmp_path / "pipe") == _steps(tmp_path / "loop") == [4, 8, 10]

    d = tmp_path / "r"
    monkeypatch.setenv(faults.ENV, "kill_after_step:6:term@1")  # the spawned ranks inherit it
    with pytest.raises(LaunchInterrupted, match="stopped by SIGTERM"):
        launch_run("quickstart", _overrides(tiny_synth, "sparse_dist"), str(d), None, 2, timeout_s=600)
    monkeypatch.delenv(faults.ENV)
    assert RunDir(d).latest_checkpoint().name == "step-00000006" and not RunDir(d).is_finished()
    launch_run(None, None, None, str(d), 2, timeout_s=600)
    resumed = json.loads((d / "summary.json").read_text())
    for k in METRICS:
        assert resumed[k] == pytest.approx(pipe[k], abs=1e-6), k
    assert resumed["steps"] == 10 and _steps(d) == [4, 8, 10]
