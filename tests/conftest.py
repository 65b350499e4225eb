"""Shared fixtures: tiny synthetic datasets and quiet, single-threaded torch."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TORCHREC_RESOLVED_POD_SIZE", "1")
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    """6,000 rows of synthetic Criteo-style data with small vocabularies."""
    from embtables.datasets.synth import generate_synth

    out = tmp_path_factory.mktemp("data") / "tiny"
    generate_synth(out, rows=6000, seed=1, scale=0.001, progress=False)
    return out


def tiny_overrides(data: Path, **extra) -> dict:
    """A run small enough for a unit test (seconds)."""
    o = {
        "data.path": str(data),
        "embedding.dim": 8,
        "model.dlrm": {"bottom_mlp": [16], "top_mlp": [16]},
        "train.batch_size": 256,
        "train.eval_batch_size": 1024,
        "train.threads": 1,
        "train.progress": False,
        "data.shuffle_buffer": 1024,
    }
    o.update(extra)
    return o


@pytest.fixture(scope="module")
def one_rank():
    """A one-process gloo group for DistributedModelParallel tests in this process."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class EmbWrap(torch.nn.Module):
    """A parent for an embedding module (DMP shards children), returning pooled values."""

    def __init__(self, emb) -> None:
        super().__init__()
        self.emb = emb

    def forward(self, x):
        return self.emb(x).values()


# Three features and one hand-written batch for the method tests (multi-id and empty bags,
# the largest id of each feature).
def method_feats():
    from embtables.embeddings import FeatureSpec

    return [FeatureSpec("a", 1000), FeatureSpec("b", 50), FeatureSpec("c", 3000)]


def method_kjt(weights: bool = False, dtype=torch.int64):
    from torchrec import KeyedJaggedTensor

    lengths = [3, 0, 1, 2, 1, 1, 1, 2, 3]
    values = [3, 999, 17, 4, 0, 49, 7, 11, 2999, 5, 6, 1234, 42, 2999]
    w = torch.rand(len(values), generator=torch.Generator().manual_seed(3)) if weights else None
    return KeyedJaggedTensor.from_lengths_sync(
        ["a", "b", "c"], torch.tensor(values, dtype=dtype), torch.tensor(lengths, dtype=dtype), weights=w
    )
