"""`.tables` of every method shards with TorchRec's DMP (1 rank, gloo) and matches unsharded."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import EmbWrap
from torchrec import KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel

from embtables.embeddings import FeatureSpec, build

torch.set_num_threads(1)
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
FEATS = [FeatureSpec("a", 1000), FeatureSpec("b", 50), FeatureSpec("c", 3000)]


@pytest.mark.parametrize(("method", "knobs"), [
    ("hash", {"rows": 300}), ("qr", {"operation": "mult", "m": 40}),
    ("unified", {"rows": 97, "probes": 2, "num_tables": 2}),
])
def test_dmp_shards_tables_and_matches_unsharded(one_rank, method, knobs):
    x = KeyedJaggedTensor.from_lengths_sync(
        ["a", "b", "c"], torch.tensor([3, 999, 17, 4, 0, 49, 7, 11, 2999, 5, 6, 1234, 42, 2999]),
        torch.tensor([3, 0, 1, 2, 1, 1, 1, 2, 3]))
    mod = build(FEATS, method=method, dim=8, **knobs)
    ref = mod(x).values().detach().clone()
    saved = {f"emb.{k}": v.clone() for k, v in mod.state_dict().items()}
    dmp = DistributedModelParallel(EmbWrap(mod), device=torch.device("cpu"))
    dmp.load_state_dict(saved, strict=False)  # DMP does not copy weights into shards on CPU
    assert type(dmp.module.emb.tables).__name__.startswith("Sharded")
    out = dmp(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
