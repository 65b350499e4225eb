"""The runner's steps through TorchRec's TrainPipelineSparseDist (``train.pipeline:
sparse_dist``) against the plain loop (``loop``): the same losses and metrics, exact step
counts and evaluation points, --resume (also after a SIGTERM with batches in flight), the
tables really pipelined, and every registered method trains under it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_overrides

from embtables import faults
from embtables.datasets.schema import load_schema
from embtables.embeddings import get_method, list_methods
from embtables.experiments import run
from embtables.experiments.build import build_model, build_trainer
from embtables.experiments.config import load_config
from embtables.experiments.runner import RunInterrupted
from embtables.sharding import init_distributed

METRICS = ("valid_auc", "test_auc", "valid_logloss", "test_logloss")
BUDGET = {"full": None, "optembed": None, "mch": 0.5}
KNOBS = {"hybrid": {"frequency_ranked": True}}  # its hot set must come from the data


def _cfg(data, method: str, pipeline: str, **extra):
    o = tiny_overrides(data, **{"embedding.method": method, "embedding.budget": BUDGET.get(method, 0.25),
                                "train.max_steps": 5, "train.eval_every": 2, "train.checkpoint": False,
                                "train.pipeline": pipeline, "data.max_eval_rows": 512, **extra})
    if method in KNOBS:
        o[f"embedding.{method}"] = KNOBS[method]
    return load_config("quickstart", o)


def _train(data, method: str, pipeline: str):
    cfg = _cfg(data, method, pipeline)
    t = build_trainer(cfg, load_schema(data), data, init_distributed("cpu"), None)
    t.step_losses = []
    final = t.train()
    return t, final


def _check_method(data, method: str) -> None:
    loop, loop_final = _train(data, method, "loop")
    pipe, pipe_final = _train(data, method, "sparse_dist")
    np.testing.assert_allclose(pipe.step_losses, loop.step_losses, rtol=0, atol=1e-6, err_msg=method)
    for k in ("valid_auc", "valid_logloss", "test_auc", "test_logloss"):
        assert pipe_final[k] == pytest.approx(loop_final[k], abs=1e-6), (method, k)
    assert pipe.step == loop.step == 5
    assert [h["step"] for h in pipe.history] == [h["step"] for h in loop.history] == [2, 4, 5]
    caps = get_method(method).capabilities()
    if not caps.pipelineable:  # refused by fx tracing: the runner trains it with the loop
        assert pipe.pipeline == "loop"
        return
    assert pipe.pipeline == "sparse_dist"
    names = pipe.steps.pipelined(pipe.inner)
    tables = [n for n in names if n.endswith("tables")]
    if caps.pipelined:
        assert tables, (method, names)  # the tables' input distribution runs in the pipeline
    else:  # a stateful remap runs in forward (mch), or there are no tables (dhe)
        assert not tables, (method, names)


@pytest.mark.parametrize("method", ["full", "qr", "mch", "dhe", "optembed"])
def test_pipeline_trains_like_the_loop(tiny_synth, method):
    _check_method(tiny_synth, method)


@pytest.mark.slow  # every registered method, twice each
@pytest.mark.parametrize("method", list_methods())
def test_every_method_trains_under_the_pipeline(tiny_synth, method):
    _check_method(tiny_synth, method)


@pytest.mark.parametrize("model, knobs", [("dcn", {"cross_layers": 2, "low_rank": 4, "deep_mlp": [16]}),
                                          ("deepfm", {})])
def test_other_models_train_like_the_loop(tiny_synth, model, knobs):
    """Whether the pipeline traces a model or the trainer falls back to the loop, the
    numbers are the loop's."""
    losses, finals = {}, {}
    for pipeline in ("loop", "sparse_dist"):
        cfg = _cfg(tiny_synth, "qr", pipeline, **{"model.name": model, f"model.{model}": knobs})
        t = build_trainer(cfg, load_schema(tiny_synth), tiny_synth, init_distributed("cpu"), None)
        t.step_losses = []
        finals[pipeline] = t.train()
        losses[pipeline] = t.step_losses
        assert (t.pipeline == pipeline) or (t.pipeline_note and "traced" in t.pipeline_note)
    np.testing.assert_allclose(losses["sparse_dist"], losses["loop"], rtol=0, atol=1e-6)
    assert finals["sparse_dist"]["test_auc"] == pytest.approx(finals["loop"]["test_auc"], abs=1e-6)


def test_checkpoint_keys_are_the_bare_models(tiny_synth):
    """The module DMP wraps adds no prefix: checkpoints of runs written before it load."""
    cfg = _cfg(tiny_synth, "qr", "sparse_dist")
    t = build_trainer(cfg, load_schema(tiny_synth), tiny_synth, init_distributed("cpu"), None,
                      for_training=False)
    bare = build_model(cfg, load_schema(tiny_synth))
    assert set(t.model.state_dict()) == set(bare.state_dict())
    fused = t.fused_opt.state_dict()["state"]
    assert fused and all(k.startswith("embedding.tables.") for k in fused), sorted(fused)[:3]
    sd = t.model.state_dict()
    missing, unexpected = t.model.load_state_dict(sd, strict=False)
    assert not unexpected


def test_pipeline_resume_ends_with_the_loops_metrics(tiny_synth, tmp_path):
    """Two epochs (the last batch of each is partial), an evaluation every 7 steps; stopped
    after the checkpoint at step 14 and resumed: the metrics of an uninterrupted run of the
    plain loop, and every evaluation point once."""
    o = tiny_overrides(tiny_synth, **{"train.epochs": 2, "train.eval_every": 7})
    loop = run("quickstart", overrides={**o, "train.pipeline": "loop"}, run_dir=tmp_path / "loop", quiet=True)
    o["train.pipeline"] = "sparse_dist"
    stopped = run("quickstart", overrides=o, run_dir=tmp_path / "b", quiet=True, stop_after_step=14)
    assert stopped["stopped_at_step"] == 14
    resumed = run(None, resume=tmp_path / "b", quiet=True)
    for k in METRICS:
        assert resumed[k] == pytest.approx(loop[k], abs=1e-6), k
    assert resumed["steps"] == loop["steps"] and resumed["train_samples"] == loop["train_samples"]
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x)["step"] for x in (tmp_path / "loop" / "metrics.jsonl").read_text().splitlines()]
    assert steps == want and steps[:-1] == list(range(7, loop["steps"], 7))


def test_sigterm_with_batches_in_flight_resumes_exactly(tiny_synth, tmp_path, monkeypatch):
    """SIGTERM after step 6, between evaluations at 4 and 8: the pipeline has read two
    batches ahead; the checkpoint counts only trained batches, --resume reads them again."""
    o = tiny_overrides(tiny_synth, **{"train.max_steps": 10, "train.eval_every": 4,
                                      "train.pipeline": "sparse_dist"})
    straight = run("quickstart", overrides=o, run_dir=tmp_path / "straight", quiet=True)
    monkeypatch.setenv(faults.ENV, "kill_after_step:6:term")
    with pytest.raises(RunInterrupted) as e:
        run("quickstart", overrides=o, run_dir=tmp_path / "r", quiet=True)
    monkeypatch.delenv(faults.ENV)
    assert e.value.step == 6 and (tmp_path / "r" / "checkpoints" / "step-00000006").is_dir()
    resumed = run(None, resume=tmp_path / "r", quiet=True)
    for k in METRICS:
        assert resumed[k] == pytest.approx(straight[k], abs=1e-6), k
    assert resumed["steps"] == straight["steps"] == 10
