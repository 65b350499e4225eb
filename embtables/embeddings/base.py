"""The remap -> TorchRec tables -> combine base that every method fills in.

Only ``self.tables`` (a TorchRec ``EmbeddingBagCollection`` or ``EmbeddingCollection``)
holds big parameters, so TorchRec's planner and DistributedModelParallel shard every
method with the stock sharders. ``self.remap`` is a parameter-free child module (so
TorchRec's train pipeline can run it in its data stage); ``combine`` turns physical
lookups back into ``dim`` per logical feature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from embtables.embeddings.budget import DTYPE_BYTES, format_bytes
from embtables.embeddings.spec import FeatureSpec
from embtables.embeddings.table_init import SeededInit, feature_init, module_seed

TORCHREC_DTYPE = {"fp32": DataType.FP32, "fp16": DataType.FP16}
TORCH_DTYPE = {"fp32": torch.float32, "fp16": torch.float16}

# (table name, rows, width, physical feature names[, init_fn[, pooling]])
TableSpec = tuple


def select_features(kjt: KeyedJaggedTensor, names: Sequence[str]) -> KeyedJaggedTensor:
    """The KJT restricted to ``names`` in that order (an EBC also ignores extra keys
    and accepts any key order; remaps rely on the canonical order)."""
    keys = kjt.keys()
    if list(keys) == list(names):
        return kjt
    index = {k: i for i, k in enumerate(keys)}
    missing = [n for n in names if n not in index]
    if missing:
        raise KeyError(f"input KeyedJaggedTensor lacks feature(s) {missing}; it has {list(keys)}")
    return kjt.permute([index[n] for n in names])


class IdentityRemap(nn.Module):
    """No-op remap (``full``)."""

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return kjt


class EmbeddingMethod(nn.Module):
    """Base class. A subclass sets ``self.remap`` and calls ``self._make_tables``.

    Constructor contract (``registry.build`` calls it): ``cls(features, *, dim,
    budget_bytes, dtype, sequence, device, [weighted], **knobs)``; method knobs are
    keyword-only. ``weighted`` (like ``EmbeddingBagCollection(is_weighted=...)``) is
    passed only to methods whose constructor accepts it.
    """

    method_name: str = "?"
    # Constructor arguments every method takes; they are not method knobs.
    BASE_ARGS = ("dim", "budget_bytes", "dtype", "sequence", "device", "weighted")

    def __init__(
        self,
        features: list[FeatureSpec],
        *,
        dim: int,
        budget_bytes: int | None,
        dtype: str,
        sequence: bool,
        device: torch.device | None,
        weighted: bool = False,
    ) -> None:
        super().__init__()
        if weighted and sequence:
            raise ValueError("weighted=True needs pooled features: an EmbeddingCollection (sequence=True) "
                             "returns one vector per id and has no per-id weights")
        self.features = list(features)
        self.dim = dim
        self.budget_bytes = budget_bytes
        self.dtype = dtype
        self.sequence = sequence
        self.weighted = weighted
        self.remap: nn.Module = IdentityRemap()
        self.tables: EmbeddingBagCollection | EmbeddingCollection

    # ---- construction helpers -------------------------------------------------------
    def _make_tables(
        self, configs: list[TableSpec], device: torch.device | None, *, unpooled: bool | None = None
    ) -> None:
        """``configs``: (table name, rows, width, physical feature names[, init_fn[, pooling]]).

        ``unpooled`` (default: ``self.sequence``) picks an EmbeddingCollection: methods
        whose combine is not linear (QR ``mult``) look ids up unpooled, combine per id,
        then pool themselves.
        """
        dt = TORCHREC_DTYPE[self.dtype]
        unpooled = self.sequence if unpooled is None else unpooled
        seed = module_seed()  # registry.build forks the caller's RNG around the whole module

        def init_kw(c: TableSpec) -> dict:
            # No init given: U(+-sqrt(1/rows)) keyed by the table's one feature (see table_init).
            spec = c[4] if len(c) > 4 and c[4] is not None else feature_init(
                c[3][0] if len(c[3]) == 1 else c[0], c[1], c[2])
            return {"init_fn": spec.bind(seed) if isinstance(spec, SeededInit) else spec}

        def pool_kw(c: TableSpec) -> dict:
            return {"pooling": c[5]} if len(c) > 5 and c[5] is not None else {}

        if unpooled:
            ec = [EmbeddingConfig(name=c[0], num_embeddings=c[1], embedding_dim=c[2], feature_names=list(c[3]),
                                  data_type=dt, **init_kw(c)) for c in configs]
            self.tables = EmbeddingCollection(tables=ec, device=device)
        else:
            ebc = [EmbeddingBagConfig(name=c[0], num_embeddings=c[1], embedding_dim=c[2],
                                      feature_names=list(c[3]), data_type=dt, **init_kw(c), **pool_kw(c))
                   for c in configs]
            self.tables = EmbeddingBagCollection(tables=ebc, is_weighted=self.weighted, device=device)
        self._shared = any(len(c[3]) > 1 for c in configs)  # see lookup()
        if self.dtype != "fp32":
            # torchrec's unsharded modules allocate fp16 for DataType.FP16 today; make sure.
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
        """The *physical* TorchRec tables (what the planner shards)."""
        if isinstance(self.tables, EmbeddingBagCollection):
            return list(self.tables.embedding_bag_configs())
        return list(self.tables.embedding_configs())

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The *logical* face, as the EmbeddingBagCollection this module replaces would
        report it (one ``dim``-wide table per feature), so code that inspects an EBC
        (``torchrec.models.dlrm.SparseArch``) works unchanged. Not the physical tables:
        see ``table_configs()``."""
        return [EmbeddingBagConfig(name=f.name, num_embeddings=f.cardinality, embedding_dim=self.dim,
                                   feature_names=[f.name], pooling=f.pooling) for f in self.features]

    def embedding_configs(self) -> list[EmbeddingConfig]:
        """Logical face of an EmbeddingCollection (sequence=True)."""
        return [EmbeddingConfig(name=f.name, num_embeddings=f.cardinality, embedding_dim=self.dim,
                                feature_names=[f.name]) for f in self.features]

    def is_weighted(self) -> bool:
        return self.weighted

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor | dict[str, JaggedTensor]:
        if not self.sequence:
            has_w = features.weights_or_none() is not None
            if has_w != self.weighted:
                raise ValueError(
                    f"{self.method_name}: input KeyedJaggedTensor {'has' if has_w else 'has no'} per-id weights "
                    f"but the module was built with weighted={self.weighted} (build(..., weighted=True) to "
                    "use kjt.weights(), like EmbeddingBagCollection(is_weighted=True))"
                )
            if has_w and self.dtype != "fp32":
                # nn.EmbeddingBag wants per_sample_weights in the table dtype.
                features = KeyedJaggedTensor(
                    keys=features.keys(), values=features.values(), lengths=features.lengths(),
                    weights=features.weights().to(TORCH_DTYPE[self.dtype]), stride=features.stride())
        remapped = self.remap(features)
        self.before_lookup()
        looked_up = self.lookup(remapped)
        if self.sequence:
            return self.combine_sequence(looked_up, features)
        return self.combine(looked_up, features)

    def lookup(self, kjt: KeyedJaggedTensor) -> KeyedTensor | dict[str, JaggedTensor]:
        """``self.tables(kjt)``, except for *unsharded* tables shared by several features.

        TorchRec's unsharded EBC/EC call one ``nn.EmbeddingBag``/``nn.Embedding`` per
        feature, and each call's backward builds a dense gradient of the whole table: a
        table shared by 26 features paid 26 table-sized gradients (4-9x slower, see
        bench_methods). Here such a collection looks each table up once for all its
        features, with the same weights, ops and output layout. Sharded tables (DMP
        replaces ``self.tables``) always go through TorchRec's own forward.
        """
        t = self.tables
        if type(t) not in (EmbeddingBagCollection, EmbeddingCollection):  # sharded (DMP) or custom
            return t(kjt)
        if getattr(self, "_shared", None) is None:
            self._shared = any(len(c.feature_names) > 1 for c in self.table_configs())
        if not self._shared:
            return t(kjt)
        cfgs = self.table_configs()
        names = [n for c in cfgs for n in c.feature_names]
        kjt = select_features(kjt, names)
        lpk, stride = kjt.length_per_key(), kjt.stride()
        values, offsets, w = kjt.values(), kjt.offsets(), kjt.weights_or_none()
        mods = t.embedding_bags if type(t) is EmbeddingBagCollection else t.embeddings
        # Pooled fast path: when every bag holds exactly one id, pooling is the identity and
        # nn.functional.embedding's forward+backward is ~1.5x cheaper than embedding_bag's on CPU.
        single = values.numel() == kjt.lengths().numel() and bool((kjt.lengths() == 1).all())
        pooled, seq, key0, val0 = [], {}, 0, 0
        for c, m in zip(cfgs, mods.values(), strict=True):
            nf = len(c.feature_names)
            val1 = val0 + sum(lpk[key0:key0 + nf])
            v = values[val0:val1]
            if type(t) is EmbeddingBagCollection and single:
                out = nn.functional.embedding(v, m.weight)
                if t.is_weighted():
                    out = out * w[val0:val1].unsqueeze(1).to(out.dtype)
                pooled.append(out.float().view(nf, stride, -1).transpose(0, 1).reshape(stride, -1))
            elif type(t) is EmbeddingBagCollection:
                o = offsets[key0 * stride:(key0 + nf) * stride + 1] - val0
                out = nn.functional.embedding_bag(
                    v, m.weight, o, mode=m.mode, include_last_offset=True,
                    per_sample_weights=w[val0:val1] if t.is_weighted() else None).float()
                pooled.append(out.view(nf, stride, -1).transpose(0, 1).reshape(stride, -1))
            else:
                emb = nn.functional.embedding(v, m.weight).float()
                lens = kjt.lengths()[key0 * stride:(key0 + nf) * stride]
                for j, (n, e) in enumerate(zip(c.feature_names, torch.split(emb, lpk[key0:key0 + nf]), strict=True)):
                    seq[n] = JaggedTensor(values=e, lengths=lens[j * stride:(j + 1) * stride])
            key0, val0 = key0 + nf, val1
        if type(t) is EmbeddingCollection:
            return seq
        return KeyedTensor(keys=names, length_per_key=[c.embedding_dim for c in cfgs for _ in c.feature_names],
                           values=torch.cat(pooled, dim=1))

    def before_lookup(self) -> None:
        """Hook between remap and lookup (``mch`` re-initialises evicted rows here: after
        the lookup, an in-place write would invalidate the weights autograd saved)."""

    def combine(self, pooled: KeyedTensor, features: KeyedJaggedTensor) -> KeyedTensor:
        """Physical pooled lookups -> one ``dim`` vector per logical feature."""
        return pooled

    def combine_sequence(
        self, seq: dict[str, JaggedTensor], features: KeyedJaggedTensor
    ) -> dict[str, JaggedTensor]:
        return seq

    def _keyed(self, values: torch.Tensor) -> KeyedTensor:
        """[B, F * dim] -> KeyedTensor with the logical keys."""
        return KeyedTensor(keys=self.feature_names, length_per_key=self.output_dims(), values=values)

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


def uniform_init(bound: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Symmetric uniform init U(-bound, bound) (works on fp16 weights too)."""

    def init(w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return w.uniform_(-bound, bound)

    return init
