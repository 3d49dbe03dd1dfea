"""KV bytes as a 16-bit deployment would hold them (`kv_bytes_16`, `full_kv_bytes_16` in the results store).

The measured `kv_bytes` depend on the dtype the model ran in (float32 on CPU, so an unquantized cache looks twice
as large as it would on a GPU, and a 4-bit store looks 8x smaller than fp32 instead of 4x smaller than fp16).
Sweeps mixing quantized and unquantized configurations are compared on one scale instead:

- **`kv_bytes_16(cache)`**, per tensor that encodes keys or values (for quantized layers: `layer.kv_tensors()`,
  i.e. packed codes, scales, zero points, low-rank factors, outliers, channel scales, and the full-precision
  residual window; for other layers: `keys` and `values`; a tensor shared by several layers, e.g. MiniCache's merged
  directions or xKV's shared token factor, counted once):
    * a floating-point tensor counts `min(element_size, 2)` bytes per element: full-precision slots (the residual,
      MiKV's 16-bit tokens, an unquantized layer) at 2 bytes whatever the model dtype; float16 scales at their
      real 2 bytes; a float32 side tensor (e.g. packing.py's float32 fallback for scales beyond float16's range)
      at 2 bytes, what a bfloat16 deployment holds it in;
    * an integer tensor (packed codes, outlier indices) at its real bytes (`element_size`).
  Positions, validity masks and method state are not KV bytes (they are in `total_bytes`, not here).
- **`full_kv_bytes_16(cache)`**: what an uncompressed 16-bit cache holds for the same tokens:
  `2 (K and V) * batch * kv_heads * head_dim * tokens * 2 bytes` per full-attention layer (tokens = every token
  the layer has seen), and the keys and values a sliding-window layer holds (its window) at 2 bytes per element.

Both are taken at the same moment as `CacheStats` (right after compressing the context, before the question).
Decode-time selection (Quest, AttentionPredictor) keeps every entry: it changes neither number.
"""

from __future__ import annotations

import torch

from ..storage.layer import CompressedLayer


def _bytes16(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    per = min(t.element_size(), 2) if t.is_floating_point() else t.element_size()
    return t.numel() * per


def _kv_tensors(layer) -> list[torch.Tensor]:
    kv = getattr(layer, "kv_tensors", None)  # kvsqueeze.quant layers: every tensor encoding keys / values
    if kv is not None:
        return list(kv().values())
    return [layer.keys, layer.values]


def kv_bytes_16(cache) -> int:
    """Bytes of keys and values held, normalised to a 16-bit deployment (see the module docstring)."""
    from ..storage.crosslayer import unique_tensors

    held = [dict(enumerate(_kv_tensors(layer))) for layer in cache.layers if getattr(layer, "is_initialized", False)]
    return sum(_bytes16(t) for t in unique_tensors(held))  # a tensor shared by several layers counts once


def full_kv_bytes_16(cache) -> int:
    """Bytes an uncompressed 16-bit cache would hold for the same tokens (sliding layers: their window)."""
    total = 0
    head_dim = getattr(cache, "head_dim", None)
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        if isinstance(layer, CompressedLayer):
            b, h = layer.positions.shape[:2]
            d = head_dim or layer.keys.shape[-1]
            total += 2 * b * h * d * layer.cumulative_length * 2
        else:
            total += 2 * (layer.keys.numel() + layer.values.numel())
    return total


def bytes_16(cache) -> tuple[int, int]:
    """(kv_bytes_16, full_kv_bytes_16) of `cache`."""
    return kv_bytes_16(cache), full_kv_bytes_16(cache)
