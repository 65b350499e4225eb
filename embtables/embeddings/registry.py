"""Method registry: one file per method registers a name; `build` makes one."""

from __future__ import annotations

import inspect
from typing import Any

from embtables.embeddings.budget import DTYPE_BYTES, resolve_budget
from embtables.embeddings.spec import as_feature_specs

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
    return [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def build(
    features,
    method: str = "full",
    dim: int = 16,
    budget: float | int | str | None = None,
    dtype: str = "fp32",
    sequence: bool = False,
    device=None,
    **knobs: Any,
):
    """Build an embedding module.

    ``features``: FeatureSpecs, TorchRec EmbeddingBagConfigs, an EmbeddingBagCollection
    or a dataset schema. The result has the face of an ``EmbeddingBagCollection``
    (``sequence=False``: KJT -> KeyedTensor) or of an ``EmbeddingCollection``
    (``sequence=True``: KJT -> dict[str, JaggedTensor]), ``dim`` wide per feature.
    """
    cls = get_method(method)
    specs = as_feature_specs(features)
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
    budget_bytes = resolve_budget(budget, specs, dim)
    return cls(specs, dim=dim, budget_bytes=budget_bytes, dtype=dtype, sequence=sequence, device=device, **knobs)


def _import_builtin_methods() -> None:
    # Importing the package registers every built-in method file.
    import embtables.embeddings  # noqa: F401
