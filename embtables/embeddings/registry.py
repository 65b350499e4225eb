"""Method registry: one file per method registers its class, its knobs model and its pure
sizing function; ``build`` makes one, ``plan`` sizes one without building it."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from embtables.embeddings import BUILTIN_METHODS
from embtables.embeddings.budget import DTYPE_BYTES, resolve_budget
from embtables.embeddings.spec import FeatureSpec, as_feature_specs
from embtables.embeddings.table_init import module_seed
from embtables.registry import Registry


class Knobs(BaseModel):
    """A method's knobs: what goes under ``embedding.<method>:`` in a config and into
    ``build(..., **knobs)``. Unknown knobs and wrong values are refused here, once, with
    the key path; choices are ``Literal`` types. The config reference is generated from
    these models (defaults and descriptions)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The knobs the method's sizing function takes (None: all of them).
    SIZING: ClassVar[tuple[str, ...] | None] = None

    def values(self) -> dict[str, Any]:
        """Knob -> validated value, defaults filled in (the constructor's keywords)."""
        return {name: getattr(self, name) for name in type(self).model_fields}

    def sizing(self) -> dict[str, Any]:
        """The knobs the sizing function takes (``SIZING``)."""
        names = type(self).model_fields if self.SIZING is None else self.SIZING
        return {name: getattr(self, name) for name in names}


class NoKnobs(Knobs):
    """A method without knobs (``full``)."""


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its class, its knobs model and its pure sizing function
    ``plan(features, dim, budget_bytes, dtype, **sizing knobs)`` (None: it has none)."""

    name: str
    cls: type
    knobs: type[Knobs]
    plan: Callable[..., Any] | None


METHODS: Registry[MethodEntry] = Registry(
    "embedding method", "methods", builtins=tuple(f"embtables.embeddings.{m}" for m in BUILTIN_METHODS))


def register(name: str, knobs: type[Knobs] = NoKnobs, plan: Callable[..., Any] | None = None):
    """Class decorator: ``@register("qr", knobs=QRKnobs, plan=plan_qr)`` makes the method
    buildable by name, with those knobs and that sizing function."""

    def deco(cls: type) -> type:
        METHODS.add(name, MethodEntry(name, cls, knobs, plan))
        cls.method_name = name
        return cls

    return deco


def list_methods() -> list[str]:
    return METHODS.names()


def get_method(name: str) -> type:
    return METHODS.get(name).cls


def knobs_model(name: str) -> type[Knobs]:
    """The pydantic model of method ``name``'s knobs."""
    return METHODS.get(name).knobs


def method_knobs(name: str) -> list[str]:
    """The method's knobs, in the order its knobs model declares them."""
    return list(knobs_model(name).model_fields)


def knob_defaults(name: str) -> dict[str, Any]:
    """Knob -> default value (for docs and resolved configs)."""
    return {k: f.get_default(call_default_factory=True) for k, f in knobs_model(name).model_fields.items()}


def validate_knobs(model: type[BaseModel], knobs: Mapping[str, Any], key: str) -> BaseModel:
    """``model`` validated from ``knobs``; a ValueError naming each wrong knob by its key
    path (``embedding.qr.operation``) and listing the valid knobs for an unknown one."""
    try:
        return model.model_validate(dict(knobs))
    except ValidationError as e:
        raise ValueError(knob_error(e, key, list(model.model_fields))) from None


def knob_error(err: ValidationError, key: str, valid: list[str]) -> str:
    """One message for a knobs model's ValidationError under config key ``key``."""
    unknown = sorted(str(e["loc"][0]) for e in err.errors() if e["type"] == "extra_forbidden")
    if unknown:
        return f"unknown knob(s) {unknown} at {key}; valid knobs: {', '.join(valid) or '(none)'}"
    parts = []
    for e in err.errors():
        loc = ".".join([key, *(str(p) for p in e["loc"])])
        msg = e["msg"].removeprefix("Value error, ")
        got = "" if e["type"] in ("value_error", "missing") else f" (got {e['input']!r})"
        parts.append(f"{loc}: {msg}{got}")
    return "; ".join(parts)


