"""Quantized KV storage (issue 5): fewer bits per kept token, composable with any eviction method.

A scheme is a `layer_factory` for `CompressedCache`; the cache's method still decides which tokens are kept:

    CompressedCache(model, SnapKV(ratio=0.75), layer_factory=kivi(2))     # SnapKV keeps 1/4, stored at 2 bits
    CompressedCache(model, None, layer_factory=gear(4))                   # GEAR only
    CompressedCache(model, MiKV(inner=H2O(ratio=0.8)), layer_factory=mikv(8, 2))  # H2O's 20% at 8 bits, rest 2
    CompressedCache(model, ZipCacheSaliency(ratio=0.5), layer_factory=zipcache(4, 2))

`parse_quant("kivi-2")` turns the CLI's `--quant` spec into a factory and the method wrapping the scheme needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import KVSqueezeError
from .base import QuantizedLayer
from .gear import GEARLayer, gear
from .kivi import KIVILayer, kivi, kivi_bytes_per_token
from .mikv import MiKV, MixedPrecisionLayer, mikv, mixed
from .zipcache import ZipCacheSaliency, zipcache

SCHEMES = {
    "kivi": "kivi-<bits>: KIVI, keys per channel / values per token, <bits> in 1,2,4,8, residual 32 tokens",
    "gear": "gear-<bits>: GEAR, KIVI-style <bits> quantization + rank d/32 residual + 2% sparse outliers",
    "mikv": "mikv-<hi>-<lo>: MiKV, the method's kept tokens at <hi> bits (16: unquantized), its evicted ones at <lo>",
    "zipcache": "zipcache-<hi>-<lo>: ZipCache, salient tokens (normalised probe attention) at <hi> bits, others <lo>",
}


@dataclass
class QuantSpec:
    name: str
    layer_factory: Callable
    wrap: Callable  # method -> the method the cache runs (MiKV wraps it; ZipCache replaces its scores)

    def method(self, method):
        return self.wrap(method)


def _ints(parts: list[str], n: int, spec: str) -> list[int]:
    if len(parts) != n:
        raise KVSqueezeError(f"--quant {spec!r}: expected {n} bit width(s); see the SCHEMES list")
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise KVSqueezeError(f"--quant {spec!r}: bit widths must be integers") from None


def parse_quant(spec: str | None) -> QuantSpec | None:
    """'none' -> None; 'kivi-2', 'kivi-4', 'gear-4', 'mikv-8-2', 'zipcache-4-2' -> QuantSpec."""
    if spec is None or spec.lower() in ("", "none", "full", "fp16"):
        return None
    name, *rest = spec.lower().split("-")
    same = lambda m: m  # noqa: E731
    if name == "kivi":
        (b,) = _ints(rest, 1, spec) if rest else [2]
        _check(spec, b, (1, 2, 4, 8))
        return QuantSpec(spec, kivi(b), same)
    if name == "gear":
        (b,) = _ints(rest, 1, spec) if rest else [4]
        _check(spec, b, (1, 2, 4, 8))
        return QuantSpec(spec, gear(b), same)
    if name == "mikv":
        hi, lo = _ints(rest, 2, spec) if rest else [8, 2]
        _check(spec, hi, (2, 4, 8, 16))
        _check(spec, lo, (1, 2, 4, 8))
        return QuantSpec(spec, mikv(hi, lo), lambda m: m if isinstance(m, MiKV) else MiKV(inner=m) if m else MiKV())
    if name == "zipcache":
        hi, lo = _ints(rest, 2, spec) if rest else [4, 2]
        _check(spec, hi, (2, 4, 8, 16))
        _check(spec, lo, (1, 2, 4, 8))

        def wrap(m):
            if isinstance(m, ZipCacheSaliency):
                return m
            if m is None:
                return ZipCacheSaliency(ratio=0.5)
            return ZipCacheSaliency(ratio=m.ratio, budget=m.budget, exempt_layers=m.exempt_layers)

        return QuantSpec(spec, zipcache(hi, lo), wrap)
    raise KVSqueezeError(f"unknown --quant scheme {spec!r}; choose from: none, " + "; ".join(SCHEMES.values()))


def _check(spec, b, allowed):
    if b not in allowed:
        raise KVSqueezeError(f"--quant {spec!r}: {b} bits is not supported here (choose from {allowed})")


__all__ = [
    "GEARLayer", "KIVILayer", "MiKV", "MixedPrecisionLayer", "QuantSpec", "QuantizedLayer", "SCHEMES",
    "ZipCacheSaliency", "gear", "kivi", "kivi_bytes_per_token", "mikv", "mixed", "parse_quant",
    "zipcache",
]
