"""The remap -> TorchRec tables -> combine base that every method fills in.

Only ``self.tables`` (a TorchRec ``EmbeddingBagCollection`` or ``EmbeddingCollection``)
holds big parameters, so TorchRec's planner and DistributedModelParallel shard every
method with the stock sharders. ``self.remap`` is a parameter-free child module (so
TorchRec's train pipeline can run it in its data stage); ``combine`` turns physical
lookups back into ``dim`` per logical feature.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from embtables.embeddings.budget import DTYPE_BYTES, format_bytes
from embtables.embeddings.spec import FeatureSpec

TORCHREC_DTYPE = {"fp32": DataType.FP32, "fp16": DataType.FP16}
TORCH_DTYPE = {"fp32": torch.float32, "fp16": torch.float16}


class IdentityRemap(nn.Module):
    """No-op remap (``full``)."""

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return kjt


class EmbeddingMethod(nn.Module):
    """Base class. A subclass sets ``self.remap`` and calls ``self._make_tables``.

    Constructor contract (``registry.build`` calls it): ``cls(features, *, dim,
    budget_bytes, dtype, sequence, device, **knobs)``; method knobs are keyword-only.
    """

    method_name: str = "?"

    def __init__(
        self,
        features: list[FeatureSpec],
        *,
        dim: int,
        budget_bytes: int | None,
        dtype: str,
        sequence: bool,
        device: torch.device | None,
    ) -> None:
        super().__init__()
        self.features = list(features)
        self.dim = dim
        self.budget_bytes = budget_bytes
        self.dtype = dtype
        self.sequence = sequence
        self.remap: nn.Module = IdentityRemap()
        self.tables: EmbeddingBagCollection | EmbeddingCollection

    # ---- construction helpers -------------------------------------------------------
    def _make_tables(
        self, configs: list[tuple[str, int, int, list[str]]], device: torch.device | None
    ) -> None:
        """``configs``: (table name, rows, width, physical feature names)."""
        dt = TORCHREC_DTYPE[self.dtype]
        if self.sequence:
            ec = [EmbeddingConfig(name=n, num_embeddings=r, embedding_dim=w, feature_names=f, data_type=dt)
                  for n, r, w, f in configs]
            self.tables = EmbeddingCollection(tables=ec, device=device)
        else:
            ebc = [EmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=w, feature_names=f, data_type=dt)
                   for n, r, w, f in configs]
            self.tables = EmbeddingBagCollection(tables=ebc, device=device)
        if self.dtype != "fp32":
            # torchrec's unsharded modules allocate fp32 whatever data_type says;
            # store the weights in the dtype the budget was computed for.
            self.tables.to(TORCH_DTYPE[self.dtype])

    def check_budget(self) -> None:
        if self.budget_bytes is not None and self.memory_bytes() > self.budget_bytes:
            raise ValueError(
                f"{self.method_name}: built {format_bytes(self.memory_bytes())} which exceeds the budget "
                f"{format_bytes(self.budget_bytes)}"
            )

    # ---- the public face ------------------------------------------------------------
    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def output_dims(self) -> list[int]:
        return [self.dim] * len(self.features)

    def table_configs(self) -> list[EmbeddingBagConfig | EmbeddingConfig]:
        if isinstance(self.tables, EmbeddingBagCollection):
            return list(self.tables.embedding_bag_configs())
        return list(self.tables.embedding_configs())

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor | dict[str, JaggedTensor]:
        looked_up = self.tables(self.remap(features))
        if self.sequence:
            return self.combine_sequence(looked_up, features)
        return self.combine(looked_up, features)

    def combine(self, pooled: KeyedTensor, features: KeyedJaggedTensor) -> KeyedTensor:
        """Physical pooled lookups -> one ``dim`` vector per logical feature."""
        return pooled

    def combine_sequence(
        self, seq: dict[str, JaggedTensor], features: KeyedJaggedTensor
    ) -> dict[str, JaggedTensor]:
        return seq

    # ---- sizes ----------------------------------------------------------------------
    def table_bytes(self) -> int:
        return sum(c.num_embeddings * c.embedding_dim for c in self.table_configs()) * DTYPE_BYTES[self.dtype]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Small parameters outside the TorchRec tables (data-parallel)."""
        table_params = {id(p) for p in self.tables.parameters()}
        return [p for p in self.parameters() if id(p) not in table_params]

    def buffer_bytes(self) -> int:
        """Remap buffers (e.g. an id->row map) count in memory_bytes()."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def num_parameters(self) -> int:
        return sum(c.num_embeddings * c.embedding_dim for c in self.table_configs()) + sum(
            p.numel() for p in self.dense_parameters()
        )

    def memory_bytes(self) -> int:
        dense = sum(p.numel() * p.element_size() for p in self.dense_parameters())
        return self.table_bytes() + dense + self.buffer_bytes()

    def extra_repr(self) -> str:
        return (f"method={self.method_name}, features={len(self.features)}, dim={self.dim}, "
                f"dtype={self.dtype}, bytes={format_bytes(self.memory_bytes())}")
