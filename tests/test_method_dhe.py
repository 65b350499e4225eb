"""`dhe` (Deep Hash Embedding): encoding golden values and determinism, MLP sizing, pooling."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import method_feats, method_kjt
from torchrec import KeyedJaggedTensor, PoolingType
from torchrec.models.dlrm import DLRM as TorchRecDLRM

from embtables.embeddings import BudgetTooSmall, FeatureSpec, build, plan
from embtables.embeddings.dhe import DHEEncoder, M, hash_constants, mlp_parameters
from embtables.embeddings.hashing import MASK64, mix64_int, name_key
from embtables.embeddings.hashing import salt as salt_of
from embtables.models.dlrm import DLRM, DLRMConfig

FEATS = method_feats()
kjt = method_kjt


def encode_by_hand(x: int, feature: str, k: int) -> list[float]:
    """The documented encoding in pure Python (unsigned 64-bit arithmetic)."""
    s = mix64_int(name_key(feature) ^ mix64_int(0x9E3779B97F4A7C15)) & MASK64  # salt(feature, 0)
    mixed = mix64_int((x & MASK64) ^ s)
    out = []
    for j in range(k):
        a, b = mix64_int(2 * j + 1) | 1, mix64_int(2 * j + 2)
        out.append(2 * (((a * mixed + b) & MASK64) >> 40) / (M - 1) - 1)
    return out


GOLDEN_AB = (
    [6238072747940578789, 2185194620014831857, -5278393320434088483, 1346066267577507605],
    [-2606959012126976886, -5213918032843888364, -3353203050545663124, -3068323830470825496],
)
GOLDEN_ENC = [
    [0.7459117, -0.0370734, -0.9877665, -0.5116289],
    [-0.0883926, -0.6132184, -0.4297159, 0.5836794],
    [-0.2372057, 0.5246056, -0.1202340, -0.2810695],
]
IDS = [0, 1, 2**40 + 7]


def test_encoding_golden_values_and_hand_oracle():
    assert hash_constants(4) == GOLDEN_AB
    enc = DHEEncoder(4)(torch.tensor(IDS), salt_of("a", 0))
    torch.testing.assert_close(enc, torch.tensor(GOLDEN_ENC), rtol=0, atol=1e-6)
    hand = torch.tensor([encode_by_hand(x, "a", 4) for x in IDS])
    torch.testing.assert_close(enc, hand.float(), rtol=0, atol=1e-6)
    big = DHEEncoder(1024)(torch.arange(50), salt_of("a", 0))
    assert big.min() >= -1 and big.max() <= 1 and abs(big.mean().item()) < 0.02  # uniform in [-1, 1]
    assert DHEEncoder(4)(torch.tensor(IDS[:2], dtype=torch.int32), salt_of("a", 0)).equal(enc[:2])
    assert not torch.allclose(DHEEncoder(4)(torch.tensor(IDS), salt_of("b", 0)), enc)  # feature-salted


def test_encoding_is_identical_in_a_fresh_process():
    code = (
        "import torch; from embtables.embeddings.dhe import DHEEncoder; from embtables.embeddings.hashing "
        "import salt; print(DHEEncoder(1024)(torch.tensor([5, 2**50]), salt('C3', 0)).sum().item())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    here = DHEEncoder(1024)(torch.tensor([5, 2**50]), salt_of("C3", 0)).sum().item()
    assert float(got.stdout.strip().splitlines()[-1]) == here


def test_bag_is_weighted_sum_of_per_id_mlp_outputs():
    mod = build(FEATS, method="dhe", dim=8, hidden=16, hashes=64, weighted=True)
    x = kjt(weights=True)
    out = mod(x).to_dict()
    for name in ("a", "b", "c"):
        s = salt_of(name, 0)
        for b in range(3):
            o = x[name].offsets()
            ids, w = x[name].values()[o[b] : o[b + 1]], x[name].weights()[o[b] : o[b + 1]]
            want = (mod.mlp(mod.encoder(ids, s)) * w[:, None]).sum(0)
            torch.testing.assert_close(out[name][b], want)
    assert torch.all(out["a"][1] == 0)  # the empty bag
    out["c"].sum().backward()
    assert all(p.grad is not None for p in mod.mlp.parameters())


def test_repeated_ids_decoded_once_give_the_per_id_function_and_gradient():
    """A batch's distinct keys are decoded once: outputs and MLP gradients equal decoding
    every id (the oracle below), including an id repeated across bags and features."""
    feats = [FeatureSpec("a", 100), FeatureSpec("b", 100)]
    mod = build(feats, method="dhe", dim=8, hidden=16, hashes=64, weighted=True)
    ids = torch.tensor([7, 7, 3, 7, 3, 3, 7, 9])  # a: bags [7,7],[3,7]; b: [3,3],[7,9]
    w = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0, -1.0, 2.0, 0.25])
    x = KeyedJaggedTensor.from_lengths_sync(["a", "b"], ids, torch.tensor([2, 2, 2, 2]), weights=w)
    out = mod(x).values()
    g_out = torch.randn_like(out)
    grads = torch.autograd.grad((out * g_out).sum(), list(mod.mlp.parameters()))
    ref = build(feats, method="dhe", dim=8, hidden=16, hashes=64, weighted=True)
    ref.load_state_dict(mod.state_dict())
    cols = []
    for name, lo in (("a", 0), ("b", 4)):
        per_id = ref.mlp(ref.encoder(ids[lo : lo + 4], salt_of(name, 0))) * w[lo : lo + 4, None]
        cols.append(torch.stack([per_id[:2].sum(0), per_id[2:].sum(0)]))
    want = torch.cat(cols, dim=1)
    torch.testing.assert_close(out, want)
    want_grads = torch.autograd.grad((want * g_out).sum(), list(ref.mlp.parameters()))
    for g, wg in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, wg)


def test_sequence_face_mean_pooling_and_int32():
    mod = build(FEATS, method="dhe", dim=8, hidden=16, hashes=64).eval()
    seq = build(FEATS, method="dhe", dim=8, hidden=16, hashes=64, sequence=True)
    seq.load_state_dict(mod.state_dict())
    x = kjt()
    s = seq(x)
    assert s["c"].values().shape == (6, 8)
    torch.testing.assert_close(s["c"].values()[0], mod(x).to_dict()["c"][0])
    torch.testing.assert_close(mod(x).values(), mod(kjt(dtype=torch.int32)).values(), rtol=0, atol=0)
    feats = [FeatureSpec("a", 1000, PoolingType.MEAN), FeatureSpec("b", 50)]
    mixed = build(feats, method="dhe", dim=8, hidden=16, hashes=64)
    y = KeyedJaggedTensor.from_lengths_sync(["a", "b"], torch.tensor([1, 2, 3, 4]), torch.tensor([3, 1]))
    per_id = mixed.mlp(mixed.encoder(torch.tensor([1, 2, 3]), salt_of("a", 0)))
    torch.testing.assert_close(mixed(y).to_dict()["a"][0], per_id.mean(0))


def test_sizing_memory_and_minimum():
    p = plan(FEATS, "dhe", dim=16, budget=200_000)
    assert p.hidden < 256
    assert mlp_parameters(1024, p.hidden, 2, 16) * 4 == p.bytes <= 200_000
    assert mlp_parameters(1024, p.hidden + 1, 2, 16) * 4 > 200_000  # the widest that fits
    mod = build(FEATS, method="dhe", dim=16, budget=200_000)
    assert mod.memory_bytes() == p.bytes and mod.table_configs() == [] and mod.table_bytes() == 0
    assert mod.num_parameters() == p.num_parameters
    assert plan(FEATS, "dhe", dim=16).hidden == 256 and plan(FEATS, "dhe", dim=16, budget="1GB").hidden == 256
    with pytest.raises(BudgetTooSmall) as e:
        build(FEATS, method="dhe", dim=16, budget=3_000)
    assert e.value.minimum == mlp_parameters(1024, 1, 2, 16) * 4
    build(FEATS, method="dhe", dim=16, budget=e.value.minimum)
    with pytest.raises(BudgetTooSmall):
        build(FEATS, method="dhe", dim=16, budget=100_000, hidden=256)
    with pytest.raises(ValueError, match="fp32"):
        build(FEATS, method="dhe", dim=16, dtype="fp16")


def test_inside_torchrec_and_embtables_dlrm():
    mod = build(FEATS, method="dhe", dim=16, hidden=32, hashes=128)
    model = TorchRecDLRM(
        embedding_bag_collection=mod,
        dense_in_features=4,
        dense_arch_layer_sizes=[8, 16],
        over_arch_layer_sizes=[8, 1],
    )
    model(torch.randn(3, 4), kjt()).sum().backward()
    assert all(p.grad is not None for p in mod.mlp.parameters())
    ours = DLRM(
        build(FEATS, method="dhe", dim=16, hidden=32, hashes=128), 4, DLRMConfig(bottom_mlp=[8], top_mlp=[8])
    )
    logits = ours(torch.randn(3, 4), kjt())
    assert logits.shape == (3,)
    logits.sum().backward()
