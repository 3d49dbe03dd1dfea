"""Storage: the kept KV slots of each layer and the bytes they hold. Knows neither methods nor models."""

from .layer import CompressedLayer
from .stats import CacheStats

__all__ = ["CacheStats", "CompressedLayer"]
