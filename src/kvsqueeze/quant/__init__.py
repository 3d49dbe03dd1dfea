"""Quantized KV storage (issue 5): fewer bits per kept token, composable with any eviction method."""

from .base import QuantizedLayer
from .kivi import KIVILayer, kivi

__all__ = ["KIVILayer", "QuantizedLayer", "kivi"]
