"""The remap -> TorchRec tables -> combine base that every method fills in.

Only ``self.tables`` (a TorchRec ``EmbeddingBagCollection`` or ``EmbeddingCollection``)
holds big parameters, so TorchRec's planner and DistributedModelParallel shard every
method with the stock sharders. ``self.remap`` is a parameter-free child module (so
TorchRec's train pipeline can run it in its data stage); ``combine`` turns physical
lookups back into ``dim`` per logical feature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torchrec.distributed.types import LazyAwaitable
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import (
    JaggedTensor,
    KeyedJaggedTensor,
    KeyedTensor,
    permute_multi_embedding,
)

from embtables.embeddings.budget import DTYPE_BYTES, DType, format_bytes
from embtables.embeddings.quantize import (
    DEFAULT_ROW_ALIGNMENT,
    is_quantized,
    storage_bytes,
    table_storage_bytes,
)
from embtables.embeddings.spec import FeatureSpec
from embtables.embeddings.table_init import ReshapedFeatureInit, SeededInit, feature_init, module_seed

INT64_MAX = 2**63 - 1


def is_tracing() -> bool:
    """True under torch.fx / torchrec.fx symbolic tracing (TorchRec's train pipelines trace
    the model too), TorchScript, torch.compile and torch.export: the places where a
    data-dependent Python check (``bool(tensor)``, ``is None`` on a traced value) either
    breaks the trace or would be baked into it. Eager-only checks are skipped there."""
    if torch.jit.is_scripting():
        return True
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing() or torch.compiler.is_compiling()


@torch.fx.wrap
def run_in_forward(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """Identity that fx records as an opaque call: a sharded table fed through it is not
    pipelined by TrainPipelineSparseDist (its input is "modified" in forward). Used for a
    remap with state (``stateful_remap``), which must not run a batch ahead."""
    return kjt


class IdOutOfRange(ValueError):
    """An id outside ``[0, cardinality)`` of a bounded feature (or a negative id)."""

TORCHREC_DTYPE = {"fp32": DataType.FP32, "fp16": DataType.FP16}
TORCH_DTYPE = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass(frozen=True)
class TableSpec:
    """One physical TorchRec table a method asks ``_make_tables`` for."""

    name: str
    rows: int
    width: int
    #: The physical features looked up in it (``f``, ``f@j``, ``f#p``).
    features: tuple[str, ...]
    #: A seeded init (``table_init.SeededInit`` / ``ReshapedFeatureInit``, bound to the
    #: module's seed) or a plain ``init_fn``; None: U(+-sqrt(1/rows)) seeded by the table's
    #: one feature (by the table's name when it has several), see table_init.
    init: SeededInit | ReshapedFeatureInit | Callable[[torch.Tensor], torch.Tensor] | None = None
    #: None: TorchRec's default (SUM).
    pooling: PoolingType | None = None
    #: How many tables' rows multiply into one vector (QR ``mult``: 2; a TT feature's cores:
    #: their count): ``init_scale`` s scales each of them by s ** (1 / product_of).
    product_of: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))


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


def split_features(
    kjt: KeyedJaggedTensor, names: Sequence[str], weighted: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None, list | None]:
    """Per feature of ``names`` (in that order): values, lengths, weights (None when
    unweighted) and ids per feature (``length_per_key``; None when unknown). Works on a
    real KJT (eager, torch.export) and on an fx Proxy (symbolic tracing), so remaps that
    use it trace; ``weighted`` is the module's static flag (under fx a Proxy's weights
    cannot be tested for None)."""
    if isinstance(kjt, KeyedJaggedTensor):
        kjt = select_features(kjt, names)
        lpk = kjt.length_per_key()
        vals = list(torch.split(kjt.values(), lpk))
        lens = list(torch.split(kjt.lengths(), kjt.stride()))
        w = kjt.weights_or_none()
        ws = list(torch.split(w, lpk)) if w is not None else None
        return vals, lens, ws, lpk
    d = kjt.to_dict()
    jts = [d[n] for n in names]
    ws = [jt.weights() for jt in jts] if weighted else None
    return [jt.values() for jt in jts], [jt.lengths() for jt in jts], ws, None


class IdentityRemap(nn.Module):
    """No-op remap (``full``)."""

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return kjt


@dataclass(frozen=True)
class Capabilities:
    """What a method class declares it supports (``EmbeddingMethod.capabilities()``).

    The conformance suite (tests/test_conformance*.py) runs every registered method
    through TorchRec's stack according to these declarations, and asserts that what a
    method declares unsupported is *refused* with a clear error; docs/torchrec.md's
    support table is generated from them.
    """

    pooled: bool
    sequence: bool
    weighted: bool
    has_tables: bool
    stateful_remap: bool
    multi_rank: bool
    bounded_ids: bool
    fx_traceable: bool
    exportable: bool
    pipelineable: bool

    @property
    def pipelined(self) -> bool:
        """TrainPipelineSparseDist pipelines the tables (remap in the input stage)."""
        return self.has_tables and self.pipelineable and not self.stateful_remap


# Sharding types that run correctly on each device for each TorchRec table kind
# (../shared/TORCHREC-NOTES.md); sharding/dmp.py plans with these.
POOLED_SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")
SEQUENCE_SHARDING_TYPES = {"cpu": ("table_wise", "row_wise", "column_wise"),
                           "cuda": ("table_wise", "row_wise", "column_wise", "data_parallel")}


#: The TorchRec module kind holding a method's tables: EmbeddingBagCollection or EmbeddingCollection.
TableKind = Literal["ebc", "ec"]


def sharding_types_for(kind: TableKind, device_type: str) -> tuple[str, ...]:
    """Sharding types for a table kind: ``"ebc"`` (EmbeddingBagCollection) or ``"ec"``
    (EmbeddingCollection: no table_row_wise; data_parallel pools wrongly on CPU)."""
    if kind == "ebc":
        return POOLED_SHARDING_TYPES
    return SEQUENCE_SHARDING_TYPES["cpu" if device_type == "cpu" else "cuda"]


class EmbeddingMethod(nn.Module):
    """Base class. A subclass sets ``self.remap`` and calls ``self._make_tables``.

    Constructor contract (``registry.build`` calls it): ``cls(features, *, dim,
    budget_bytes, dtype, sequence, device, weighted, **knobs)``; the knobs are keyword-only,
    validated by the method's registered knobs model (``@register(name, knobs=...)``),
    with every default filled in. ``weighted`` is
    ``EmbeddingBagCollection(is_weighted=...)``.

    **Capabilities.** A method class declares what it supports with the class attributes
    below (defaults: everything a remap -> TorchRec tables -> combine method gets for
    free). Override only what differs, and make the module *refuse* what it declares
    unsupported: at build time when it can know (``supports_sequence=False`` and
    ``sequence=True``), otherwise at the first forward after sharding
    (``supports_multi_rank=False``). ``capabilities()`` collects them; the conformance
    suite and docs/torchrec.md read that.
    """

    method_name: str = "?"

    #: Pooled face (``KeyedTensor`` out, like an EmbeddingBagCollection).
    supports_pooled: bool = True
    #: Sequence face (``sequence=True``: ``dict[str, JaggedTensor]``, like an
    #: EmbeddingCollection). False: ``build(..., sequence=True)`` must raise.
    supports_sequence: bool = True
    #: Per-id weights (``weighted=True``, ``kjt.weights()``), pooled only.
    supports_weighted: bool = True
    #: The big parameters live in ``self.tables`` (a TorchRec EBC/EC that DMP shards).
    #: False: a table-free method (e.g. DHE: hashes -> MLP) whose parameters are all dense
    #: and data-parallel; DMP wraps it in DDP and the suite compares it under DDP.
    has_tables: bool = True
    #: The remap mutates state in forward (``mch`` admits and evicts ids). Such a remap
    #: must not run a batch ahead of the batch it serves, so it is not pipelineable:
    #: TrainPipelineSparseDist leaves the module in forward (it still trains correctly).
    stateful_remap: bool = False
    #: Works with its tables sharded (or replicated) over more than one rank. False: the
    #: module refuses, at the first forward after DMP, on every rank, before any
    #: collective, when the process group has more than one rank.
    supports_multi_rank: bool = True
    #: The id rule. True: in eager mode ids of a *bounded* feature (``FeatureSpec.bounded``,
    #: the default) must lie in ``[0, cardinality)``, like a plain EmbeddingBagCollection;
    #: features without a bound (raw-mode data) accept any id >= 0. False: the method
    #: takes raw ids by design (``mch``): any id >= 0. One reduction per batch; skipped
    #: under fx tracing, scripting, torch.compile and torch.export.
    bounded_ids: bool = True
    #: ``torch.fx.symbolic_trace`` / ``torchrec.fx.symbolic_trace`` of a model holding it.
    fx_traceable: bool = True
    #: ``torch.export.export`` of a model holding it, in eval mode, equals eager.
    exportable: bool = True
    #: Runs under TorchRec's train pipelines that trace the model (TrainPipelineSparseDist):
    #: its forward outside the remap and the tables traces. False: refused there with a
    #: clear error (TrainPipelineBase and plain loops still work).
    pipelineable: bool = True
    #: Its tables may be swapped for TorchRec's quantized inference collections for serving
    #: (``embtables export``, embeddings/quantize.py): its forward reaches them only through
    #: ``lookup()`` / TorchRec's own forward. False: export refuses the method, naming it.
    quantizable_tables: bool = True

    @classmethod
    def capabilities(cls) -> Capabilities:
        """This class's declarations as one record (for the suite and the docs table)."""
        return Capabilities(
            pooled=cls.supports_pooled, sequence=cls.supports_sequence, weighted=cls.supports_weighted,
            has_tables=cls.has_tables, stateful_remap=cls.stateful_remap, multi_rank=cls.supports_multi_rank,
            bounded_ids=cls.bounded_ids, fx_traceable=cls.fx_traceable, exportable=cls.exportable,
            pipelineable=cls.pipelineable)

    def table_kind(self) -> TableKind | None:
        """``"ebc"`` or ``"ec"``: the TorchRec module kind holding the tables (QR ``mult``
        looks pooled features up unpooled, so it is ``"ec"``); None for a table-free method.
        Decides the sharder DMP needs and the sharding types (``sharding_types()``)."""
        if not self.has_tables:
            return None
        return "ec" if self._unpooled else "ebc"

    def sharding_types(self, device_type: str = "cpu") -> tuple[str, ...]:
        """Sharding types the tables support on ``device_type`` (empty: table-free)."""
        kind = self.table_kind()
        return () if kind is None else sharding_types_for(kind, device_type)
    def __init__(
        self,
        features: list[FeatureSpec],
        *,
        dim: int,
        budget_bytes: int | None,
        dtype: DType,
        sequence: bool,
        device: torch.device | None,
        weighted: bool = False,
    ) -> None:
        super().__init__()
        if sequence and not self.supports_sequence:
            raise ValueError(f"{self.method_name} supports pooled features only (sequence=False)")
        if not sequence and not self.supports_pooled:
            raise ValueError(f"{self.method_name} supports sequence features only (sequence=True)")
        if weighted and not self.supports_weighted:
            raise ValueError(f"{self.method_name} does not support per-id weights (weighted=True)")
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
        self, specs: Sequence[TableSpec], device: torch.device | None, *, unpooled: bool | None = None
    ) -> None:
        """The module's TorchRec tables, one per :class:`TableSpec`.

        ``unpooled`` (default: ``self.sequence``) picks an EmbeddingCollection: methods
        whose combine is not linear (QR ``mult``) look ids up unpooled, combine per id,
        then pool themselves.
        """
        dt = TORCHREC_DTYPE[self.dtype]
        unpooled = self.sequence if unpooled is None else unpooled
        self._unpooled = unpooled
        seed = module_seed()  # registry.build forks the caller's RNG around the whole module

        def init_fn(t: TableSpec) -> Callable[[torch.Tensor], torch.Tensor]:
            init = t.init if t.init is not None else feature_init(
                t.features[0] if len(t.features) == 1 else t.name, t.rows, t.width)
            return init.bind(seed) if isinstance(init, (SeededInit, ReshapedFeatureInit)) else init

        def common(t: TableSpec) -> dict:
            return {"name": t.name, "num_embeddings": t.rows, "embedding_dim": t.width,
                    "feature_names": list(t.features), "data_type": dt, "init_fn": init_fn(t)}

        if unpooled:
            ec = [EmbeddingConfig(**common(t)) for t in specs]
            self.tables = EmbeddingCollection(tables=ec, device=device)
        else:
            ebc = [EmbeddingBagConfig(**common(t), **({} if t.pooling is None else {"pooling": t.pooling}))
                   for t in specs]
            self.tables = EmbeddingBagCollection(tables=ebc, is_weighted=self.weighted, device=device)
        self._shared = any(len(t.features) > 1 for t in specs)  # see lookup()
        self._product_of = {t.name: t.product_of for t in specs}
        # The physical plan, kept here: after DMP ``self.tables`` is a sharded module without
        # the unsharded configs (repr, sizes and table_configs() read these).
        self._table_configs = list(
            self.tables.embedding_configs() if unpooled else self.tables.embedding_bag_configs())
        # Output keys of the pooled tables in their own (unsharded) order; a sharded EBC
        # groups them by sharding type, so combine selects by key (pooled_values()).
        self._physical_keys = [n for c in self._table_configs for n in c.feature_names]
        if self.dtype != "fp32":
            # torchrec's unsharded modules allocate fp16 for DataType.FP16 today; make sure.
            self.tables.to(TORCH_DTYPE[self.dtype])

    def check_budget(self) -> None:
        if self.budget_bytes is not None and self.memory_bytes() > self.budget_bytes:
            raise ValueError(
                f"{self.method_name}: built {format_bytes(self.memory_bytes())} which exceeds the budget "
                f"{format_bytes(self.budget_bytes)}"
            )

    @torch.no_grad()
    def scale_init(self, scale: float) -> None:
        """Multiply every vector the module returns by ``scale``, at initialisation
        (``embedding.init_scale``): each table by ``scale``, or by its root where rows of
        several tables multiply (``TableSpec.product_of``). Every combine is linear in a
        table's rows (a product of k tables is linear in each), so the output scales
        exactly. Methods with parameters of another kind override this."""
        for name, param in self.tables.named_parameters():
            table = name.split(".")[-2]
            param.mul_(scale ** (1.0 / self._product_of.get(table, 1)))

    # ---- the public face ------------------------------------------------------------
    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def output_dims(self) -> list[int]:
        return [self.dim] * len(self.features)

    def table_configs(self) -> list[EmbeddingBagConfig | EmbeddingConfig]:
        """The *physical* TorchRec tables (what the planner shards), from the module's own
        plan: also valid after DistributedModelParallel has sharded ``self.tables``."""
        return list(getattr(self, "_table_configs", ()))

    def feature_tables(self) -> dict[str, list[str]]:
        """Logical feature -> names of the physical tables it looks up (for planner
        constraints: TorchRec's ``ParameterConstraints`` are keyed by table name)."""
        out: dict[str, list[str]] = {}
        for c in self.table_configs():
            for pf in c.feature_names:
                logical = self._logical_of(pf)
                if c.name not in out.setdefault(logical, []):
                    out[logical].append(c.name)
        return out

    def _logical_of(self, physical_feature: str) -> str:
        """Logical feature of a physical one (methods name them ``f``, ``f@j``, ``f#p``)."""
        names = set(self.feature_names)
        if physical_feature in names:
            return physical_feature
        for sep in ("@", "#"):
            base = physical_feature.rsplit(sep, 1)[0]
            if base in names:
                return base
        return physical_feature

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
        if not is_tracing():
            self.check_input(features)
        elif not self.pipelineable and torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            raise NotImplementedError(
                f"{self.method_name} cannot be traced by fx, so it cannot run under TrainPipelineSparseDist "
                "(which traces the model): train it with TrainPipelineBase or a plain loop")
        if self.weighted and self.dtype != "fp32":
            # nn.EmbeddingBag wants per_sample_weights in the table dtype.
            features = KeyedJaggedTensor(
                keys=features.keys(), values=features.values(), lengths=features.lengths(),
                weights=features.weights().to(TORCH_DTYPE[self.dtype]), stride=features.stride())
        # No remap call for `full`: a module between the input and the tables would stop
        # TrainPipelineSparseDist (pipeline_postproc=False, its default) from pipelining them.
        remapped = features if isinstance(self.remap, IdentityRemap) else self.remap(features)
        if self.stateful_remap:
            remapped = run_in_forward(remapped)
        self.before_lookup()
        looked_up = self.lookup(remapped)
        if self.sequence:
            return self.combine_sequence(looked_up, features)
        return self.combine(looked_up, features)

    # ---- eager input checks (skipped under tracing / export: see is_tracing) -------------
    def check_input(self, features: KeyedJaggedTensor) -> None:
        """What an EmbeddingBagCollection would refuse, plus what this method cannot do:
        the weight flag, ids out of range (one reduction per batch), and a sharding the
        method does not support (first call after DMP, on every rank, before any collective)."""
        tables_id = id(getattr(self, "tables", None))
        if getattr(self, "_sharding_checked", None) != tables_id:  # again once DMP replaced the tables
            self.check_sharding()
            self._sharding_checked = tables_id
        if not self.sequence:
            has_w = features.weights_or_none() is not None
            if has_w != self.weighted:
                raise ValueError(
                    f"{self.method_name}: input KeyedJaggedTensor {'has' if has_w else 'has no'} per-id "
                    f"weights but the module was built with weighted={self.weighted} (build(..., "
                    "weighted=True) to use kjt.weights(), like EmbeddingBagCollection(is_weighted=True))"
                )
        self.check_ids(features)

    def id_bounds(self) -> list[int]:
        """Per logical feature, the exclusive upper bound of its ids (INT64_MAX: any id >= 0)."""
        return [f.cardinality if (self.bounded_ids and f.bounded) else INT64_MAX for f in self.features]

    def check_ids(self, features: KeyedJaggedTensor) -> None:
        """Ids in ``[0, bound)`` per feature; one reduction (and one host sync) per batch."""
        kjt = select_features(features, self.feature_names)
        values = kjt.values()
        if values.numel() == 0:
            return
        lpk = kjt.length_per_key()
        bounds = getattr(self, "_bounds_t", None)
        if bounds is None or bounds.device != values.device:
            bounds = self._bounds_t = torch.tensor(self.id_bounds(), dtype=torch.int64, device=values.device)
        upper = torch.repeat_interleave(bounds, torch.tensor(lpk, device=values.device),
                                        output_size=values.numel())
        bad = (values < 0) | (values >= upper)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            ends = torch.tensor(lpk).cumsum(0)
            f = int((ends <= i).sum())
            v, b = int(values[i]), self.id_bounds()[f]
            rule = "ids must be >= 0" if b == INT64_MAX else f"ids must be in [0, {b}) (its cardinality)"
            raise IdOutOfRange(
                f"{self.method_name}: feature {self.feature_names[f]!r} got id {v}: {rule}. Unbounded (raw, "
                "hashed) ids: declare the feature FeatureSpec(..., bounded=False)")

    def check_sharding(self) -> None:
        """Refuse a sharding the method cannot run under, naming what is missing. Runs at
        the first forward after DMP replaced ``self.tables``, on every rank, before any
        collective (the tables' forward is the first one)."""
        import torch.distributed as dist

        t = getattr(self, "tables", None)
        if t is None or not (dist.is_available() and dist.is_initialized()):
            return
        if type(t) in (EmbeddingBagCollection, EmbeddingCollection):
            if any(hasattr(p, "_in_backward_optimizers") for p in t.parameters()):
                # A fused (in-backward) optimizer is attached for DMP to fuse, but DMP left
                # the tables unsharded: no sharder for this kind; DDP would then crash in
                # backward (on CPU: "Cannot access accelerator device").
                kind = type(t).__name__
                raise RuntimeError(
                    f"{self.method_name}: its tables are a TorchRec {kind} that DistributedModelParallel "
                    f"left unsharded: the sharders passed to DMP have no {kind}Sharder. Pass "
                    "sharders=[EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()] (TorchRec's "
                    "default when sharders=None), or embtables.sharding.dmp.sharders()")
            return
        # The sharded module's own group (DMP may run on a subgroup), else the default one.
        world = getattr(getattr(t, "_env", None), "world_size", None) or dist.get_world_size()
        if not self.supports_multi_rank and world > 1:
            raise RuntimeError(
                f"{self.method_name} cannot run on {world} ranks: its remap keeps per-process state "
                "(admitted ids) outside the TorchRec tables, so the ranks' id maps would diverge; run it on "
                "one rank (DistributedModelParallel on a 1-process group works)")

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
        if type(t) not in (EmbeddingBagCollection, EmbeddingCollection) or is_tracing():
            return t(kjt)  # sharded (DMP), custom, or traced: TorchRec's own forward
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
                parts = torch.split(emb, lpk[key0:key0 + nf])
                for j, (n, e) in enumerate(zip(c.feature_names, parts, strict=True)):
                    seq[n] = JaggedTensor(values=e, lengths=lens[j * stride:(j + 1) * stride])
            key0, val0 = key0 + nf, val1
        if type(t) is EmbeddingCollection:
            return seq
        widths = [c.embedding_dim for c in cfgs for _ in c.feature_names]
        return KeyedTensor(keys=names, length_per_key=widths, values=torch.cat(pooled, dim=1))

    def before_lookup(self) -> None:
        """Hook between remap and lookup (``mch`` re-initialises evicted rows here: after
        the lookup, an in-place write would invalidate the weights autograd saved)."""

    def combine(self, pooled: KeyedTensor, features: KeyedJaggedTensor) -> KeyedTensor:
        """Physical pooled lookups -> one ``dim`` vector per logical feature."""
        return self._keyed(self.pooled_values(pooled))

    def pooled_values(self, pooled: KeyedTensor) -> torch.Tensor:
        """The tables' pooled output as [B, sum of widths], columns in the unsharded
        order (``_physical_keys``), selected by key: a sharded EBC returns its keys
        grouped by sharding type (table_wise, data_parallel, ...), not in table order."""
        if isinstance(pooled, LazyAwaitable):
            pooled = pooled.wait()
        keys = self._physical_keys
        if not isinstance(pooled, KeyedTensor):  # an fx Proxy (TorchRec's pipeline tracing)
            return permute_multi_embedding([pooled], [keys])[0]
        got = pooled.keys()
        if got == keys:
            return pooled.values()
        cache = self.__dict__.setdefault("_reorder", {})
        k = tuple(got)
        if k not in cache:
            lpk = dict(zip(got, pooled.length_per_key(), strict=True))
            start, c = {}, 0
            for name in got:
                start[name], c = c, c + lpk[name]
            cache[k] = torch.cat([torch.arange(start[n], start[n] + lpk[n]) for n in keys])
        values = pooled.values()
        idx = cache[k] = cache[k].to(values.device)
        return values.index_select(1, idx)

    def combine_sequence(
        self, seq: dict[str, JaggedTensor], features: KeyedJaggedTensor
    ) -> dict[str, JaggedTensor]:
        return seq

    def _keyed(self, values: torch.Tensor) -> KeyedTensor:
        """[B, F * dim] -> KeyedTensor with the logical keys."""
        return KeyedTensor(keys=self.feature_names, length_per_key=self.output_dims(), values=values)

    # ---- sizes ----------------------------------------------------------------------
    def table_bytes(self) -> int:
        if is_quantized(getattr(self, "tables", None)):  # served (export): what the storage holds
            return storage_bytes(self.tables)
        return sum(c.num_embeddings * c.embedding_dim for c in self.table_configs()) * DTYPE_BYTES[self.dtype]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Small parameters outside the TorchRec tables (data-parallel)."""
        tables = getattr(self, "tables", None)
        table_params = {id(p) for p in tables.parameters()} if tables is not None else set()
        return [p for n, p in self.named_parameters()
                if id(p) not in table_params and not n.startswith("tables.")]

    def buffer_bytes(self) -> int:
        """Remap buffers (e.g. an id->row map) count in memory_bytes(); the tables'
        own (sharded modules hold some) do not."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers()
                   if not n.startswith("tables."))

    def num_parameters(self) -> int:
        return sum(c.num_embeddings * c.embedding_dim for c in self.table_configs()) + sum(
            p.numel() for p in self.dense_parameters()
        )

    def dense_bytes(self) -> int:
        """Bytes of the parameters outside the TorchRec tables (``dense_parameters()``)."""
        return sum(p.numel() * p.element_size() for p in self.dense_parameters())

    def memory_bytes(self) -> int:
        return self.table_bytes() + self.dense_bytes() + self.buffer_bytes()

    def serving_bytes(self, dtype: str, row_alignment: int = DEFAULT_ROW_ALIGNMENT) -> int:
        """What ``memory_bytes()`` will be once the tables are served at ``dtype``
        (``quantize_tables``), from the table shapes: FBGEMM's padded rows and table blocks;
        dense parameters and remap buffers as they are."""
        tables = sum(table_storage_bytes(c.num_embeddings, c.embedding_dim, dtype, row_alignment)
                     for c in self.table_configs()) if self.has_tables else 0
        return tables + self.dense_bytes() + self.buffer_bytes()

    def extra_repr(self) -> str:
        return (f"method={self.method_name}, features={len(self.features)}, dim={self.dim}, "
                f"dtype={self.dtype}, bytes={format_bytes(self.memory_bytes())}")
