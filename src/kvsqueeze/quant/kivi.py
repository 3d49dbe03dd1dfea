"""KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache").

Keys have outlier *channels*, values do not: keys are quantized per channel (a group is `G` consecutive tokens of
one channel), values per token (a group is `G_v` consecutive channels of one token), both asymmetric min/max:

    K_hat[g, c] = round((K[g, c] - z_{g,c}) / s_{g,c}) * s_{g,c} + z_{g,c},   s_{g,c} = (max_g K_c - min_g K_c) / (2^b - 1)
    V_hat[t, g] = round((V[t, g] - z_{t,g}) / s_{t,g}) * s_{t,g} + z_{t,g},   over the channels of group g of token t

with b = 2 or 4 (8 and 1 also work). The most recent tokens stay in full precision: a residual window of
R..R+G-1 tokens (R a multiple of G; the reference code's G = R = 32); every time G more tokens fall out of it they
are quantized as one key group. Codes are packed four to a byte at 2 bits, along tokens for both keys and
values (as KIVI packs its keys: a row of d bytes holds 4 whole tokens, the layout the fused decode kernel reads
with 16-byte loads); scales and zero points are bfloat16 (packing.py). Bytes held per token and kv head, for the quantized part (s = 2 bytes):

    keys:   d*b/8 + 2*d*s/G          values:   d*b/8 + 2*(d/G_v)*s

(d = 128, b = 2, G = G_v = 32: 32 + 16 + 32 + 16 = 96 bytes instead of 512 in fp16, 5.3x; plus the residual).

Deviations: the residual is kept identical for keys and values (KIVI keeps exactly R values in full precision
and 0..R-1 keys), so that slots stay aligned; after an eviction the groups it leaves whole are kept as they are and
the other kept tokens regrouped (see base.py).
Attention runs over dequantized tensors (the reference path); `kernels/kivi_decode.py` has the fused GPU decode kernel
(`KIVIStore.fused_decode_attention`).

`KIVIStore` is the `KVStore` (a plain `CompressedLayer` holds it: `kivi(2)` is the layer factory); `KIVISegment`
one quantized run of slots (a segment) inside it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..storage.layer import CompressedLayer
from .base import QuantStore
from .packing import PER_CHANNEL, PER_TOKEN, QTensor, quantize


@dataclass
class KIVISegment:
    """One quantized run of slots: keys per channel, values per token, both packed along tokens."""

    k: QTensor  # per channel: groups of G tokens
    v: QTensor  # per token: groups of G_v channels

    @property
    def n(self) -> int:
        return self.k.n

    def keys(self, dtype):
        return self.k.dequantize(dtype)

    def values(self, dtype):
        return self.v.dequantize(dtype)

    def tensors(self):
        return {**{f"k.{n}": t for n, t in self.k.tensors().items()}, **{f"v.{n}": t for n, t in self.v.tensors().items()}}

    def cat(self, other: "KIVISegment") -> "KIVISegment":
        return KIVISegment(self.k.cat(other.k), self.v.cat(other.v))

    def map(self, fn) -> "KIVISegment":
        return KIVISegment(self.k.map(fn), self.v.map(fn))

    def take_groups(self, runs: torch.Tensor, size: int) -> "KIVISegment":
        """Whole runs of `size` slots (runs (b, h, m) long, run r = slots r * size ..), exact: `QTensor.take_groups`
        of keys and values."""
        return KIVISegment(self.k.take_groups(runs, size), self.v.take_groups(runs, size))


def channel_group(d: int, group: int) -> int:
    """The value group size along channels: `group` when it divides head_dim, else head_dim (one group)."""
    return group if d % group == 0 else d


class KIVIStore(QuantStore):
    """KIVI storage for one layer: `bits`-bit keys per channel and values per token, residual window (see the
    module docstring). Raises ValueError for a residual that is not a multiple of `group`."""

    scheme = "kivi"

    def __init__(self, bits: int = 2, group: int = 32, residual: int = 32, value_group: int | None = None):
        self.bits = bits
        self.value_group = value_group or group
        super().__init__(residual=residual, group=group)

    def _compress(self, k, v):
        gv = channel_group(v.shape[-1], self.value_group)
        return KIVISegment(quantize(k, self.bits, PER_CHANNEL, self.group, pack_along="token"),
                         quantize(v, self.bits, PER_TOKEN, gv, pack_along="token"))

    def _takes_groups(self) -> bool:
        """A key group (G tokens) is whole packed bytes (8 // bits tokens each) and whole value scales (per token):
        an eviction can copy whole groups (`QuantStore.keep`)."""
        return self.group % (8 // self.bits) == 0

    def fused_decode_attention(self, query, scale: float | None = None):
        """One decode query per sequence (B, HQ, 1, D) attending to every stored slot, dequantized inside the
        Triton kernel (GPU): `kvsqueeze.kernels.kivi_decode.kivi_decode_attention` over the packed storage."""
        from ..kernels.kivi_decode import kivi_decode_attention

        segment = self._stores[0] if self._stores else None
        return kivi_decode_attention(query, segment, self._k_res, self._v_res, scale)


def kivi(bits: int = 2, group: int = 32, residual: int = 32, value_group: int | None = None):
    """A `layer_factory` for `CompressedCache`: `CompressedCache(model, SnapKV(compression_ratio=0.75),
    layer_factory=kivi(2))`; each call returns a `CompressedLayer` holding a `KIVIStore`. Raises ValueError (at the
    call) for a residual that is not a multiple of `group`."""
    KIVIStore(bits, group, residual, value_group)  # check the arguments now
    store = functools.partial(KIVIStore, bits=bits, group=group, residual=residual, value_group=value_group)
    return functools.partial(CompressedLayer, store_factory=store)


def kivi_bytes_per_token(d: int, bits: int, group: int = 32, value_group: int | None = None, scale_bytes: int = 2) -> float:
    """Bytes per quantized token and kv head (keys + values), the formula of the module docstring."""
    gv = channel_group(d, value_group or group)
    return 2 * d * bits / 8 + 2 * d * scale_bytes / group + 2 * (d / gv) * scale_bytes
