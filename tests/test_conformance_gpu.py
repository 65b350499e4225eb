"""The unsharded modules on a CUDA device with torch-native kernels (TorchRec's unsharded
EBC/EC use nn.EmbeddingBag / nn.Embedding): remaps, combines, forward, backward and
torch.export equal the CPU module with the same weights. Sharded CUDA training needs
FBGEMM's GPU build and is not covered here. Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch
from conformance_testing import build_conf, conf_batch, conformance_specs, spec_id

from embtables.embeddings import get_method

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SPECS = conformance_specs()


def _flat(out, emb) -> torch.Tensor:
    if hasattr(out, "to_dict"):
        return torch.cat([out[k] for k in emb.feature_names], dim=1)
    return torch.cat([out[k].to_padded_dense(3).flatten(1) for k in emb.feature_names], dim=1)


@pytest.mark.parametrize("sequence", [False, True], ids=["pooled", "seq"])
@pytest.mark.parametrize("spec", SPECS, ids=[spec_id(s) for s in SPECS])
def test_cuda_module_equals_cpu(spec, sequence):
    c = get_method(spec[0]).capabilities()
    if not (c.sequence if sequence else c.pooled):
        pytest.skip("face not supported (refusal covered by test_conformance)")
    cpu = build_conf(spec, sequence).eval()
    gpu = copy.deepcopy(cpu).to("cuda")
    kjt, _ = conf_batch(0, 16)
    want = _flat(cpu(kjt), cpu)
    got = _flat(gpu(kjt.to(torch.device("cuda"))), gpu)
    assert torch.allclose(got.cpu(), want, atol=1e-5)
    got.square().sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gpu.tables.parameters())


@pytest.mark.parametrize("spec", SPECS, ids=[spec_id(s) for s in SPECS])
def test_cuda_export_equals_eager(spec):
    if not get_method(spec[0]).capabilities().exportable:
        pytest.skip("not exportable (refusal covered by test_conformance)")
    emb = build_conf(spec).eval().to("cuda")
    kjt, _ = conf_batch(1, 16)
    kjt = kjt.to(torch.device("cuda"))
    ep = torch.export.export(emb, (kjt,), strict=False)
    assert torch.allclose(_flat(ep.module()(kjt), emb), _flat(emb(kjt), emb), atol=1e-6)
