"""Embedding methods: remap -> TorchRec tables -> combine. See DESIGN.md.

The package loads lazily (PEP 562): ``from embtables.embeddings import build`` imports
the method files (which register their names) on first use, while importing a torch-free
submodule such as ``embtables.embeddings.budget`` or ``.cli`` loads no torch, torchrec or
FBGEMM -- so ``embtables --help`` and ``embtables doctor`` work when FBGEMM does not load.
"""

import importlib

# Importing a method file registers its name; a new method file adds its name here.
BUILTIN_METHODS = ("full", "hash", "mch", "qr", "unified", "optembed", "dhe", "mde", "tt", "hybrid")

_EXPORTS = {
    "EmbeddingMethod": "base", "TableSpec": "base",
    "BudgetTooSmall": "budget", "format_bytes": "budget", "full_bytes": "budget", "parse_bytes": "budget",
    "resolve_budget": "budget", "split_budget": "budget",
    "plan_full": "full", "plan_hash": "hash", "plan_mch": "mch", "plan_qr": "qr", "plan_unified": "unified",
    "Knobs": "registry", "build": "registry", "get_method": "registry", "knob_defaults": "registry",
    "knobs_model": "registry", "list_methods": "registry", "method_knobs": "registry", "plan": "registry",
    "register": "registry",
    "FeatureSpec": "spec", "features_from_configs": "spec", "features_from_schema": "spec",
}

__all__ = sorted(_EXPORTS)


def load_methods() -> None:
    """Import every built-in method file (registering its name)."""
    for name in BUILTIN_METHODS:
        importlib.import_module(f"{__name__}.{name}")


def __getattr__(name: str):
    if name in BUILTIN_METHODS:
        # `embtables.embeddings.qr` as an attribute
        return importlib.import_module(f"{__name__}.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    load_methods()
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
