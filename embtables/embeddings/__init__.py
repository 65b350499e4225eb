"""Embedding methods: remap -> TorchRec tables -> combine. See DESIGN.md."""

import importlib.util

# Importing a method file registers its name.
from embtables.embeddings import dhe, full, hash, hybrid, mch, mde, qr, tt, unified  # noqa: F401
from embtables.embeddings.base import EmbeddingMethod
from embtables.embeddings.budget import (
    BudgetTooSmall,
    format_bytes,
    full_bytes,
    parse_bytes,
    resolve_budget,
    split_budget,
)
from embtables.embeddings.full import plan_full
from embtables.embeddings.hash import plan_hash
from embtables.embeddings.mch import plan_mch
from embtables.embeddings.qr import plan_qr
from embtables.embeddings.registry import (
    build,
    get_method,
    knob_defaults,
    list_methods,
    method_knobs,
    plan,
    register,
)
from embtables.embeddings.spec import FeatureSpec, features_from_configs, features_from_schema
from embtables.embeddings.unified import plan_unified

__all__ = [
    "BudgetTooSmall", "EmbeddingMethod", "FeatureSpec", "build", "features_from_configs", "features_from_schema",
    "format_bytes", "full_bytes", "get_method", "knob_defaults", "list_methods", "method_knobs", "parse_bytes",
    "plan", "plan_full", "plan_hash", "plan_mch", "plan_qr", "plan_unified", "register", "resolve_budget", "split_budget",
]

# Methods added by other work streams register on import too, once their file exists
# (optembed.py); find_spec keeps this package importable before that.
if importlib.util.find_spec("embtables.embeddings.optembed") is not None:
    from embtables.embeddings import optembed  # noqa: F401,E402
