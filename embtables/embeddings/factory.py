"""The type a model builder receives to make its embedding modules.

Models never read the experiment's ``embedding:`` section: the experiment layer binds
method, budget, dtype, knobs and device into a :class:`MakeEmbedding`, and a model
calls it once per module it needs (DIN: a sequence module for the behaviours and a
pooled one for the context; DARE: two sequence modules). This is TorchRec's
``SparseArch(embedding_bag_collection)`` pattern, with a factory where a model needs
more than one module or a module of its own width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from embtables.embeddings.base import EmbeddingMethod
from embtables.embeddings.spec import FeatureSpec


class MakeEmbedding(Protocol):
    def __call__(
        self,
        features: Sequence[FeatureSpec],
        *,
        sequence: bool = False,
        method: str | None = None,
        dim: int | None = None,
        budget: float | int | str | None = None,
        share: float | None = None,
    ) -> EmbeddingMethod:
        """One embedding module over ``features``: pooled (``EmbeddingBagCollection``'s
        face) or ``sequence`` (``EmbeddingCollection``'s). ``method``, ``dim`` and
        ``budget`` override the bound ones for this module (DARE's attention table);
        None keeps them. ``share`` (instead of ``budget``) gives the module that fraction
        of the bound budget in bytes, resolved against ``features`` at the bound width, so
        two modules with shares summing to 1 hold what one module would (DARE at DIN's
        memory)."""
        ...
