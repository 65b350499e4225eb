"""Embedding methods: remap -> TorchRec tables -> combine. See DESIGN.md.

The package loads lazily (PEP 562): ``from embtables.embeddings import build`` imports
the method files (which register their names) on first use, while importing a torch-free
submodule such as ``embtables.embeddings.budget`` or ``.cli`` loads no torch, torchrec or
FBGEMM -- so ``embtables --help`` and ``embtables doctor`` work when FBGEMM does not load.
"""

import importlib
import importlib.util

# Importing a method file registers its name. Methods added later register the same
# way once their file exists (find_spec keeps the package importable before that).
BUILTIN_METHODS = ("full", "hash", "mch", "qr", "unified", "optembed", "dhe", "mde", "tt")

_EXPORTS = {
    "EmbeddingMethod": "base",
    "BudgetTooSmall": "budget", "format_bytes": "budget", "full_bytes": "budget", "parse_bytes": "budget",
    "resolve_budget": "budget", "split_budget": "budget",
    "plan_full": "full", "plan_hash": "hash", "plan_mch": "mch", "plan_qr": "qr", "plan_unified": "unified",
    "build": "registry", "get_method": "registry", "knob_defaults": "registry", "list_methods": "registry",
    "method_knobs": "registry", "plan": "registry", "register": "registry",
    "FeatureSpec": "spec", "features_from_configs": "spec", "features_from_schema": "spec",
}

__all__ = sorted(_EXPORTS)


def load_methods() -> None:
    """Import every built-in method file (registering its name)."""
    for name in BUILTIN_METHODS:
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:
            importlib.import_module(f"{__name__}.{name}")


def __getattr__(name: str):
    if name in BUILTIN_METHODS and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # `embtables.embeddings.qr` as an attribute
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    load_methods()
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
