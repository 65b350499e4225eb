"""DeepFM: the FM part against a hand-written double loop, the registry/config entry, a run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import tiny_overrides
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embtables.embeddings import FeatureSpec, build
from embtables.experiments import run
from embtables.models import get_model, list_models
from embtables.models.deepfm import DeepFM, DeepFMConfig

FEATURES = [FeatureSpec("a", 10), FeatureSpec("b", 7), FeatureSpec("c", 5)]


def _batch(b: int = 6) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(1)
    vals = torch.cat([torch.randint(0, f.cardinality, (b,), generator=g) for f in FEATURES])
    return KeyedJaggedTensor(
        keys=[f.name for f in FEATURES], values=vals, lengths=torch.ones(3 * b, dtype=torch.long)
    )


def test_fm_part_equals_the_pairwise_sum():
    torch.manual_seed(0)
    model = DeepFM(build(FEATURES, dim=8), num_dense=2, cfg=DeepFMConfig(deep_mlp=[16]))
    with torch.no_grad():
        model.first_order.normal_()
        model.bias.fill_(0.3)
        last = model.deep[-1]
        last.weight.zero_()
        last.bias.zero_()  # the deep part now contributes 0
        model.dense_linear.weight.copy_(torch.tensor([[0.5, -2.0]]))
        model.dense_linear.bias.zero_()
    kjt, dense = _batch(), torch.randn(6, 2)
    emb = model.embedding(kjt).to_dict()
    e = [emb[f.name] for f in FEATURES]
    expected = torch.full((6,), 0.3) + dense @ torch.tensor([0.5, -2.0])
    for i in range(3):
        expected = expected + (e[i] * model.first_order[i]).sum(1)
        for j in range(i + 1, 3):
            expected = expected + (e[i] * e[j]).sum(1)
    torch.testing.assert_close(model(dense, kjt), expected.detach(), rtol=1e-5, atol=1e-5)


def test_deep_part_sees_dense_and_every_embedding():
    torch.manual_seed(0)
    model = DeepFM(build(FEATURES, dim=8), num_dense=2, cfg=DeepFMConfig(deep_mlp=[16, 4]))
    first = model.deep[0][0]
    assert isinstance(first, nn.Linear) and first.in_features == 2 + 3 * 8
    assert model(torch.randn(6, 2), _batch()).shape == (6,)


def test_registered_with_a_strict_config():
    assert "deepfm" in list_models()
    entry = get_model("deepfm")
    assert entry.config_cls is DeepFMConfig
    with pytest.raises(ValueError):
        DeepFMConfig.model_validate({"deep_layers": [4]})


def test_module_does_not_import_experiments():
    code = (
        "import sys, embtables.models.deepfm; "
        "bad = [m for m in sys.modules if m.startswith('embtables.experiments')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_deepfm_trains_through_the_runner(tiny_synth, tmp_path):
    o = tiny_overrides(
        tiny_synth, **{"model.name": "deepfm", "model.deepfm": {"deep_mlp": [16]}, "train.epochs": 2}
    )
    s = run("quickstart", overrides=o, run_dir=tmp_path / "r", quiet=True)
    assert s["model"] == "deepfm" and s["auc"] > 0.55


def test_no_dense_features():
    torch.manual_seed(0)
    model = DeepFM(build(FEATURES, dim=8), num_dense=0, cfg=DeepFMConfig(deep_mlp=[16]))
    assert model.dense_linear is None and model.deep[0][0].in_features == 3 * 8
    out = model(torch.zeros(6, 0), _batch())
    out.sum().backward()
    assert out.shape == (6,) and model.first_order.grad is not None
