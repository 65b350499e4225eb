"""Every registered method's unsharded module on a CUDA device, with torch-native kernels
(TorchRec's unsharded EBC/EC run nn.EmbeddingBag / nn.Embedding; no FBGEMM CUDA op is
needed): the remap, the combine, forward, backward and torch.export each equal the CPU
module with the same weights. Sharded CUDA training (DMP with FBGEMM's fused CUDA
kernels, NCCL) needs FBGEMM's GPU build and is not covered here.

``pytest -m gpu`` selects these tests (the default run deselects them); without CUDA they
skip. ``EMBTABLES_GPU_TEST_DEVICE=cpu pytest -m gpu tests/test_conformance_gpu.py`` runs the
same checks with the CPU standing in for the GPU: a dry run of this file's own code on a
machine without one (it compares CPU with CPU, so it proves nothing about CUDA)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conformance_testing import build_conf, conf_batch, conformance_specs, spec_id
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from embtables.embeddings import get_method, list_methods
from embtables.embeddings.base import IdentityRemap

DEVICE = torch.device(os.environ.get("EMBTABLES_GPU_TEST_DEVICE", "cuda"))

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                 reason="needs a CUDA device")]

SPECS = conformance_specs()
FACES = [(s, seq) for s in SPECS for seq in (False, True)
         if (get_method(s[0]).capabilities().sequence if seq else get_method(s[0]).capabilities().pooled)]
FACE_IDS = [f"{spec_id(s)}-{'seq' if seq else 'pooled'}" for s, seq in FACES]


def test_every_registered_method_is_covered():
    """The registry is enumerated: each method has at least one face here."""
    assert {s[0] for s, _ in FACES} == set(list_methods())


def _flat(out, emb) -> torch.Tensor:
    if hasattr(out, "to_dict"):
        return torch.cat([out[k] for k in emb.feature_names], dim=1)
    return torch.cat([out[k].to_padded_dense(3).flatten(1) for k in emb.feature_names], dim=1)


def _to(x, device: torch.device):
    """A lookup's output (tensor, KeyedTensor, JaggedTensor, or containers of them) on ``device``."""
    if isinstance(x, (torch.Tensor, KeyedTensor, JaggedTensor, KeyedJaggedTensor)):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


def _pair(spec, sequence: bool):
    cpu = build_conf(spec, sequence).eval()
    return cpu, copy.deepcopy(cpu).to(DEVICE)


def _kjt(step: int = 0, weighted: bool = False):
    kjt, _ = conf_batch(step, 16, weighted=weighted)
    return kjt, kjt.to(DEVICE)


@pytest.mark.parametrize(("spec", "sequence"), FACES, ids=FACE_IDS)
def test_remap_on_device_equals_cpu(spec, sequence):
    cpu, gpu = _pair(spec, sequence)
    if isinstance(cpu.remap, IdentityRemap):
        pytest.skip(f"{spec[0]} has no separate remap module (forward covers its lookup)")
    kjt, kjt_dev = _kjt()
    want, got = cpu.remap(kjt), gpu.remap(kjt_dev)
    assert got.values().device.type == DEVICE.type
    assert got.keys() == want.keys()
    assert torch.equal(got.values().cpu(), want.values())
    assert torch.equal(got.lengths().cpu(), want.lengths())


@pytest.mark.parametrize(("spec", "sequence"), FACES, ids=FACE_IDS)
def test_combine_on_device_equals_cpu(spec, sequence):
    """The combine alone: the CPU lookup, moved to the device, combined there."""
    cpu, gpu = _pair(spec, sequence)
    kjt, kjt_dev = _kjt(1)
    cpu.before_lookup()
    looked_up = cpu.lookup(cpu.remap(kjt))
    gpu.before_lookup()
    combine_cpu = cpu.combine_sequence if sequence else cpu.combine
    combine_dev = gpu.combine_sequence if sequence else gpu.combine
    want = _flat(combine_cpu(looked_up, kjt), cpu)
    got = _flat(combine_dev(_to(looked_up, DEVICE), kjt_dev), gpu)
    assert got.device.type == DEVICE.type
    assert torch.allclose(got.cpu(), want, atol=1e-5)


@pytest.mark.parametrize(("spec", "sequence"), FACES, ids=FACE_IDS)
def test_forward_and_backward_on_device_equal_cpu(spec, sequence):
    cpu, gpu = _pair(spec, sequence)
    kjt, kjt_dev = _kjt(2)
    want, got = _flat(cpu(kjt), cpu), _flat(gpu(kjt_dev), gpu)
    assert got.device.type == DEVICE.type
    assert torch.allclose(got.cpu(), want, atol=1e-5)
    want.square().sum().backward()
    got.square().sum().backward()
    grads_cpu = {n: p.grad for n, p in cpu.named_parameters() if p.grad is not None}
    grads_dev = {n: p.grad for n, p in gpu.named_parameters() if p.grad is not None}
    assert sorted(grads_dev) == sorted(grads_cpu) and grads_cpu, (sorted(grads_dev), sorted(grads_cpu))
    for n, g in grads_cpu.items():
        assert torch.allclose(grads_dev[n].cpu().to_dense(), g.to_dense(), atol=1e-4), n


@pytest.mark.parametrize("spec", SPECS, ids=[spec_id(s) for s in SPECS])
def test_weighted_and_int32_inputs_on_device_equal_cpu(spec):
    c = get_method(spec[0]).capabilities()
    if not (c.pooled and c.weighted):
        pytest.skip("no weighted pooled face")
    cpu = build_conf(spec, weighted=True).eval()
    gpu = copy.deepcopy(cpu).to(DEVICE)
    kjt, kjt_dev = _kjt(3, weighted=True)
    k32 = KeyedJaggedTensor(keys=kjt_dev.keys(), values=kjt_dev.values().int(),
                            lengths=kjt_dev.lengths().int(), weights=kjt_dev.weights())
    want = _flat(cpu(kjt), cpu)
    assert torch.allclose(_flat(gpu(kjt_dev), gpu).cpu(), want, atol=1e-5)
    assert torch.allclose(_flat(gpu(k32), gpu).cpu(), want, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS, ids=[spec_id(s) for s in SPECS])
def test_export_on_device_equals_eager(spec):
    if not get_method(spec[0]).capabilities().exportable:
        pytest.skip("not exportable (refusal covered by test_conformance)")
    cpu = build_conf(spec).eval()
    emb = copy.deepcopy(cpu).to(DEVICE)
    kjt, kjt_dev = _kjt(4)
    ep = torch.export.export(emb, (kjt_dev,), strict=False)
    got = _flat(ep.module()(kjt_dev), emb)
    assert got.device.type == DEVICE.type
    assert torch.allclose(got, _flat(emb(kjt_dev), emb), atol=1e-6)
    assert torch.allclose(got.cpu(), _flat(cpu(kjt), cpu), atol=1e-5)
