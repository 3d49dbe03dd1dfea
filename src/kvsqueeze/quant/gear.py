"""GEAR (Kang et al., 2024, "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative
Inference of LLM").

Each segment of keys (or values) X (n tokens x d channels, per kv head) is approximated by three parts:

    X ~ D + L + S
    S = Filter_s(X)                 sparse outliers: the s% entries (2% here) furthest from their group's mean,
                                    kept exactly (value in the input's dtype, bit-exact + channel index uint8)
    D = Dequant(Quant_b(X - S))     uniform b-bit quantization of the rest (KIVI's grouping: keys per channel over
                                    G tokens, values per token over G_v channels); outlier entries are replaced
                                    by their group mean before quantizing, so they no longer stretch the range
    L = A B^T = SVD_r(X - S - D)    a rank-r approximation of the quantization residual, by power iteration
                                    (A: n x r orthonormal, float16; B: d x r, bfloat16: it carries X's
                                    magnitude, which can exceed float16's range)

Dequantization computes D + A B^T and then writes the outliers back in place. As in GEAR's streaming buffer the
most recent tokens stay in full precision and are compressed `group` tokens at a time as a new segment (one
low-rank pair per segment); the prefill is one segment. Bytes per token and kv head, keys + values:

    2 * (d*b/8  +  quantization scales  +  r*2  +  o*(1 + e))  +  2 * d*r*2 / n_seg

(e: bytes per input value; n_seg: tokens per segment)

Deviations: outliers are chosen per token row (o = max(1, round(s*d)) entries; keys by their z-score within
their channel over the segment, values within their token), so the sparse part is rectangular; power iteration
uses a fixed-seed start and `iters` rounds with a QR re-orthonormalisation.

`GEARStore` is the `KVStore` (a plain `CompressedLayer` holds it: `gear(4)` is the layer factory); `GearSegment`
one compressed segment of slots inside it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..storage.layer import CompressedLayer
from .base import QuantStore
from .kivi import channel_group
from .packing import PER_CHANNEL, PER_TOKEN, QTensor, quantize, to_finite


@dataclass
class GearPart:
    """One of keys / values of a segment: quantized + low-rank + sparse outliers."""

    q: QTensor
    a: torch.Tensor  # (b, h, n, r) float16 (orthonormal columns: |a| <= 1)
    bt: torch.Tensor  # (b, h, d, r) bfloat16 (X's magnitude: float16 could overflow)
    out_idx: torch.Tensor  # (b, h, n, o) uint8 (or int16 for d > 256)
    out_val: torch.Tensor  # (b, h, n, o) in the input's dtype (exact)

    def decode(self, dtype) -> torch.Tensor:
        x = self.q.dequantize(torch.float32)
        if self.a.shape[-1]:
            x = x + torch.matmul(self.a.float(), self.bt.float().transpose(-1, -2))
        if self.out_idx.shape[-1]:
            x = x.scatter(-1, self.out_idx.long(), self.out_val.float())
        return to_finite(x, dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.q.tensors(), "lowrank_a": self.a, "lowrank_b": self.bt, "outlier_idx": self.out_idx,
                "outlier_val": self.out_val}

    def map(self, fn) -> "GearPart":
        return GearPart(self.q.map(fn), fn(self.a), fn(self.bt), fn(self.out_idx), fn(self.out_val))


@dataclass
class GearSegment:
    """One compressed segment (a run of slots): keys and values as `GearPart`s."""

    k: GearPart
    v: GearPart

    @property
    def n(self) -> int:
        return self.k.q.n

    def keys(self, dtype):
        return self.k.decode(dtype)

    def values(self, dtype):
        return self.v.decode(dtype)

    def tensors(self):
        return {**{f"k.{n}": t for n, t in self.k.tensors().items()}, **{f"v.{n}": t for n, t in self.v.tensors().items()}}

    def map(self, fn):
        return GearSegment(self.k.map(fn), self.v.map(fn))


def low_rank(e: torch.Tensor, rank: int, iters: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` approximation e ~ A B^T of e (b, h, n, d) by power (subspace) iteration; A orthonormal."""
    b, h, n, d = e.shape
    g = torch.Generator().manual_seed(seed)
    bt = torch.randn(d, rank, generator=g).to(e.device).expand(b, h, d, rank)
    a = None
    for _ in range(max(1, iters)):
        a = torch.linalg.qr(torch.matmul(e, bt)).Q  # (b, h, n, r)
        bt = torch.matmul(e.transpose(-1, -2), a)  # (b, h, d, r)
    return a, bt


