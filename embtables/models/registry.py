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

from embtables.registry import Registry


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config_cls: type[BaseModel]
    builder: Callable


MODELS: Registry[ModelEntry] = Registry("model")


def register_model(name: str, config_cls: type[BaseModel]):
    def deco(fn: Callable) -> Callable:
        MODELS.add(name, ModelEntry(name, config_cls, fn))
        return fn

    return deco


def list_models() -> list[str]:
    return MODELS.names()


def get_model(name: str) -> ModelEntry:
    return MODELS.get(name)
