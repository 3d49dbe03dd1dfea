"""MiKV's importance rule (Yang et al., 2024, "No Token Left Behind: Reliable KV Cache Compression via
Importance-Aware Mixed Precision Quantization"), and the wrapper that composes any method with mixed-precision
storage. The storage (which tokens are held at which bit width) is `kvsqueeze.quant.mikv.MixedPrecisionStore`.

Over a mixed-precision store the runtime calls the store's split instead of an eviction: the method's top
`n_keep` tokens are held at high precision, the others (those it would evict) at low precision. MiKV's rule is
H2O's accumulated attention by default (the paper's policy); any method can be wrapped (`MiKV(inner=SnapKV())`).
The runtime also feeds MiKV's query/key channel balancer (`MixedPrecisionStore.balance_keys`) with the prefill
queries before the split; the wrapper holds no storage code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import Delegating, Method


class _Delegating(Delegating):
    """Mixin for a `Method` dataclass with an `inner: Method` field: budget fields and scores are those of `inner`
    (a wrapper naming what the storage does with them)."""

    delegate = "inner"

    def _default_inner(self) -> Method:
        raise NotImplementedError

    def __post_init__(self):
        if self.inner is None:
            self.inner = self._default_inner()
        self.compression_ratio, self.budget = self.inner.compression_ratio, self.inner.budget
        self.exempt_layers, self.compression_interval = self.inner.exempt_layers, self.inner.compression_interval
        super().__post_init__()

    def n_keep(self, n_seen, layer_idx, n_layers):
        return self.inner.n_keep(n_seen, layer_idx, n_layers)


@dataclass(kw_only=True)
class MiKV(_Delegating, Method):
    """Wraps an eviction method (default: H2O with this wrapper's compression_ratio, budget, exempt layers and
    compression_interval, the paper's policy): its scores pick the high-precision tokens (`n_keep` of them) of a
    mixed-precision store instead of the kept ones. Budget fields come from `inner`."""

    inner: Method = field(default=None)

    name = "mikv"
    summary = "mixed precision: tokens a method would evict kept at low bits (use with --quant mikv-<hi>-<lo>)"

    def _default_inner(self) -> Method:
        from .h2o import H2O

        return H2O(compression_ratio=self.compression_ratio, budget=self.budget, exempt_layers=self.exempt_layers,
                   compression_interval=self.compression_interval)

    def describe(self) -> str:
        return f"mikv[{self.inner.describe()}]"


@dataclass(kw_only=True)
class PrecisionSplit(_Delegating, Method):
    """`inner`'s scores pick the high-precision tokens of a mixed-precision storage `scheme` (e.g. a ZipCache
    store with SnapKV's scores). Budget fields come from `inner`; `describe()` names both."""

    inner: Method = field(default=None)
    scheme: str = ""

    name = "precision_split"
    summary = "a method's scores pick the high-precision tokens of mixed-precision storage"

    def _default_inner(self) -> Method:
        from ..errors import KVSqueezeError

        raise KVSqueezeError("PrecisionSplit needs the method whose scores pick the high-precision tokens (inner=)")

    def describe(self) -> str:
        return f"{self.inner.describe()} picks the high-precision tokens of {self.scheme}"
