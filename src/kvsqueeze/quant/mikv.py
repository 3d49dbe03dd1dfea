"""MiKV (Yang et al., 2024, "No Token Left Behind: Reliable KV Cache Compression via Importance-Aware Mixed
Precision Quantization"): the mixed-precision storage it shares with ZipCache (the importance rule, a method, is
`kvsqueeze.methods.mikv.MiKV`).

An eviction policy (H2O in the paper; any kvsqueeze method here) splits the tokens into an important set, kept in
high precision, and the set it would evict, which MiKV keeps in low precision instead of dropping:

    important (top n_keep by the policy's score):  X_hat = Q_{b_hi}(X)        e.g. 8 or 4 bits (16: unquantized)
    "evicted" (the rest):                          X_hat = Q_{b_lo}(X)        e.g. 2 bits

Q_b is per-token asymmetric round-to-nearest (s = (max - min) / (2^b - 1), z = min over a group of channels of
one token). Outlier-aware balancing (the paper's Section 3.2): queries and keys share outlier channels, which
per-token low-bit key quantization cannot represent, so each (layer, kv head, channel) gets a balancer computed
from the prefill

    beta_c = sqrt( max_t |q_{t,c}| / max_t |k_{t,c}| ),        k_hat = Q(k * beta) / beta   (== using q / beta)

which moves the channel's magnitude between queries and keys (as SmoothQuant does for activations and weights)
before quantizing. Here the division by beta is applied when dequantizing (the reference path), which is the
same attention as scaling the queries by 1/beta. The runtime feeds the prefill queries' max |q| per kv head (the
max over its GQA group) to `MixedPrecisionStore.balance_keys` before the method's scores split the tokens.

Storage (`MixedPrecisionStore`, a `KVStore` held by a plain `CompressedLayer`): slots are ordered
[low-precision | high-precision | residual]; each part is a rectangular per-token segment (`PrecisionSegment`:
every head keeps the same number of important tokens, possibly different ones). The split is the store's own operation
(`split(scores, n_keep, valid, row_keep)`, called through `CompressedLayer.split` by the runtime in place of an
eviction): nothing is freed, so the mask transformers builds stays valid; old slots are all in the past of every
new token whatever their order. A real eviction (a sliding window's tokens no query can see) is `keep`: the kept
tokens are re-stored at high precision. The most recent `residual`..`residual + group - 1` tokens stay in full
precision; tokens falling out of it during decoding are stored in high precision until the next split.

Deviations: importance is the score of whatever method is passed (the paper uses H2O's accumulated attention);
without query statistics the balancer falls back to beta_c = 1 / sqrt(max_t |k_{t,c}|) (key-only, ZipCache's
channel normalization). A later split (decode-time `compression_interval`) re-quantizes tokens from their dequantized
values, so a token demoted to low precision and promoted back does not regain bits; a token kept by `keep` is
re-stored at high precision (its store's bits, not its lost precision).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..storage.layer import CompressedLayer
from ..storage.slots import take
from .base import QuantStore
from .kivi import channel_group
from .packing import PER_TOKEN, QTensor, quantize, to_finite


@dataclass
class PrecisionSegment:
    """One precision part of the store (MiKV's low- or high-precision cache): per-token quantized keys and values
    (or full precision at bits >= 16) of a run of slots, all at `bits`."""

    k: QTensor | torch.Tensor
    v: QTensor | torch.Tensor
    bits: int

    @property
    def n(self) -> int:
        return self.k.shape[2] if isinstance(self.k, torch.Tensor) else self.k.n

    @staticmethod
    def _deq(x, dtype):
        return x.to(dtype) if isinstance(x, torch.Tensor) else x.dequantize(dtype)

    def keys(self, dtype):
        return self._deq(self.k, dtype)

    def values(self, dtype):
        return self._deq(self.v, dtype)

    def tensors(self):
        out = {}
        for name, x in (("k", self.k), ("v", self.v)):
            if isinstance(x, torch.Tensor):
                out[name] = x
            else:
                out.update({f"{name}.{n}": t for n, t in x.tensors().items()})
        return out

    def cat(self, other: "PrecisionSegment") -> "PrecisionSegment":
        if isinstance(self.k, torch.Tensor):
            return PrecisionSegment(torch.cat([self.k, other.k], 2), torch.cat([self.v, other.v], 2), self.bits)
        return PrecisionSegment(self.k.cat(other.k), self.v.cat(other.v), self.bits)

    def map(self, fn) -> "PrecisionSegment":
        f = lambda x: fn(x) if isinstance(x, torch.Tensor) else x.map(fn)  # noqa: E731
        return PrecisionSegment(f(self.k), f(self.v), self.bits)


def precision_segment(k, v, bits: int, channel_group_size: int | None, dtype) -> PrecisionSegment:
    """k, v (b, h, n, d) as a per-token segment at `bits` (>= 16: kept in `dtype`, unquantized)."""
    if bits >= 16:
        return PrecisionSegment(k.to(dtype).contiguous(), v.to(dtype).contiguous(), 16)
    d = k.shape[-1]
    g = channel_group(d, channel_group_size) if channel_group_size else d
    return PrecisionSegment(quantize(k, bits, PER_TOKEN, g), quantize(v, bits, PER_TOKEN, g), bits)


class MixedPrecisionStore(QuantStore):
    """Important tokens in `hi_bits`, the others in `lo_bits`, split by a method's scores at `split`.

    key_scaling / value_scaling: None, "sqrt_max" (c = 1 / sqrt(max_t |X_c|), ZipCache's channel separation) or,
    for keys, "balance" (MiKV's query/key balancer, falling back to "sqrt_max" until queries are observed).
    """

    scheme = "mixed"

    def __init__(self, hi_bits: int = 8, lo_bits: int = 2, residual: int = 32, group: int = 32,
                 channel_group: int | None = 32, key_scaling: str | None = "balance", value_scaling: str | None = None):
        self.hi_bits, self.lo_bits = hi_bits, lo_bits
        self.channel_group = channel_group
        self.key_scaling, self.value_scaling = key_scaling, value_scaling
        self._ks: torch.Tensor | None = None  # (b, h, 1, d) fp32 channel multipliers applied before quantizing
        self._vs: torch.Tensor | None = None
        self.balanced_by_queries = False
        self._split_once = False
        super().__init__(residual=residual, group=group)

    @property
    def key_scale(self) -> torch.Tensor | None:
        """(batch, kv_heads, 1, head_dim) float32: the key channel multipliers (MiKV's balancer beta, or
        1 / sqrt(max |k|)); None before the first quantization."""
        return self._ks

    @property
    def value_scale(self) -> torch.Tensor | None:
        return self._vs

    @property
    def n_low(self) -> int:
        """Slots held at `lo_bits` (the first `n_low` slots)."""
        return sum(s.n for s in self._stores if s.bits == self.lo_bits)

    # --- channel scaling ---------------------------------------------------------------------------------------
    @staticmethod
    def _sqrt_max(x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """(b, h, 1, d) float32 channel multipliers 1 / sqrt(max_t |x_t|) over the slots that are `valid` (b, h, n)
        (one small row per layer, any finite max)."""
        x = x.float().abs()
        if valid is not None and valid.shape == x.shape[:3]:  # padding slots do not set a row's scales
            x = x.masked_fill(~valid[..., None], 0.0)
        m = x.amax(dim=2, keepdim=True).clamp_min(1e-6)
        return 1.0 / m.sqrt()

    def _ensure_scales(self, k, v, valid: torch.Tensor | None = None):
        if self.key_scaling and self._ks is None:
            self._ks = self._sqrt_max(k, valid)
        if self.value_scaling and self._vs is None:
            self._vs = self._sqrt_max(v, valid)

    def balance_keys(self, query_absmax: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """MiKV's balancer from the prefill queries' max |q| per (batch, kv head, channel): (b, h, d) (the runtime
        passes it before the split; `valid` (b, h, n) bool marks the slots that set it, None: all). Once only;
        a no-op unless key_scaling == "balance". Segments already quantized are re-encoded at the next commit /
        split (from their dequantized values)."""
        if self.key_scaling != "balance" or self.balanced_by_queries or self._k_res is None:
            return
        keys, values = self.view()  # this forward's view (or dequantized with the old scales)
        kabs = keys.float().abs()
        if valid is not None:  # padding slots do not set a row's balancer
            kabs = kabs.masked_fill(~valid[..., None], 0.0)
        kmax = kabs.amax(dim=2).clamp_min(1e-6)
        beta = (query_absmax.float().clamp_min(1e-6) / kmax).sqrt()
        if self._stores:  # re-encode what is stored with the new balancer
            self._k_res, self._v_res, self._stores = keys, values, []
        self._ks = beta[:, :, None, :].float()  # float32: sqrt(max|q| / max|k|) can exceed float16's range
        self.balanced_by_queries = True

    def _scaled(self, k, v):
        if self._ks is not None:
            k = k.float() * self._ks.float()
        if self._vs is not None:
            v = v.float() * self._vs.float()
        return k, v

    def _materialize(self, i: int) -> torch.Tensor:
        res = self._k_res if i == 0 else self._v_res
        scale = self._ks if i == 0 else self._vs
        parts = []
        for s in self._stores:
            if s.bits >= 16:  # unquantized: stored unscaled, in the model's dtype (exact)
                parts.append(s.keys(res.dtype) if i == 0 else s.values(res.dtype))
                continue
            t = (s.keys if i == 0 else s.values)(torch.float32)
            if scale is not None:
                t = t / scale.float()
            parts.append(to_finite(t, res.dtype))
        if not parts:
            return res
        return torch.cat(parts + [res], dim=-2)

    def _extra_tensors(self):
        out = {}
        if self._ks is not None:
            out["key_channel_scale"] = self._ks
        if self._vs is not None:
            out["value_channel_scale"] = self._vs
        return out

    def _map_extra(self, fn):
        self._ks = None if self._ks is None else fn(self._ks)
        self._vs = None if self._vs is None else fn(self._vs)

    # --- compression ------------------------------------------------------------------------------------------
    def _segment(self, k, v, bits):
        self._ensure_scales(k, v)
        if bits < 16:  # the channel scaling only serves quantization; 16 bits keeps the values themselves
            k, v = self._scaled(k, v)
        return precision_segment(k, v, bits, self.channel_group, self.dtype)

    def _compress(self, k, v):
        return self._segment(k, v, self.hi_bits)

    def _absorb(self, stores, new):
        if stores and stores[-1].bits == new.bits:
            return stores[:-1] + [stores[-1].cat(new)]
        return stores + [new]

    def split(self, scores: torch.Tensor, n_keep: int, valid: torch.Tensor | None = None,
              row_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Re-store every slot: the top `n_keep` (the residual counted in) in high precision, the others low;
        returns the new slot order (batch, kv_heads, n) long ([low | high | residual], each in slot order), which
        the slot table must follow (`CompressedLayer.split` does).

        scores: (batch, kv_heads, n). valid: (batch, kv_heads, n) bool, False for padding / hidden slots (ranked
        last). row_keep (batch,): per-row counts (a left-padded batch); the high part stays rectangular, a row
        with fewer important tokens fills it with its padding slots first."""
        keys, values = self.view()
        b, h, n = scores.shape
        if not self._split_once:  # channel scales from every token of the prefill, then fixed
            if not self.balanced_by_queries:
                self._ks = None
            self._vs = None
            self._ensure_scales(keys, values, valid)
            self._split_once = True
        r = min(self.residual, n)
        body = n - r
        n_hi = max(0, min(n_keep - r, body))
        s = scores[..., :body].float()
        if valid is not None:
            s = s.masked_fill(~valid[..., :body], float("-inf"))
        important = torch.zeros(b, h, body, dtype=torch.bool, device=scores.device)
        rows_hi = None if row_keep is None else (row_keep.to(scores.device) - r).clamp(0, body)
        if n_hi and rows_hi is not None and bool((rows_hi < n_hi).any()):
            # each row's own top rows_hi, then its padding / hidden slots, then its next best
            order = s.sort(dim=-1, descending=True, stable=True).indices
            rank = torch.empty_like(order).scatter_(-1, order, torch.arange(body, device=order.device).expand_as(order))
            hidden = (~valid[..., :body]) if valid is not None else torch.zeros_like(important)
            key = torch.where(rank < rows_hi[:, None, None], 3.0 * body,
                              torch.where(hidden, 2.0 * body, (body - rank).float()))
            important.scatter_(2, key.topk(n_hi, dim=-1).indices, True)
        elif n_hi:
            important.scatter_(2, s.topk(n_hi, dim=-1).indices, True)
        # [low | high], each in slot order (a stable sort of the 0/1 flags), then the residual
        order = torch.sort(important.to(torch.int8), dim=-1, stable=True).indices
        order = torch.cat([order, torch.arange(body, n, device=order.device).expand(b, h, r)], dim=-1)
        kr, vr = take(keys, order), take(values, order)
        n_lo = body - n_hi
        parts = []
        if n_lo:
            parts.append(self._segment(kr[:, :, :n_lo], vr[:, :, :n_lo], self.lo_bits))
        if n_hi:
            parts.append(self._segment(kr[:, :, n_lo:body], vr[:, :, n_lo:body], self.hi_bits))
        self._stores = parts
        self._k_res, self._v_res = kr[:, :, body:].clone(), vr[:, :, body:].clone()
        self._forget_view()
        return order


def mixed(hi_bits: int = 8, lo_bits: int = 2, **kwargs):
    """A layer factory: each call returns a `CompressedLayer` holding a `MixedPrecisionStore(hi_bits, lo_bits,
    **kwargs)`."""
    store = functools.partial(MixedPrecisionStore, hi_bits=hi_bits, lo_bits=lo_bits, **kwargs)
    store()  # check the arguments now
    return functools.partial(CompressedLayer, store_factory=store)


def mikv(hi_bits: int = 8, lo_bits: int = 2, residual: int = 32, group: int = 32, channel_group: int | None = 32):
    """MiKV's layer factory: per-token quantization, query/key balancer on keys."""
    return mixed(hi_bits, lo_bits, residual=residual, group=group, channel_group=channel_group,
                 key_scaling="balance", value_scaling=None)
