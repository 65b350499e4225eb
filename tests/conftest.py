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
