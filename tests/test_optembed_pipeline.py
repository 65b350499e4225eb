"""OptEmbed end to end: three stages on tiny synthetic data, artefacts, resume, summary."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import embtables.embeddings.optembed  # noqa: F401  (registers `optembed`)
from embtables.datasets.schema import load_schema
from embtables.embeddings import build, features_from_schema
from embtables.embeddings.optembed import OptEmbed
from embtables.experiments import run

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from embtables.datasets.synth import generate_synth

    out = tmp_path_factory.mktemp("optembed") / "synth"
    generate_synth(out, rows=6000, scale=0.001, progress=False)
    return out


def config(data, **optembed):
    knobs = {"search_iterations": 3, "population": 4, "mutation_num": 2, "crossover_num": 2, "parents": 2,
             "search_rows": 600, "threshold_lr": 0.05, **optembed}
    return {
        "name": "oe-test", "seed": 0,
        "data": {"path": str(data), "shuffle_buffer": 0, "prefetch": 0, "max_eval_rows": 600},
        "embedding": {"method": "optembed", "dim": 8, "optembed": knobs},
        "model": {"name": "dlrm", "dlrm": {"bottom_mlp": [8], "top_mlp": [8]}},
        "train": {"batch_size": 512, "epochs": 1, "threads": 1, "progress": False, "eval_batch_size": 600},
    }


def test_three_stages_write_artefacts_and_resume_skips_the_supernet(data, tmp_path):
    rd = tmp_path / "run"
    s = run(config(data), run_dir=rd, quiet=True)
    root = rd / "optembed"
    for name in ("supernet/done.json", "supernet/config.yaml", "supernet/metrics.jsonl", "search_state.json",
                 "search.json", "arch.pt", "retrain_dense.pt", "export.pt"):
        assert (root / name).exists(), name
    assert ((rd / "summary.json").exists()
            and json.loads((rd / "summary.json").read_text())["method"] == "optembed")

    # The summary is the retrained exported table's: its bytes are the export's memory_bytes().
    feats = features_from_schema(load_schema(data))
    exported = build(feats, method="optembed", dim=8, artefact=str(root / "export.pt"))
    assert (s["embedding_bytes"] == exported.memory_bytes()
            == OptEmbed.from_artefact(root / "export.pt").memory_bytes())
    search = json.loads((root / "search.json").read_text())
    assert list(exported.plan.dims) == search["dims"] == list(s["optembed"]["dims"].values())
    assert all(1 <= d <= 8 and d % 4 == 0 for d in search["dims"])
    assert exported.plan.bytes == search["bytes"]
    assert s["embedding_bytes"] < sum(f.cardinality for f in feats) * 8 * 4 + 4 * 8 * len(feats) * 8
    assert 0 <= s["optembed"]["rows_pruned_share"] < 1 and s["auc"] is not None
    # The export's tables are the retrained ones, not the rewound initial ones.
    arch = torch.load(root / "arch.pt", weights_only=True)
    assert not all(torch.equal(a, exported.table_weight(f.name))
                   for a, f in zip(arch["tables"], feats, strict=True))

    # `embtables predict` rebuilds the retrained exported model from the run directory.
    from embtables.experiments.predict import predict

    report = predict(rd, data, tmp_path / "pred.parquet", split=s["eval_split"])
    assert report[s["eval_split"]]["auc"] == pytest.approx(s["auc"], abs=1e-6)

    # Resume after stage 1: drop stages 2-3, the supernet must not train again.
    done = root / "supernet" / "done.json"
    stamp, metrics = done.stat().st_mtime_ns, (root / "supernet" / "metrics.jsonl").read_text()
    for name in ("search.json", "search_state.json", "arch.pt", "export.pt", "retrain_dense.pt"):
        (root / name).unlink()
    shutil.rmtree(rd / "checkpoints")
    (rd / "metrics.jsonl").unlink()
    s2 = run(config(data), resume=rd, quiet=True)
    assert done.stat().st_mtime_ns == stamp and (root / "supernet" / "metrics.jsonl").read_text() == metrics
    assert (root / "export.pt").exists()
    # Same supernet, same seed: the same search and the same retrained model.
    assert s2["optembed"]["dims"] == s["optembed"]["dims"] and s2["embedding_bytes"] == s["embedding_bytes"]
    assert s2["auc"] == pytest.approx(s["auc"], abs=1e-6)


def test_budget_aware_run_stays_under_budget(data, tmp_path):
    feats = features_from_schema(load_schema(data))
    budget = int(sum(f.cardinality for f in feats) * 8 * 4 * 0.4)
    cfg = config(data, retrain_init="inherit", search_iterations=2)
    cfg["embedding"]["budget"] = budget
    cfg["train"]["max_steps"] = 4
    s = run(cfg, run_dir=tmp_path / "b", quiet=True)
    assert s["embedding_bytes"] <= budget and s["optembed"]["budget_bytes"] == budget
