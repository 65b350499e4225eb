"""Logical feature specs: what a user's EmbeddingBagCollection looked like."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType


@dataclass(frozen=True)
class FeatureSpec:
    """One logical sparse feature.

    ``cardinality`` is the number of rows a one-row-per-id (``full``) table needs.
    ``bounded`` (the default) says ids lie in ``[0, cardinality)``: every method checks
    that in eager mode (``EmbeddingMethod.bounded_ids``), like an EmbeddingBagCollection.
    ``bounded=False`` (raw-mode data: arbitrary hashed ids) accepts any id >= 0; then
    ``cardinality`` only sizes the hashing methods (``full`` cannot take such a feature).
    """

    name: str
    cardinality: int
    pooling: PoolingType = PoolingType.SUM
    bounded: bool = True
    #: The TorchRec table this feature had in the module being replaced (set by
    #: ``features_from_configs`` for one-feature tables): ``full`` keeps that name, so its
    #: state_dict interchanges with the EBC's.
    table: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.cardinality < 1:
            raise ValueError(f"feature {self.name!r}: cardinality must be >= 1, got {self.cardinality}")


def features_from_schema(schema, include_sequences: bool = False) -> list[FeatureSpec]:
    """Feature specs for a dataset's categorical columns (``schema.json``)."""
    # Raw-mode ids are arbitrary unless the schema knows a bound (num_embeddings).
    feats = [FeatureSpec(c.name, int(c.table_rows), bounded=c.mode != "raw" or c.num_embeddings is not None)
             for c in schema.categorical]
    if include_sequences:
        feats += [FeatureSpec(s.name, int(s.table_rows)) for s in schema.sequences]
    return feats


def features_from_configs(configs: Iterable[EmbeddingBagConfig | EmbeddingConfig]) -> list[FeatureSpec]:
    """Feature specs from TorchRec table configs (one spec per feature name), so a
    user's ``EmbeddingBagCollection(tables=configs)`` can be swapped in one line."""
    out: list[FeatureSpec] = []
    for cfg in configs:
        pooling = getattr(cfg, "pooling", PoolingType.SUM)
        table = cfg.name if len(cfg.feature_names) == 1 else None
        for name in cfg.feature_names:
            out.append(FeatureSpec(name, int(cfg.num_embeddings), pooling, table=table))
    return out


def as_feature_specs(features) -> list[FeatureSpec]:
    """Accept FeatureSpecs, TorchRec configs, an EmbeddingBagCollection or a schema."""
    if hasattr(features, "embedding_bag_configs"):  # an EmbeddingBagCollection
        return features_from_configs(features.embedding_bag_configs())
    if hasattr(features, "embedding_configs"):  # an EmbeddingCollection
        return features_from_configs(features.embedding_configs())
    if hasattr(features, "categorical") and hasattr(features, "dense"):  # DatasetSchema
        return features_from_schema(features)
    features = list(features)
    if all(isinstance(f, FeatureSpec) for f in features):
        names = [f.name for f in features]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate feature names: {names}")
        return features
    if all(isinstance(f, (EmbeddingBagConfig, EmbeddingConfig)) for f in features):
        return features_from_configs(features)
    raise TypeError(
        "features must be FeatureSpecs, TorchRec EmbeddingBagConfigs/EmbeddingConfigs, "
        "an EmbeddingBagCollection or a DatasetSchema"
    )
