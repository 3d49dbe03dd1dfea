"""One matrix product for the projections that read the same input, while a static decoding step runs.

At one token per row each projection is a GEMV that reads its weight once. On an H200 (Llama-3.1-8B shapes,
`bench/gpu_decode.py --profile`, docs/gpu.md) cuBLAS ran the 4096 -> 1024 key and value GEMVs at 1.6 TB/s and the
4096 -> 4096 query one at 2.7 TB/s, against 3.6-3.9 TB/s for the large MLP ones: small GEMVs do not fill the GPU,
and every GEMV of a split-K plan adds a reduction kernel. Concatenating the weights that read the same input makes
one larger GEMV per group (gpt-fast's `wqkv` and `w1`/`w3`; vLLM's `QKVParallelLinear` and
`MergedColumnParallelLinear`). The groups (`GROUPS`):

    attention:  [W_q; W_k; W_v]   (q_proj, k_proj, v_proj)   x -> q, k, v
    MLP:        [W_gate; W_up]    (gate_proj, up_proj)      x -> gate, up     (then down(act(gate) * up))

The modules' own forwards are kept: while a step runs, a group's first projection is swapped for
`FusedProjection`, which computes the fused product and returns its own part, leaving the others' parts for the
`StashedPart` stand-ins swapped in for them. Each stand-in checks that it is called on the same input after the
first (the order of Llama, Mistral, Qwen2/3, Gemma 2/3's forwards: q before k before v, gate before up) and raises
`KVSqueezeError` otherwise, so a model that projects in another order fails loudly instead of mixing tokens.
Nothing is held between steps (the stash is emptied as it is read). The swap is a context manager (`swapped`),
like the static attention implementation: the model's modules are the loaded ones outside a step.

Memory: none extra. The fused weight is built once per group (`build_fused_projections(model)`), and the original
`nn.Linear` weights then become row views of it (each projection's `weight.data` is re-pointed at its rows of
the fused matrix; the values are unchanged, so the model outside a step computes what it did). Only one group's
copy is alive at a time while building, and a second build on the same model reuses the first's fused weights. Linear layers that are not plain `torch.nn.Linear` with floating weights
on one device (quantized or offloaded layers) are left alone.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KVSqueezeError

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # projections that read the same input


class _Stash:
    """A part of the last fused product, with the input it was computed from."""

    def __init__(self):
        self.x = None
        self.out = None


class StashedPart(nn.Module):
    """Stands in for a group's later projection (k_proj, v_proj, up_proj): returns its part of the product
    `FusedProjection` computed from the same input (shape (..., out_features)). Raises KVSqueezeError when called
    before the group's first projection or on another input."""

    def __init__(self, name: str, first: str, out_features: int):
        super().__init__()
        self.name, self.first, self.out_features = name, first, out_features
        self.stash = _Stash()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stash
        if s.out is None or s.x is not x:
            raise KVSqueezeError(f"fused projections: {self.name} was called before {self.first} or on another "
                                 "input; this model projects in another order: build the decoder with "
                                 "fuse_projections=False")
        out = s.out
        s.x = s.out = None
        return out


def _fusable(parts) -> bool:
    return (all(type(p) is nn.Linear for p in parts) and len({p.in_features for p in parts}) == 1
            and len({(p.weight.dtype, p.weight.device) for p in parts}) == 1 and parts[0].weight.is_floating_point()
            and parts[0].weight.device.type != "meta" and len({p.bias is None for p in parts}) == 1)


class FusedProjection(nn.Module):
    """Stands in for a group's first projection: x (..., in) -> its part (..., out_0) of x @ [W_0; W_1; ...]^T
    (+ the biases), the other parts stashed for `others` (`StashedPart`s, in the group's order).

    `names`: the projections' attribute names (e.g. q_proj, k_proj, v_proj); `parts`: their `nn.Linear`s. Building
    re-points each part's weight (and bias) at its rows of the fused matrix: no extra memory (module docstring)."""

    def __init__(self, names: tuple[str, ...], parts: list[nn.Linear]):
        super().__init__()
        with torch.no_grad():
            weight = torch.cat([p.weight for p in parts])
            bias = torch.cat([p.bias for p in parts]) if parts[0].bias is not None else None
            start = 0
            for p in parts:  # the originals become views of the fused rows (their storage is freed)
                n = p.out_features
                p.weight.data = weight[start:start + n]
                if bias is not None:
                    p.bias.data = bias[start:start + n]
                start += n
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.names = names
        self.splits = tuple(p.out_features for p in parts)
        self.others = nn.ModuleList(StashedPart(n, names[0], p.out_features) for n, p in zip(names[1:], parts[1:]))

    def views(self) -> tuple[torch.Tensor, ...]:
        """The fused weight's row blocks, one per projection (what the originals' weights point at)."""
        return self.weight.split(self.splits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, *rest = F.linear(x, self.weight, self.bias).split(self.splits, dim=-1)
        for part, out in zip(self.others, rest):
            part.stash.x, part.stash.out = x, out
        return first


def build_fused_projections(model) -> list[tuple[nn.Module, FusedProjection]]:
    """For every module of `model` holding one of `GROUPS` as plain `nn.Linear` layers of one input size, dtype,
    device and bias kind: (module, its `FusedProjection`); the originals' weights become views of the fused ones.
    Raises KVSqueezeError when the model has no such group."""
    out = []
    for mod in list(model.modules()):
        for names in GROUPS:
            parts = [getattr(mod, n, None) for n in names]
            if not (all(isinstance(p, nn.Module) for p in parts) and _fusable(parts)):
                continue
            built = mod.__dict__.setdefault("_kvsqueeze_fused", {})  # one fused weight per group, however many decoders
            f = built.get(names)
            if f is None or any(p.weight.data_ptr() != v.data_ptr() for p, v in zip(parts, f.views())):
                f = built[names] = FusedProjection(names, parts)
            out.append((mod, f))
    if not out:
        raise KVSqueezeError("fuse_projections: the model has no q_proj / k_proj / v_proj or gate_proj / up_proj "
                             "linear layers to fuse")
    return out


@contextlib.contextmanager
def swapped(fused: list[tuple[nn.Module, FusedProjection]] | None):
    """While the block runs, each group's projections are the fused stand-ins; restored after (also on error).
    `fused` None or empty: nothing is swapped."""
    if not fused:
        yield
        return
    saved = [(mod, f.names, [getattr(mod, n) for n in f.names]) for mod, f in fused]
    try:
        for mod, f in fused:
            for name, stand_in in zip(f.names, (f, *f.others)):
                setattr(mod, name, stand_in)
        yield
    finally:
        for mod, names, parts in saved:
            for name, part in zip(names, parts):
                setattr(mod, name, part)
