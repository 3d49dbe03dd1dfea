"""MiKV (Yang et al., 2024, "No Token Left Behind: Reliable KV Cache Compression via Importance-Aware Mixed
Precision Quantization"), and the mixed-precision storage it shares with ZipCache.

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
same attention as scaling the queries by 1/beta. The query statistics come from the `MiKV` method wrapper, which
records max_t |q| of the prefill queries (per kv head: the max over its GQA group) before the wrapped method's
scores split the tokens.

Storage (`MixedPrecisionLayer`): slots are ordered [low-precision | high-precision | residual]; each part is a
rectangular per-token store (every head keeps the same number of important tokens, possibly different ones).
The most recent `residual`..`residual + group - 1` tokens stay in full precision; tokens falling out of it during
decoding are stored in high precision until the next split. Nothing is evicted (`n_evicted` stays 0), so the
mask transformers builds stays valid; old slots are all in the past of every new token whatever their order.

Deviations: importance is the score of whatever method is passed (the paper uses H2O's accumulated attention);
without the `MiKV` wrapper (no query statistics) the balancer falls back to beta_c = 1 / sqrt(max_t |k_{t,c}|)
(key-only, ZipCache's channel normalization). A later split (decode-time `compression_interval`) re-quantizes tokens
from their dequantized values, so a token demoted to low precision and promoted back does not regain bits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from ..methods.base import Method, ScoreInputs
from .base import QuantizedLayer
from .kivi import channel_group
from .packing import QTensor, quantize, to_finite


@dataclass
class TokenStore:
    """Per-token quantized keys and values (or full precision at bits >= 16) of a run of slots."""

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

    def cat(self, other: "TokenStore") -> "TokenStore":
        if isinstance(self.k, torch.Tensor):
            return TokenStore(torch.cat([self.k, other.k], 2), torch.cat([self.v, other.v], 2), self.bits)
        return TokenStore(self.k.cat(other.k), self.v.cat(other.v), self.bits)

    def map(self, fn) -> "TokenStore":
        f = lambda x: fn(x) if isinstance(x, torch.Tensor) else x.map(fn)  # noqa: E731
        return TokenStore(f(self.k), f(self.v), self.bits)


def token_store(k, v, bits: int, channel_group_size: int | None, dtype) -> TokenStore:
    if bits >= 16:
        return TokenStore(k.to(dtype).contiguous(), v.to(dtype).contiguous(), 16)
    d = k.shape[-1]
    g = channel_group(d, channel_group_size) if channel_group_size else d
    return TokenStore(quantize(k, bits, "channel", g), quantize(v, bits, "channel", g), bits)


class MixedPrecisionLayer(QuantizedLayer):
    """Important tokens in `hi_bits`, the others in `lo_bits`, split by the method's scores at `evict`.

    key_scaling / value_scaling: None, "sqrt_max" (c = 1 / sqrt(max_t |X_c|), ZipCache's channel separation) or,
    for keys, "balance" (MiKV's query/key balancer, falling back to "sqrt_max" until queries are observed).
    """

    scheme = "mixed"

    def __init__(self, hi_bits: int = 8, lo_bits: int = 2, residual: int = 32, group: int = 32,
                 channel_group: int | None = 32, key_scaling: str | None = "balance", value_scaling: str | None = None,
                 **kwargs):
        self.hi_bits, self.lo_bits = hi_bits, lo_bits
        self.channel_group = channel_group
        self.key_scaling, self.value_scaling = key_scaling, value_scaling
        self._ks: torch.Tensor | None = None  # (b, h, 1, d) fp32 channel multipliers applied before quantizing
        self._vs: torch.Tensor | None = None
        self._balanced_by_queries = False
        self._split_once = False
        super().__init__(residual=residual, group=group, **kwargs)

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

    def balance_keys(self, query_absmax: torch.Tensor, commit: bool = True) -> None:
        """MiKV's balancer from the prefill queries' max |q| per (batch, kv head, channel): (b, h, d).

        The stored tokens are re-encoded with it; pass commit=False when `evict` follows (it re-splits them
        from full precision: committing first would make it read them back quantized)."""
        if self.key_scaling != "balance" or self._balanced_by_queries or not self.is_initialized:
            return
        keys, values = self.keys, self.values  # live view (or dequantized with the old scales)
        kabs = keys.float().abs()
        if self.valid is not None:  # padding slots do not set a row's balancer
            kabs = kabs.masked_fill(~self.valid[..., None], 0.0)
        kmax = kabs.amax(dim=2).clamp_min(1e-6)
        beta = (query_absmax.float().clamp_min(1e-6) / kmax).sqrt()
        if self._stores:  # re-encode what is stored with the new balancer
            self._k_res, self._v_res, self._stores = keys, values, []
        self._ks = beta[:, :, None, :].float()  # float32: sqrt(max|q| / max|k|) can exceed float16's range
        self._balanced_by_queries = True
        if commit:
            self.commit()

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

    def reset(self):
        super().reset()
        self._ks = self._vs = None
        self._balanced_by_queries = self._split_once = False

    # --- compression ------------------------------------------------------------------------------------------
    def _store(self, k, v, bits):
        self._ensure_scales(k, v)
        if bits < 16:  # the channel scaling only serves quantization; 16 bits keeps the values themselves
            k, v = self._scaled(k, v)
        return token_store(k, v, bits, self.channel_group, self.dtype)

    def _compress(self, k, v):
        return self._store(k, v, self.hi_bits)

    def _absorb(self, stores, new):
        if stores and stores[-1].bits == new.bits:
            return stores[:-1] + [stores[-1].cat(new)]
        return stores + [new]

    def drop_slots(self, scores: torch.Tensor, n_keep: int):
        """Really free slots (a sliding window's tokens no query can see any more): the top `n_keep` stay, re-stored
        at high precision until the next split (deviation: a low-precision token regains its store's bits, not its
        lost precision)."""
        QuantizedLayer.evict(self, scores, n_keep)

    def evict(self, scores: torch.Tensor, n_keep: int, row_keep: torch.Tensor | None = None):
        """Split instead of evicting: top `n_keep` slots (the residual counted in) in high precision, others low.

        scores: (batch, kv_heads, n_stored). row_keep (batch,): per-row counts (a left-padded batch); the high
        part stays rectangular, a row with fewer important tokens fills it with its padding slots first."""
        b, h, n = self.positions.shape
        if scores.shape != (b, h, n):
            raise ValueError(f"scores must have shape {(b, h, n)}, got {tuple(scores.shape)}")
        keys, values = self.keys, self.values
        if not self._split_once:  # channel scales from every token of the prefill, then fixed
            if not self._balanced_by_queries:
                self._ks = None
            self._vs = None
            self._ensure_scales(keys, values, self.valid)
            self._split_once = True
        r = min(self.residual, n)
        body = n - r
        n_hi = max(0, min(n_keep - r, body))
        s = scores[..., :body].float()
        if self.valid is not None:
            s = s.masked_fill(~self.valid[..., :body], float("-inf"))
        important = torch.zeros(b, h, body, dtype=torch.bool, device=scores.device)
        rows_hi = None if row_keep is None else (row_keep.to(scores.device) - r).clamp(0, body)
        if n_hi and rows_hi is not None and bool((rows_hi < n_hi).any()):
            # each row's own top rows_hi, then its padding / hidden slots, then its next best
            order = s.sort(dim=-1, descending=True, stable=True).indices
            rank = torch.empty_like(order).scatter_(-1, order, torch.arange(body, device=order.device).expand_as(order))
            hidden = (~self.valid[..., :body]) if self.valid is not None else torch.zeros_like(important)
            key = torch.where(rank < rows_hi[:, None, None], 3.0 * body,
                              torch.where(hidden, 2.0 * body, (body - rank).float()))
            important.scatter_(2, key.topk(n_hi, dim=-1).indices, True)
        elif n_hi:
            important.scatter_(2, s.topk(n_hi, dim=-1).indices, True)
        # [low | high], each in slot order (a stable sort of the 0/1 flags), then the residual
        order = torch.sort(important.to(torch.int8), dim=-1, stable=True).indices
        order = torch.cat([order, torch.arange(body, n, device=order.device).expand(b, h, r)], dim=-1)
        self._reorder_slots(order, keys, values)
        n_lo = body - n_hi
        kr, vr = self._k_res, self._v_res
        stores = []
        if n_lo:
            stores.append(self._store(kr[:, :, :n_lo], vr[:, :, :n_lo], self.lo_bits))
        if n_hi:
            stores.append(self._store(kr[:, :, n_lo:body], vr[:, :, n_lo:body], self.hi_bits))
        self._stores = stores
        self._k_res, self._v_res = kr[:, :, body:].clone(), vr[:, :, body:].clone()

    @property
    def n_low(self) -> int:
        return sum(s.n for s in self._stores if s.bits == self.lo_bits)


def mixed(hi_bits: int = 8, lo_bits: int = 2, **kwargs):
    return functools.partial(MixedPrecisionLayer, hi_bits=hi_bits, lo_bits=lo_bits, **kwargs)


def mikv(hi_bits: int = 8, lo_bits: int = 2, residual: int = 32, group: int = 32, channel_group: int | None = 32):
    """MiKV's layer factory: per-token quantization, query/key balancer on keys."""
    return mixed(hi_bits, lo_bits, residual=residual, group=group, channel_group=channel_group,
                 key_scaling="balance", value_scaling=None)


@dataclass(kw_only=True)
class MiKV(Method):
    """Wraps an eviction method: its scores pick the high-precision tokens (`n_keep` of them) instead of the kept
    ones, and the prefill queries' channel maxima feed MiKV's balancer. Budget fields come from `inner`."""

    inner: Method = field(default=None)

    name = "mikv"
    summary = "mixed precision: tokens a method would evict kept at low bits (use with a MixedPrecisionLayer)"

    def __post_init__(self):
        if self.inner is None:
            from ..methods import H2O

            self.inner = H2O(ratio=self.ratio, budget=self.budget)
        self.ratio, self.budget = self.inner.ratio, self.inner.budget
        self.exempt_layers, self.compression_interval = self.inner.exempt_layers, self.inner.compression_interval
        self.stateful = self.inner.stateful
        super().__post_init__()

    def setup(self, model):
        self.inner.setup(model)

    def n_keep(self, n_seen, layer_idx, n_layers):
        return self.inner.n_keep(n_seen, layer_idx, n_layers)

    def observe(self, x: ScoreInputs) -> None:
        self.inner.observe(x)

    def score(self, x: ScoreInputs) -> torch.Tensor:
        return self.inner.score(x)

    def describe(self) -> str:
        return f"mikv[{self.inner.describe()}]"
