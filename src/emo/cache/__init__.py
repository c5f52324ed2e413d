"""The HDF5 feature cache: pooled stage features with labels, split and provenance."""

from emo.cache.reader import FeatureCache
from emo.cache.schema import SCHEMA_VERSION

__all__ = ["FeatureCache", "SCHEMA_VERSION"]
