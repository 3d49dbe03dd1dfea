"""Bit packing and asymmetric (min/max) uniform quantization: the primitives every scheme here stores with.

Packing. `b`-bit codes (b in 1, 2, 4, 8) are packed `8 // b` to a byte, code `j` of a byte in bits
`[b*j, b*j + b)` (little-endian within the byte), either along channels (`along="channel"`: channel `c` of a
token lives in byte `c // (8 // b)` at shift `(c % (8 // b)) * b`) or along tokens (`along="token"`, KIVI's
layout: token `t` of a channel lives in packed row `t // (8 // b)` at shift `(t % (8 // b)) * b`, so a row of
packed bytes holds `8 // b` whole tokens in natural channel order). The Triton decode kernel (`triton_decode.py`)
reads the token layout: one contiguous row of `d` bytes unpacks into `8 // b` tokens.

Quantization (KIVI's asymmetric min/max round-to-nearest, the same in MiKV, ZipCache and GEAR):

    s = (max(X_g) - min(X_g)) / (2^b - 1),   z = min(X_g),   code = clamp(round((X - z) / s), 0, 2^b - 1)
    X_hat = code * s + z                     so  |X - X_hat| <= s / 2   inside every group g

Groups are either along tokens (`axis="token"`: for each channel, `group` consecutive tokens share s and z; KIVI's
per-channel keys) or along channels (`axis="channel"`: for each token, `group` consecutive channels share s and z;
KIVI's per-token values). Scales and zero points are stored in float16 (as KIVI's reference code does) and the
codes are computed from the stored, rounded s and z, so dequantization is exactly what the bound above assumes
(up to one float16 rounding of z and s); values outside float16's range fall back to float32 scales.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

SUPPORTED_BITS = (1, 2, 4, 8)


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return 8 // bits


def _packed_dim(along: str) -> int:
    """The dimension codes are packed along: channels (last) or tokens (second to last)."""
    try:
        return {"channel": -1, "token": -2}[along]
    except KeyError:
        raise ValueError(f"along must be 'channel' or 'token', got {along!r}") from None


def pack(codes: torch.Tensor, bits: int, along: str = "channel") -> torch.Tensor:
    """(b, h, n, d) uint8 codes < 2^bits -> (b, h, n, d * bits / 8) (along="channel") or (b, h, n * bits / 8, d)
    (along="token") uint8."""
    per, dim = _check_bits(bits), _packed_dim(along)
    if per == 1:
        return codes.to(torch.uint8).contiguous()
    n = codes.shape[dim]
    if n % per:
        raise ValueError(f"{along} dimension {n} is not a multiple of {per} ({bits}-bit packing)")
    c = codes.to(torch.uint8).unflatten(dim, (n // per, per))  # the `per` codes of a byte sit at `dim`
    out = c.select(dim, 0).clone()
    for j in range(1, per):
        out |= c.select(dim, j) << (bits * j)
    return out


def unpack(packed: torch.Tensor, bits: int, along: str = "channel") -> torch.Tensor:
    """Inverse of `pack`: uint8 codes (b, h, n, d)."""
    per, dim = _check_bits(bits), _packed_dim(along)
    if per == 1:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device).view(per, *[1] * (-dim - 1))
    return ((packed.unsqueeze(dim) >> shifts) & ((1 << bits) - 1)).flatten(dim - 1, dim)


def _scale_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float16 if bool(x.abs().amax() < 6e4) else torch.float32


@dataclass
class QTensor:
    """A packed, asymmetrically quantized (batch, heads, n, d) tensor.

    codes: (b, h, n, d * bits / 8) uint8 packed along channels, or (b, h, n * bits / 8, d) packed along tokens;
    scale, zero: (b, h, n // group, d) for axis="token", (b, h, n, d // group) for axis="channel".
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    axis: str  # "token" (groups of tokens, per channel) or "channel" (groups of channels, per token)
    group: int
    d: int
    packed_along: str = "channel"

    @property
    def n(self) -> int:
        return self.codes.shape[2] * (8 // self.bits if self.packed_along == "token" else 1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "scale": self.scale, "zero": self.zero}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        codes = unpack(self.codes, self.bits, self.packed_along)
        b, h, n, d = codes.shape
        if self.axis == "token":
            g = codes.view(b, h, n // self.group, self.group, d).to(dtype)
            x = g * self.scale[:, :, :, None, :].to(dtype) + self.zero[:, :, :, None, :].to(dtype)
        else:
            g = codes.view(b, h, n, d // self.group, self.group).to(dtype)
            x = g * self.scale[..., None].to(dtype) + self.zero[..., None].to(dtype)
        return x.view(b, h, n, d)

    def cat(self, other: "QTensor") -> "QTensor":
        return replace(self, codes=torch.cat([self.codes, other.codes], 2), scale=torch.cat([self.scale, other.scale], 2),
                       zero=torch.cat([self.zero, other.zero], 2))

    def map(self, fn) -> "QTensor":
        """Apply fn to every tensor (batch-dimension operations: beam reorder, batch select)."""
        return replace(self, codes=fn(self.codes), scale=fn(self.scale), zero=fn(self.zero))

    def take_tokens(self, idx: torch.Tensor) -> "QTensor":
        """Gather tokens idx (b, h, k): exact (no requantization) for per-token groups (axis="channel")."""
        if self.axis != "channel" or self.packed_along != "channel":
            raise ValueError("only per-token quantized, channel-packed tensors can gather tokens exactly")

        def take(t):
            return t.gather(2, idx[..., None].expand(*idx.shape, t.shape[-1]))

        return self.map(take)


def quantize(x: torch.Tensor, bits: int, axis: str, group: int, pack_along: str = "channel") -> QTensor:
    """Quantize x (b, h, n, d) with `bits`-bit asymmetric min/max, groups of `group` along `axis` (see module doc),
    codes packed along `pack_along` ("channel" or "token")."""
    _check_bits(bits)
    b, h, n, d = x.shape
    xf = x.float()
    if axis == "token":
        if n % group:
            raise ValueError(f"{n} tokens is not a multiple of the token group size {group}")
        g = xf.view(b, h, n // group, group, d)
        lo, hi = g.amin(3), g.amax(3)  # (b, h, n/G, d)
    elif axis == "channel":
        if d % group:
            raise ValueError(f"head_dim {d} is not a multiple of the channel group size {group}")
        g = xf.view(b, h, n, d // group, group)
        lo, hi = g.amin(-1), g.amax(-1)  # (b, h, n, d/G)
    else:
        raise ValueError(f"axis must be 'token' or 'channel', got {axis!r}")
    qmax = (1 << bits) - 1
    sdt = _scale_dtype(xf) if xf.numel() else torch.float16
    scale = ((hi - lo) / qmax).to(sdt)
    zero = lo.to(sdt)
    s, z = scale.float(), zero.float()
    if axis == "token":
        s, z = s[:, :, :, None, :], z[:, :, :, None, :]
    else:
        s, z = s[..., None], z[..., None]
    codes = torch.where(s > 0, torch.round((g - z) / torch.where(s > 0, s, 1.0)), 0.0).clamp_(0, qmax)
    codes = codes.to(torch.uint8).view(b, h, n, d)
    return QTensor(pack(codes, bits, pack_along), scale, zero, bits, axis, group, d, pack_along)
