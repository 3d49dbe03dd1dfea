"""Quantized KV storage (issue 5): fewer bits per kept token, composable with any eviction method.

Each scheme is a `KVStore` (storage/stores.py protocol) held by a plain `CompressedLayer`: `KIVIStore`,
`GEARStore`, `MixedPrecisionStore` (MiKV, ZipCache). A scheme's `layer_factory` for `CompressedCache` builds such
layers; the cache's method still decides which tokens are kept (or, over mixed precision, which are held at
high precision):

    CompressedCache(model, SnapKV(compression_ratio=0.75), layer_factory=kivi(2))  # SnapKV keeps 1/4, at 2 bits
    CompressedCache(model, None, layer_factory=gear(4))                              # GEAR only
    CompressedCache(model, MiKV(inner=H2O(compression_ratio=0.8)), layer_factory=mikv(8, 2))  # H2O's 20% at 8, rest 2
    CompressedCache(model, ZipCacheSaliency(compression_ratio=0.5), layer_factory=zipcache(4, 2))

(`MiKV`, `ZipCacheSaliency`: `kvsqueeze.methods`.) `parse_quant("kivi-2")` turns the CLI's `--quant` spec into a
`QuantSpec` (its layer factory, and which importance rule the scheme's paper pairs it with);
`kvsqueeze.methods.for_storage(method, spec)` composes a method with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import KVSqueezeError
from .base import QuantStore
from .gear import GEARStore, gear
from .kivi import KIVIStore, kivi, kivi_bytes_per_token
from .mikv import MixedPrecisionStore, mikv, mixed
from .zipcache import zipcache

SCHEMES = {
    "kivi": "kivi-<bits>: KIVI, keys per channel / values per token, <bits> in 1,2,4,8, residual 32 tokens",
    "gear": "gear-<bits>: GEAR, KIVI-style <bits> quantization + rank d/32 residual + 2% sparse outliers",
    "mikv": "mikv-<hi>-<lo>: MiKV, the method's kept tokens at <hi> bits (16: unquantized), its evicted ones at <lo>",
    "zipcache": "zipcache-<hi>-<lo>: ZipCache, salient tokens at <hi> bits, others <lo> (salient: normalised probe "
                "attention, or the scores of the --method given)",
}


@dataclass
class QuantSpec:
    """A parsed `--quant` scheme: its name ("kivi-2"), the `layer_factory` for `CompressedCache`, and the
    importance rule its paper pairs with it (None, "mikv" or "zipcache": mixed-precision storage, whose split a
    method's scores drive; `kvsqueeze.methods.for_storage` composes a method with the scheme)."""

    name: str
    layer_factory: Callable
    importance: str | None = None

    @property
    def mixed_precision(self) -> bool:
        """Whether the storage keeps every token, split into high and low precision by the method's scores."""
        return self.importance is not None


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
    if name == "kivi":
        (b,) = _ints(rest, 1, spec) if rest else [2]
        _check(spec, b, (1, 2, 4, 8))
        return QuantSpec(spec, kivi(b))
    if name == "gear":
        (b,) = _ints(rest, 1, spec) if rest else [4]
        _check(spec, b, (1, 2, 4, 8))
        return QuantSpec(spec, gear(b))
    if name == "mikv":
        hi, lo = _ints(rest, 2, spec) if rest else [8, 2]
        _check(spec, hi, (2, 4, 8, 16))
        _check(spec, lo, (1, 2, 4, 8))
        return QuantSpec(spec, mikv(hi, lo), "mikv")
    if name == "zipcache":
        hi, lo = _ints(rest, 2, spec) if rest else [4, 2]
        _check(spec, hi, (2, 4, 8, 16))
        _check(spec, lo, (1, 2, 4, 8))
        return QuantSpec(spec, zipcache(hi, lo), "zipcache")
    raise KVSqueezeError(f"unknown --quant scheme {spec!r}; choose from: none, " + "; ".join(SCHEMES.values()))


def _check(spec, b, allowed):
    if b not in allowed:
        raise KVSqueezeError(f"--quant {spec!r}: {b} bits is not supported here (choose from {allowed})")


__all__ = [
    "GEARStore", "KIVIStore", "MixedPrecisionStore", "QuantSpec", "QuantStore", "SCHEMES", "gear", "kivi",
    "kivi_bytes_per_token", "mikv", "mixed", "parse_quant", "zipcache",
]
