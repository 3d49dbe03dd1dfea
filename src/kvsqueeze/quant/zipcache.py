"""ZipCache (He et al., 2024, "ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token
Identification"): its storage. The saliency rule (normalised probe attention), a method, is
`kvsqueeze.methods.zipcache.ZipCacheSaliency`; any method's scores can pick the salient tokens instead.

Quantization. Salient tokens (the top n_keep by the method's score) get `hi_bits` (4), the others `lo_bits` (2).
Both use channel-separable token-wise quantization: each channel is first divided by c_j = sqrt(max_t |X_{t,j}|)
(computed once, from the prefill, per layer, kv head and channel), then every token is quantized with one scale
and zero point over all its channels, and multiplied back by c_j:

    X_hat = Q_tokenwise(X / c) * c

which costs 2 scalars per token instead of groupwise's 2 per group. Applied to keys and values alike here.
The store is MiKV's `MixedPrecisionStore` (slots [low | high | residual]); the most recent tokens stay in full
precision (a residual window, as in the paper's streaming decode) and are split again whenever the method runs.

Deviation: a channel scale of 1/sqrt(max|X|) is stored as a multiplier.
"""

from __future__ import annotations

from .mikv import mixed


def zipcache(hi_bits: int = 4, lo_bits: int = 2, residual: int = 32, group: int = 32):
    """ZipCache's layer factory: channel-separable token-wise quantization of keys and values, two precisions."""
    return mixed(hi_bits, lo_bits, residual=residual, group=group, channel_group=None,
                 key_scaling="sqrt_max", value_scaling="sqrt_max")