def build(
    features,
    method: str = "full",
    dim: int | None = None,
    budget: float | int | str | None = None,
    dtype: str = "fp32",
    sequence: bool = False,
    device=None,
    weighted: bool | None = None,
    init_scale: float = 1.0,
    **knobs: Any,
):
    """Build an embedding module.

    ``features``: FeatureSpecs, TorchRec EmbeddingBagConfigs, an EmbeddingBagCollection
    or a dataset schema. The result has the face of an ``EmbeddingBagCollection``
    (``sequence=False``: KJT -> KeyedTensor) or of an ``EmbeddingCollection``
    (``sequence=True``: KJT -> dict[str, JaggedTensor]), ``dim`` wide per feature.
    ``dim`` defaults to the width of the EBC/configs passed as ``features`` (else 16).
    ``weighted`` mirrors ``EmbeddingBagCollection(is_weighted=...)``: pool with
    ``kjt.weights()``; None takes it from an EBC passed as ``features``, else False.
    ``init_scale`` multiplies every vector the module returns at initialisation (the
    method's ``scale_init``; 1: the method's own init).
    ``knobs`` are the method's (its knobs model: ``knobs_model(method)``).
    """
    entry = METHODS.get(method)
    specs = as_feature_specs(features)
    if dim is None:
        dim = _dim_of(features)
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"embedding.dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if dim < 1 or dim % 4:
        raise ValueError(f"embedding.dim must be a positive multiple of 4 (FBGEMM kernels need it), "
                         f"got {dim}")
    checked = validate_knobs(entry.knobs, knobs, f"embedding.{method}")
    if weighted is None:
        is_w = getattr(features, "is_weighted", None)
        weighted = bool(is_w()) if callable(is_w) else False
    budget_bytes = resolve_budget(budget, specs, dim)
    # One draw of the caller's RNG whatever the method builds (see table_init): the dense
    # layers a model builds next start from the same RNG state for every method.
    seed = module_seed()
    if not (isinstance(init_scale, (int, float)) and math.isfinite(init_scale) and init_scale > 0):
        raise ValueError(f"embedding.init_scale must be a positive number, got {init_scale!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = entry.cls(specs, dim=dim, budget_bytes=budget_bytes, dtype=dtype, sequence=sequence,
                           device=device, weighted=weighted, **checked.values())
    if init_scale != 1:
        module.scale_init(float(init_scale))
    return module


def plan(features, method: str = "full", dim: int | None = None, budget: float | int | str | None = None,
         dtype: str = "fp32", **knobs: Any):
    """What ``build`` would allocate, without building anything: the method's pure sizing
    function (rows/radices per feature, ``.bytes``, ``.num_parameters``). Errors like build."""
    entry = METHODS.get(method)
    specs = as_feature_specs(features)
    dim = _dim_of(features) if dim is None else dim
    checked = validate_knobs(entry.knobs, knobs, f"embedding.{method}")
    if entry.plan is None:
        raise ValueError(f"embedding method {method!r} has no sizing function (register(..., plan=))")
    return entry.plan(specs, dim, resolve_budget(budget, specs, dim), dtype, **checked.sizing())


DEFAULT_DIM = 16


def _dim_of(features) -> int:
    """``dim`` of the EBC/configs being replaced (all tables must agree), else 16."""
    if hasattr(features, "embedding_bag_configs"):
        configs = features.embedding_bag_configs()
    elif hasattr(features, "embedding_configs"):
        configs = features.embedding_configs()
    else:
        configs = ([f for f in features if hasattr(f, "embedding_dim")]
                   if isinstance(features, (list, tuple)) else [])
    dims = sorted({int(c.embedding_dim) for c in configs})
    if len(dims) > 1:
        raise ValueError(f"the tables being replaced have several widths {dims}; every method outputs one "
                         "`dim` per feature, so pass dim= explicitly")
    return dims[0] if dims else DEFAULT_DIM


def support_table() -> str:
    """Markdown table of what each registered method supports in TorchRec's stack, from
    the methods' capability declarations (docs/torchrec.md embeds it; a test keeps the
    page equal to this, and the conformance suite checks every row)."""
    def yes(b: bool) -> str:
        return "yes" if b else "no"

    rows = ["| method | pooled | sequence | weighted | sharding types on CPU (pooled; sequence) | pipelined "
            "| multi-rank | fx trace | torch.export | ids |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    probe = [FeatureSpec("a", 1000), FeatureSpec("b", 50)]
    for name in list_methods():
        cls = get_method(name)
        c = cls.capabilities()
        types = []
        for seq, ok in ((False, c.pooled), (True, c.sequence)):
            if not (ok and c.has_tables):
                types.append("-" if not ok else "data-parallel (no tables)")
                continue
            try:  # the table kind can depend on knobs (qr's default mult looks ids up unpooled)
                types.append(", ".join(build(probe, method=name, dim=8, sequence=seq).sharding_types("cpu")))
            except ValueError:
                types.append("see the method's docs (needs knobs to build)")
        ids = "`[0, cardinality)`" if c.bounded_ids else "any id >= 0"
        rows.append(f"| `{name}` | {yes(c.pooled)} | {yes(c.sequence)} | {yes(c.weighted)} "
                    f"| {types[0]}; {types[1]} | {yes(c.pipelined)} | {yes(c.multi_rank)} "
                    f"| {yes(c.fx_traceable)} | {yes(c.exportable)} | {ids} |")
    return "\n".join(rows) + "\n"
