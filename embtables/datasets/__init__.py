"""Data path: raw files -> Parquet parts + schema.json -> torchrec Batches."""

from embtables.datasets.schema import CategoricalFeature, DatasetSchema, SequenceFeature, load_schema

__all__ = ["CategoricalFeature", "DatasetSchema", "SequenceFeature", "load_schema"]
