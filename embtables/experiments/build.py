"""From config sections to modules."""

from __future__ import annotations

from embtables.embeddings import build, features_from_schema


def build_embedding(embedding_cfg, schema, *, device=None, sequence: bool = False, features=None, method=None,
                    dim=None, budget=None):
    """Build the configured embedding method over the dataset's categorical features
    (or ``features`` when a model builds several modules, as DARE does)."""
    method = method or embedding_cfg.method
    feats = features if features is not None else features_from_schema(schema)
    return build(
        feats,
        method=method,
        dim=dim or embedding_cfg.dim,
        budget=embedding_cfg.budget if budget is None else budget,
        dtype=embedding_cfg.dtype,
        sequence=sequence,
        device=device,
        **embedding_cfg.knobs(method),
    )


def build_model(cfg, schema, device=None):
    from embtables.models import get_model

    entry = get_model(cfg.model.name)
    return entry.builder(cfg.model.knobs(), schema, cfg.embedding, device=device)
