"""Model registry: ``@register_model("dlrm", DLRMConfig)`` on a builder function.

A builder is ``fn(cfg, schema, embedding: EmbeddingSection) -> nn.Module``; the module
is a pure ``nn.Module`` returning logits from ``forward(dense, sparse)`` and exposes
``embedding_modules() -> dict[str, EmbeddingMethod]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config_cls: type[BaseModel]
    builder: Callable


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, config_cls: type[BaseModel]):
    def deco(fn: Callable) -> Callable:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = ModelEntry(name, config_cls, fn)
        return fn

    return deco


def list_models() -> list[str]:
    import embtables.models  # noqa: F401  (registers the built-in models)

    return sorted(_MODELS)


def get_model(name: str) -> ModelEntry:
    import embtables.models  # noqa: F401

    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]