def compress_part(x: torch.Tensor, bits: int, axis: str, group: int, rank: int, outlier_ratio: float,
                  iters: int = 3) -> GearPart:
    """One GEAR part of x (b, h, n, d): `bits`-bit quantization per channel (`axis="per_channel"`, keys) or per
    token (`axis="per_token"`, values) (see packing.quantize, whose ValueErrors it raises), a rank-`rank` residual and max(1, round(outlier_ratio * d)) outliers per token row,
    stored in x's dtype so that they come back bit-exact."""
    xf = x.float()
    b, h, n, d = xf.shape
    o = max(1, round(outlier_ratio * d)) if outlier_ratio > 0 else 0
    if axis == PER_CHANNEL:  # keys: channels over the segment's tokens
        mean = xf.mean(dim=2, keepdim=True).expand_as(xf)
        std = xf.std(dim=2, keepdim=True).clamp_min(1e-6) if n > 1 else torch.ones_like(xf[:, :, :1])
    else:  # values: within each token
        mean = xf.mean(dim=-1, keepdim=True).expand_as(xf)
        std = xf.std(dim=-1, keepdim=True).clamp_min(1e-6)
    idx_dtype = torch.uint8 if d <= 256 else torch.int16
    if o:
        idx = ((xf - mean).abs() / std).topk(o, dim=-1).indices
        val = xf.gather(-1, idx)
        xf = xf.scatter(-1, idx, mean.gather(-1, idx))
    else:
        idx = torch.empty(b, h, n, 0, dtype=torch.long, device=x.device)
        val = xf[..., :0]
    q = quantize(xf, bits, axis, group)
    if rank > 0:
        a, bt = low_rank(xf - q.dequantize(torch.float32), rank, iters)
    else:
        a, bt = xf[..., :0], xf.new_empty(b, h, d, 0)
    return GearPart(q, a.to(torch.float16), bt.to(torch.bfloat16), idx.to(idx_dtype), val.to(x.dtype))


class GEARStore(QuantStore):
    """GEAR storage: b-bit KIVI-style quantization + rank-r residual + o sparse outliers per token row."""

    scheme = "gear"

    def __init__(self, bits: int = 4, rank: int | None = None, outlier_ratio: float = 0.02, group: int = 32,
                 residual: int = 32, value_group: int | None = None, iters: int = 3):
        self.bits, self.rank, self.outlier_ratio = bits, rank, outlier_ratio
        self.value_group = value_group or group
        self.iters = iters
        super().__init__(residual=residual, group=group)

    def _rank(self, d: int) -> int:
        return self.rank if self.rank is not None else max(1, d // 32)

    def _compress(self, k, v):
        d = k.shape[-1]
        r = self._rank(d)
        return GearSegment(
            compress_part(k, self.bits, PER_CHANNEL, self.group, r, self.outlier_ratio, self.iters),
            compress_part(v, self.bits, PER_TOKEN, channel_group(v.shape[-1], self.value_group), r,
                          self.outlier_ratio, self.iters),
        )


def gear(bits: int = 4, rank: int | None = None, outlier_ratio: float = 0.02, group: int = 32, residual: int = 32):
    """GEAR's layer factory: each call returns a `CompressedLayer` holding a `GEARStore`."""
    store = functools.partial(GEARStore, bits=bits, rank=rank, outlier_ratio=outlier_ratio, group=group,
                              residual=residual)
    store()  # check the arguments now
    return functools.partial(CompressedLayer, store_factory=store)
