"""One matrix product for each layer's query, key and value projections while a static decoding step runs.

At one token per row each projection is a GEMV that reads its weight once. On an H200 (Llama-3.1-8B shapes,
`bench/gpu_decode.py --profile`, docs/gpu.md) cuBLAS ran the 4096 -> 1024 key and value GEMVs at 1.6 TB/s and the
4096 -> 4096 query one at 2.7 TB/s, against 3.6-3.9 TB/s for the large MLP ones: small GEMVs do not fill the GPU.
Concatenating the three weights into one ((hq + 2 hk) * head_dim, hidden) matrix makes one larger GEMV
(gpt-fast's `wqkv`; vLLM's `QKVParallelLinear`).

The attention module's own forward is kept: while a step runs, `q_proj` is swapped for `FusedQKV`, which computes
the fused product and returns the query part, leaving the key and value parts for the `StashedPart` stand-ins
swapped in for `k_proj` and `v_proj`. Each stand-in checks that it is called on the same input after `q_proj`
(the order of Llama, Mistral, Qwen2/3, Gemma 2/3's forwards) and raises `KVSqueezeError` otherwise, so a model
that projects in another order fails loudly instead of mixing tokens. Nothing is held between steps (the stash is
emptied as it is read). The swap is a context manager (`swapped`), like the static attention implementation: the
model is left as loaded outside a step.

Memory: the fused weights are a copy, (hq + 2 hk) * head_dim * hidden elements per layer (1.6 GB for
Llama-3.1-8B in bf16, 10% of its weights), built once by `build_fused_qkv(model)`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KVSqueezeError


class _Stash:
    """The key or value part of the last fused product, with the input it was computed from."""

    def __init__(self):
        self.x = None
        self.out = None


class StashedPart(nn.Module):
    """Stands in for `k_proj` / `v_proj`: returns its part of the product `FusedQKV` computed from the same input
    (shape (..., out_features)). Raises KVSqueezeError when called before `q_proj` or on another input."""

    def __init__(self, name: str, out_features: int):
        super().__init__()
        self.name, self.out_features = name, out_features
        self.stash = _Stash()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stash
        if s.out is None or s.x is not x:
            raise KVSqueezeError(f"fused QKV projections: {self.name} was called before q_proj or on another input; "
                                 "this model projects in another order: build the decoder without fuse_qkv")
        out = s.out
        s.x = s.out = None
        return out


class FusedQKV(nn.Module):
    """Stands in for `q_proj`: x (..., hidden) -> the query part (..., hq * head_dim) of x @ [Wq; Wk; Wv]^T (+ the
    biases), the key and value parts stashed for `k` and `v` (`StashedPart`)."""

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear):
        super().__init__()
        with torch.no_grad():
            self.register_buffer("weight", torch.cat([q.weight, k.weight, v.weight]), persistent=False)
            biased = q.bias is not None
            self.register_buffer("bias", torch.cat([q.bias, k.bias, v.bias]) if biased else None, persistent=False)
        self.splits = (q.out_features, k.out_features, v.out_features)
        self.k = StashedPart("k_proj", k.out_features)
        self.v = StashedPart("v_proj", v.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.weight, self.bias).split(self.splits, dim=-1)
        self.k.stash.x = self.v.stash.x = x
        self.k.stash.out, self.v.stash.out = k, v
        return q


def build_fused_qkv(model) -> list[tuple[nn.Module, FusedQKV]]:
    """For every attention module of `model` with `q_proj`, `k_proj`, `v_proj` linear layers of one input size,
    dtype and bias kind: (module, its `FusedQKV`). Raises KVSqueezeError when the model has none."""
    out = []
    for mod in model.modules():
        parts = [getattr(mod, n, None) for n in ("q_proj", "k_proj", "v_proj")]
        if not all(isinstance(p, nn.Linear) for p in parts):
            continue
        q, k, v = parts
        if len({p.in_features for p in parts}) > 1 or len({p.weight.dtype for p in parts}) > 1 or \
                len({p.bias is None for p in parts}) > 1:
            continue
        out.append((mod, FusedQKV(q, k, v)))
    if not out:
        raise KVSqueezeError("fuse_qkv: the model has no attention module with q_proj / k_proj / v_proj linear "
                             "layers to fuse")
    return out


@contextlib.contextmanager
def swapped(fused: list[tuple[nn.Module, FusedQKV]] | None):
    """While the block runs, each module's q_proj / k_proj / v_proj are the fused stand-ins; restored after
    (also on error). `fused` None: nothing is swapped."""
    if not fused:
        yield
        return
    saved = [(mod, mod.q_proj, mod.k_proj, mod.v_proj) for mod, _ in fused]
    try:
        for mod, f in fused:
            mod.q_proj, mod.k_proj, mod.v_proj = f, f.k, f.v
        yield
    finally:
        for mod, q, k, v in saved:
            mod.q_proj, mod.k_proj, mod.v_proj = q, k, v
