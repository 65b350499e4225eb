"""Method registry: one file per method registers a name; `build` makes one."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from embtables.embeddings.budget import DTYPE_BYTES, resolve_budget
from embtables.embeddings.spec import FeatureSpec, as_feature_specs
from embtables.embeddings.table_init import module_seed

_METHODS: dict[str, type] = {}


def register(name: str):
    """Class decorator: ``@register("qr")`` makes the method buildable by name."""

    def deco(cls: type) -> type:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"embedding method {name!r} registered twice")
        cls.method_name = name
        _METHODS[name] = cls
        return cls

    return deco


def list_methods() -> list[str]:
    _import_builtin_methods()
    return sorted(_METHODS)


def get_method(name: str) -> type:
    _import_builtin_methods()
    if name not in _METHODS:
        raise ValueError(f"unknown embedding method {name!r}; valid methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def method_knobs(name: str) -> list[str]:
    """The method's own knobs: keyword-only arguments of its constructor."""
    cls = get_method(name)
    sig = inspect.signature(cls.__init__)
    base = set(getattr(cls, "BASE_ARGS", ()))
    return [p.name for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in base]


def knob_defaults(name: str) -> dict[str, Any]:
    """Knob -> default value (for docs and resolved configs)."""
    sig = inspect.signature(get_method(name).__init__)
    return {k: sig.parameters[k].default for k in method_knobs(name)}


def build(
    features,
    method: str = "full",
    dim: int | None = None,
    budget: float | int | str | None = None,
    dtype: str = "fp32",
    sequence: bool = False,
    device=None,
    weighted: bool | None = None,
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
    """
    cls = get_method(method)
    specs = as_feature_specs(features)
    if dim is None:
        dim = _dim_of(features)
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"embedding.dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if dim < 1 or dim % 4:
        raise ValueError(f"embedding.dim must be a positive multiple of 4 (FBGEMM kernels need it), got {dim}")
    valid = method_knobs(method)
    unknown = sorted(set(knobs) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown knob(s) {unknown} for embedding method {method!r}; valid knobs: {', '.join(valid) or '(none)'}"
        )
    if weighted is None:
        is_w = getattr(features, "is_weighted", None)
        weighted = bool(is_w()) if callable(is_w) else False
    budget_bytes = resolve_budget(budget, specs, dim)
    if weighted:
        if "weighted" not in inspect.signature(cls.__init__).parameters:
            raise ValueError(f"embedding method {method!r} does not support per-id weights (weighted=True)")
        knobs["weighted"] = True
    # One draw of the caller's RNG whatever the method builds (see table_init): the dense
    # layers a model builds next start from the same RNG state for every method.
    seed = module_seed()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(specs, dim=dim, budget_bytes=budget_bytes, dtype=dtype, sequence=sequence, device=device,
                   **knobs)


def plan(features, method: str = "full", dim: int | None = None, budget: float | int | str | None = None,
         dtype: str = "fp32", **knobs: Any):
    """What ``build`` would allocate, without building anything: the method's pure sizing
    function (rows/radices per feature, ``.bytes``, ``.num_parameters``). Errors like build."""
    cls = get_method(method)
    specs = as_feature_specs(features)
    dim = _dim_of(features) if dim is None else dim
    unknown = sorted(set(knobs) - set(method_knobs(method)))
    if unknown:
        raise ValueError(f"unknown knob(s) {unknown} for embedding method {method!r}; "
                         f"valid knobs: {', '.join(method_knobs(method)) or '(none)'}")
    fn = getattr(cls, "plan_fn", None)
    if fn is None:
        raise ValueError(f"embedding method {method!r} has no sizing function (plan_fn)")
    sizing = {k: v for k, v in knobs.items() if k in inspect.signature(fn).parameters}
    return fn(specs, dim, resolve_budget(budget, specs, dim), dtype, **sizing)


DEFAULT_DIM = 16


def _dim_of(features) -> int:
    """``dim`` of the EBC/configs being replaced (all tables must agree), else 16."""
    if hasattr(features, "embedding_bag_configs"):
        configs = features.embedding_bag_configs()
    elif hasattr(features, "embedding_configs"):
        configs = features.embedding_configs()
    else:
        configs = [f for f in features if hasattr(f, "embedding_dim")] if isinstance(features, (list, tuple)) else []
    dims = sorted({int(c.embedding_dim) for c in configs})
    if len(dims) > 1:
        raise ValueError(f"the tables being replaced have several widths {dims}; every method outputs one `dim` "
                         "per feature, so pass dim= explicitly")
    return dims[0] if dims else DEFAULT_DIM


def _import_builtin_methods() -> None:
    from embtables.embeddings import load_methods

    load_methods()


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
        rows.append(f"| `{name}` | {yes(c.pooled)} | {yes(c.sequence)} | {yes(c.weighted)} | {types[0]}; {types[1]} "
                    f"| {yes(c.pipelined)} | {yes(c.multi_rank)} | {yes(c.fx_traceable)} | {yes(c.exportable)} "
                    f"| {ids} |")
    return "\n".join(rows) + "\n"
