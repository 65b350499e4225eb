"""Embedding methods: remap -> TorchRec tables -> combine. See DESIGN.md."""

from embtables.embeddings import full  # noqa: F401  (registers "full")
from embtables.embeddings.base import EmbeddingMethod
from embtables.embeddings.budget import format_bytes, full_bytes, parse_bytes, resolve_budget
from embtables.embeddings.registry import build, get_method, list_methods, method_knobs, register
from embtables.embeddings.spec import FeatureSpec, features_from_configs, features_from_schema

__all__ = [
    "EmbeddingMethod", "FeatureSpec", "build", "features_from_configs", "features_from_schema", "format_bytes",
    "full_bytes", "get_method", "list_methods", "method_knobs", "parse_bytes", "register", "resolve_budget",
]
