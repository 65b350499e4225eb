"""Model registry: ``@register_model("dlrm", DLRMConfig)`` on a builder function.

A builder is ``fn(cfg, schema, make_embedding: MakeEmbedding, device=None) -> nn.Module``:
it calls ``make_embedding`` (``embtables.embeddings.factory``) for each embedding module
it needs and never sees the experiment's ``embedding:`` section. The module is a pure
``nn.Module`` returning logits from ``forward(dense, sparse)`` and exposes
``embedding_modules() -> dict[str, EmbeddingMethod]``. Importing this module imports the
package, whose ``__init__`` registers the built-in models.
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
    return sorted(_MODELS)


def get_model(name: str) -> ModelEntry:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]
