"""Two local ranks (`--nproc 2`): SIGTERM to one rank stops both at the same step after one
checkpoint, and --resume at 2 ranks ends with the metrics of an uninterrupted 2-rank run."""

from __future__ import annotations

import json

import pytest

from embtables import faults
from embtables.experiments.launch_run import launch_run
from embtables.experiments.rundir import RunDir
from embtables.sharding.launch import LaunchInterrupted

METRICS = ("valid_auc", "test_auc", "valid_logloss", "test_logloss")


def _overrides(data) -> list[str]:
    return [
        f"data.path={data}",
        "train.progress=false",
        "train.batch_size=256",
        "train.max_steps=10",
        "train.eval_every=4",
        "embedding.dim=8",
        "model.dlrm.bottom_mlp=[16]",
        "model.dlrm.top_mlp=[16]",
        "train.threads=1",
        "data.shuffle_buffer=1024",
    ]


@pytest.mark.slow  # three 2-rank launches: ~3 min on a loaded 2-core machine
def test_sigterm_to_one_rank_stops_both_resumably(tiny_synth, tmp_path, monkeypatch):
    launch_run("quickstart", _overrides(tiny_synth), str(tmp_path / "straight"), None, 2, timeout_s=600)
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())
    d = tmp_path / "r"
    monkeypatch.setenv(faults.ENV, "kill_after_step:6:term@1")  # the spawned ranks inherit it
    with pytest.raises(LaunchInterrupted, match="stopped by SIGTERM"):
        launch_run("quickstart", _overrides(tiny_synth), str(d), None, 2, timeout_s=600)
    monkeypatch.delenv(faults.ENV)
    assert RunDir(d).latest_checkpoint().name == "step-00000006" and not RunDir(d).is_finished()
    launch_run(None, None, None, str(d), 2, timeout_s=600)
    resumed = json.loads((d / "summary.json").read_text())
    for k in METRICS:
        assert resumed[k] == pytest.approx(straight[k], abs=1e-6), k
    assert resumed["steps"] == straight["steps"] == 10
