"""CTR models: pure nn.Modules returning logits, built on any embedding module."""

from embtables.models import dare, dcn, deepfm, din, dlrm, pooling  # noqa: F401  (register built-in models)
from embtables.models.registry import get_model, list_models, register_model

__all__ = ["get_model", "list_models", "register_model"]
