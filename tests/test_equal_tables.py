"""Equal tables give equal results: methods that build `full`'s tables (hash, qr, unified at
budget 1, where they are collisionless) start from the same rows per (feature, id) and the
same dense weights for the same seed, and train to the same losses and test AUC."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embtables.datasets.schema import load_schema
from embtables.datasets.synth import generate_synth
from embtables.embeddings import FeatureSpec, build, list_methods
from embtables.experiments.build import build_trainer
from embtables.experiments.config import load_config
from embtables.sharding import init_distributed

FEATURES = [FeatureSpec("a", 37), FeatureSpec("b", 5), FeatureSpec("c", 300), FeatureSpec("d", 1)]

# (method, knobs): every layout that stores each feature collisionlessly at budget 1 (unified
# with several tables too: each table is cut to its own vocabulary, so budget 1 holds them all).
COLLISIONLESS = [
    ("hash", {}),
    ("qr", {"operation": "mult"}),
    ("qr", {"operation": "add"}),
    ("qr", {"operation": "concat"}),
    ("qr", {"operation": "mult", "partitions": 3}),
    ("unified", {}),
    ("unified", {"probes": 2}),
    ("unified", {"num_tables": 2, "budget": None}),
    ("unified", {"num_tables": 3, "probes": 2, "budget": None}),
    ("unified", {"num_tables": 2}),
    ("unified", {"num_tables": 3, "probes": 2}),
    ("tt", {}),  # plain features in chunk-wide rows
    ("mde", {}),
    ("hybrid", {"frequency_ranked": True}),
]


def all_rows(module, features) -> dict[str, torch.Tensor]:
    """Every id of every feature looked up once: {feature: [cardinality, dim]}."""
    n = max(f.cardinality for f in features)
    ids = [torch.arange(f.cardinality) for f in features]
    lengths = torch.cat(
        [
            torch.cat(
                [
                    torch.ones(f.cardinality, dtype=torch.long),
                    torch.zeros(n - f.cardinality, dtype=torch.long),
                ]
            )
            for f in features
        ]
    )
    kjt = KeyedJaggedTensor(keys=[f.name for f in features], values=torch.cat(ids), lengths=lengths)
    with torch.no_grad():
        out = module(kjt).to_dict()
    return {f.name: out[f.name][: f.cardinality] for f in features}


def built(method: str, seed: int = 0, budget: float | None = 1.0, **knobs):
    torch.manual_seed(seed)
    return build(FEATURES, method=method, dim=8, budget=budget if method != "full" else None, **knobs)


def test_full_rows_are_uniform_within_each_features_bound():
    rows = all_rows(built("full"), FEATURES)
    for f in FEATURES:
        bound = math.sqrt(1 / f.cardinality)
        r = rows[f.name]
        assert float(r.abs().max()) <= bound
        if f.cardinality > 30:  # a U(-b, b) sample of hundreds of values comes close to both ends
            assert float(r.max()) > 0.9 * bound and float(r.min()) < -0.9 * bound


@pytest.mark.parametrize(("method", "knobs"), COLLISIONLESS, ids=lambda x: str(x))
def test_collisionless_methods_start_from_fulls_rows(method, knobs):
    ref = all_rows(built("full"), FEATURES)
    got = all_rows(built(method, **knobs), FEATURES)
    for f in FEATURES:
        torch.testing.assert_close(got[f.name], ref[f.name], rtol=0, atol=0, msg=f"{method} {knobs} {f.name}")


def test_a_features_rows_do_not_depend_on_the_other_features():
    alone = all_rows(built("unified"), FEATURES)
    torch.manual_seed(0)
    wider = [*FEATURES, FeatureSpec("e", 999)]
    more = build(wider, method="unified", dim=8, budget=1.0)
    torch.testing.assert_close(all_rows(more, wider)["c"], alone["c"], rtol=0, atol=0)


def test_seed_changes_rows_and_successive_modules_differ():
    a = all_rows(built("full", seed=0), FEATURES)["c"]
    assert not torch.equal(a, all_rows(built("full", seed=1), FEATURES)["c"])
    torch.manual_seed(0)
    first, second = build(FEATURES, dim=8), build(FEATURES, dim=8)  # e.g. DARE's two modules
    assert torch.equal(all_rows(first, FEATURES)["c"], a)
    assert not torch.equal(all_rows(second, FEATURES)["c"], a)


def test_every_method_moves_the_callers_rng_by_one_draw():
    """What a method draws for itself (tables, thresholds) must not shift the dense init."""
    states = {}
    for m in list_methods():
        torch.manual_seed(0)
        # budget: what each method needs to build these tiny features (mch keeps state beyond its rows)
        # and the knobs a method cannot build without (hybrid's hot set must come from the data)
        knobs = {"hybrid": {"frequency_ranked": True}}.get(m, {})
        build(FEATURES, method=m, dim=8, budget={"full": None, "optembed": None, "mch": "1MB"}.get(m, 1.0),
              **knobs)
        states[m] = torch.rand(4)
    assert {"full", "hash", "qr", "unified", "mch", "optembed"} <= set(states)
    for m, s in states.items():
        assert torch.equal(s, states["full"]), m


# ---- training: the runner's real path (Trainer), 50 steps -------------------------------


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("eq") / "synth"
    generate_synth(out, rows=16000, seed=3, scale=0.002, progress=False)
    return out


def train_50(root, method: str, budget, knobs: dict | None = None):
    o = {
        "data.path": str(root),
        "embedding.method": method,
        "embedding.dim": 8,
        "embedding.budget": budget,
        "model.dlrm": {"bottom_mlp": [16], "top_mlp": [16]},
        "train.batch_size": 256,
        "train.max_steps": 50,
        "train.eval_batch_size": 2048,
        "train.threads": 1,
        "train.progress": False,
        "train.eval_every": 0,
        "train.checkpoint": False,
        "data.shuffle_buffer": 1024,
        "seed": 7,
    }
    if knobs:
        o[f"embedding.{method}"] = knobs
    cfg = load_config("quickstart", o)
    t = build_trainer(
        cfg, load_schema(root), root, init_distributed(cfg.sharding.device, cfg.sharding.timeout_s), None
    )
    dense = {n: p.detach().clone() for n, p in t.inner.named_parameters() if not n.startswith("embedding.")}
    t.step_losses = []
    final = t.train()
    assert len(t.step_losses) == 50
    return np.array(t.step_losses), dense, final["test_auc"]


@pytest.fixture(scope="module")
def full_run(small_synth):
    return train_50(small_synth, "full", None)


# Layouts that split a row into several (qr concat, unified with probes > 1) start from the
# same rows but train differently under row-wise Adagrad: each piece keeps its own state.
@pytest.mark.parametrize(
    ("method", "knobs"),
    [("hash", None), ("qr", {"operation": "mult"}), ("unified", None)],
    ids=lambda x: str(x),
)
def test_equal_tables_train_to_equal_losses_and_auc(small_synth, full_run, method, knobs):
    ref_loss, ref_dense, ref_auc = full_run
    loss, dense, auc = train_50(small_synth, method, "1/1", knobs)
    for k, v in ref_dense.items():
        assert torch.equal(dense[k], v), k
    np.testing.assert_allclose(loss, ref_loss, rtol=0, atol=1e-5)
    assert abs(auc - ref_auc) < 1e-4, (auc, ref_auc)


def test_compressed_tables_do_train_differently(small_synth, full_run):
    """The comparison above can fail: a table with collisions gives other losses."""
    loss, _, _ = train_50(small_synth, "hash", "1/4")
    assert np.abs(loss - full_run[0]).max() > 1e-3


def test_init_on_a_shard_falls_back_to_a_bounded_uniform():
    """TorchRec's sharded modules call init_fn on a local shard before shard_model loads the
    unsharded weights back: that must not fail (nor need the whole table)."""
    from embtables.embeddings.table_init import feature_init

    init = feature_init("c", 300, 8).bind(seed=5)
    full = init(torch.empty(300, 8))
    shard = init(torch.empty(150, 8))
    bound = math.sqrt(1 / 300)
    assert float(full.abs().max()) <= bound and float(shard.abs().max()) <= bound
    assert torch.equal(init(torch.empty(300, 8)), full)  # the whole table: the seeded draw again
