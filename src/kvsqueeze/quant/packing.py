"""Bit packing and asymmetric (min/max) uniform quantization: the primitives every scheme here stores with.

Packing. `b`-bit codes (b in 1, 2, 4, 8) are packed `8 // b` to a byte, code `j` of a byte in bits
`[b*j, b*j + b)` (little-endian within the byte), either along channels (`along="channel"`: channel `c` of a
token lives in byte `c // (8 // b)` at shift `(c % (8 // b)) * b`) or along tokens (`along="token"`, KIVI's
layout: token `t` of a channel lives in packed row `t // (8 // b)` at shift `(t % (8 // b)) * b`, so a row of
packed bytes holds `8 // b` whole tokens in natural channel order). The Triton decode kernel (`kernels/kivi_decode.py`)
reads the token layout: one contiguous row of `d` bytes unpacks into `8 // b` tokens.

Quantization (KIVI's asymmetric min/max round-to-nearest, the same in MiKV, ZipCache and GEAR):

    s = (max(X_g) - min(X_g)) / (2^b - 1),   z = min(X_g),   code = clamp(round((X - z) / s), 0, 2^b - 1)
    X_hat = code * s + z                     so  |X - X_hat| <= s / 2   inside every group g

Quantization is either per channel (`axis=PER_CHANNEL`, "per_channel": for each channel, `group` consecutive
tokens share s and z; KIVI's keys) or per token (`axis=PER_TOKEN`, "per_token": for each token, `group`
consecutive channels share s and z; KIVI's values, MiKV, ZipCache). Scales and zero points are stored in bfloat16: 2 bytes each as in KIVI's reference code
(float16 there), but with float32's range, so no finite input overflows them (float16 does beyond 65504, which
fp32 and bf16 models reach). The zero point is rounded *down* (z <= min) and the scale *up* from (max - z), and the
codes are computed from the stored s and z, so every code stays in [0, 2^b - 1] and the bound holds with the stored
values: |X - X_hat| <= s / 2 <= (max - min + 2^-7 |min|) (1 + 2^-7) / (2 (2^b - 1)) (bfloat16's 8-bit significand
costs a 2^-7 share of |min| spread over the 2^b - 1 steps, not added to each value). Dequantization computes in
float32 and clamps to the output dtype's finite range (a value next to float16's largest can round above it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

SUPPORTED_BITS = (1, 2, 4, 8)
# Elements (batch * heads * tokens * d) quantized or dequantized at once: longer tensors go in slices of whole groups
# and packed bytes, so the float32 temporaries of either stay near 4 * SLICE_ELEMENTS bytes each whatever the
# length (a chunked prefill's eviction re-quantizes the kept cache of a layer: at 1M tokens and 8x, 0.5 GB per
# temporary unsliced). The results are the same bit for bit (groups never straddle a slice).
SLICE_ELEMENTS = 1 << 24
PER_CHANNEL = "per_channel"  # KIVI's key quantization: a group is `group` tokens of one channel
PER_TOKEN = "per_token"  # KIVI's value quantization: a group is `group` channels of one token
AXES = (PER_CHANNEL, PER_TOKEN)


def _check_axis(axis: str) -> str:
    if axis not in AXES:
        raise ValueError(f"axis must be {PER_CHANNEL!r} (groups of tokens of one channel) or {PER_TOKEN!r} (groups "
                         f"of channels of one token), got {axis!r}")
    return axis


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


def round_bf16(x: torch.Tensor, up: bool) -> torch.Tensor:
    """float32 x -> the nearest bfloat16 >= x (up=True) or <= x (up=False), elementwise, any device."""
    y = x.to(torch.bfloat16)
    bits = y.view(torch.int16)
    if up:  # one bfloat16 step towards +inf: magnitude +1 for positives, -1 for negatives, 0 -> smallest positive
        nxt = torch.where(y > 0, bits + 1, torch.where(y < 0, bits - 1, torch.ones_like(bits)))
        wrong = y.float() < x
    else:
        nxt = torch.where(y > 0, bits - 1, torch.where(y < 0, bits + 1, torch.full_like(bits, -32767)))
        wrong = y.float() > x
    return torch.where(wrong, nxt.view(torch.bfloat16), y)


def to_finite(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (float32) cast to `dtype`, clamped to its finite range first (finite stays finite)."""
    if dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(x.dtype).max:
        m = torch.finfo(dtype).max
        x = x.clamp(-m, m)
    return x.to(dtype)


@dataclass
class QTensor:
    """A packed, asymmetrically quantized (batch, heads, n, d) tensor.

    codes: (b, h, n, d * bits / 8) uint8 packed along channels, or (b, h, n * bits / 8, d) packed along tokens;
    scale, zero: (b, h, n // group, d) per channel (axis="per_channel"), (b, h, n, d // group) per token
    (axis="per_token").
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    axis: str  # "per_channel" (groups of tokens of one channel) or "per_token" (groups of channels of one token)
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

    def _token_unit(self) -> int:
        """Tokens of the smallest slice that is whole packed bytes and whole groups."""
        per = 8 // self.bits if self.packed_along == "token" else 1
        return per * self.group if self.axis == PER_CHANNEL else per

    def slice_tokens(self, start: int, stop: int) -> "QTensor":
        """Tokens start .. stop - 1 (both multiples of the whole-bytes-and-groups unit, or stop = n), as views."""
        per = 8 // self.bits if self.packed_along == "token" else 1
        g = self.group if self.axis == PER_CHANNEL else 1
        return replace(self, codes=self.codes[:, :, start // per : -(-stop // per)],
                       scale=self.scale[:, :, start // g : -(-stop // g)], zero=self.zero[:, :, start // g : -(-stop // g)])

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """(b, h, n, d) in `dtype`: computed in float32 (code * s can exceed float16's range when X_hat does not),
        then clamped to dtype's finite range; in slices of about `SLICE_ELEMENTS` elements (the same values)."""
        b, h = self.codes.shape[:2]
        n, d = self.n, self.d
        step = _slice_step(b * h * d, self._token_unit())
        if n <= step:
            return self._dequantize(dtype)
        out = torch.empty(b, h, n, d, dtype=dtype, device=self.codes.device)
        for start in range(0, n, step):
            out[:, :, start : start + step] = self.slice_tokens(start, min(n, start + step))._dequantize(dtype)
        return out

    def _dequantize(self, dtype) -> torch.Tensor:
        codes = unpack(self.codes, self.bits, self.packed_along)
        b, h, n, d = codes.shape
        f = torch.float32
        if self.axis == PER_CHANNEL:
            g = codes.view(b, h, n // self.group, self.group, d).to(f)
            x = g * self.scale[:, :, :, None, :].to(f) + self.zero[:, :, :, None, :].to(f)
        else:
            g = codes.view(b, h, n, d // self.group, self.group).to(f)
            x = g * self.scale[..., None].to(f) + self.zero[..., None].to(f)
        return to_finite(x.view(b, h, n, d), dtype)

    def cat(self, other: "QTensor") -> "QTensor":
        return replace(self, codes=torch.cat([self.codes, other.codes], 2), scale=torch.cat([self.scale, other.scale], 2),
                       zero=torch.cat([self.zero, other.zero], 2))

    def map(self, fn) -> "QTensor":
        """Apply fn to every tensor (batch-dimension operations: beam reorder, batch select)."""
        return replace(self, codes=fn(self.codes), scale=fn(self.scale), zero=fn(self.zero))

    def take_groups(self, runs: torch.Tensor, size: int) -> "QTensor":
        """Whole runs of `size` tokens, exact (codes, scales and zeros copied, nothing re-quantized): runs (b, h, m)
        long, run r = tokens r * size .. r * size + size - 1 of each (row, head) -> a QTensor of m * size tokens,
        run after run. Raises ValueError unless the codes are packed along tokens and `size` is a multiple of the
        tokens per byte (8 // bits) and, per channel, of the token group (so a run is whole bytes and groups)."""
        per = 8 // self.bits
        if self.packed_along != "token" or size % per or (self.axis == PER_CHANNEL and size % self.group):
            raise ValueError(f"runs of {size} tokens are not whole packed bytes and groups of this tensor")
        b, h, m = runs.shape

        def rows(unit: int) -> torch.Tensor:  # (b, h, m * unit): the rows r * unit .. r * unit + unit - 1
            step = torch.arange(unit, device=runs.device)
            return (runs[..., None] * unit + step).view(b, h, m * unit)

        s_rows = rows(size // self.group) if self.axis == PER_CHANNEL else rows(size)
        return replace(self, codes=_take(self.codes, rows(size // per)), scale=_take(self.scale, s_rows),
                       zero=_take(self.zero, s_rows))

    def take_tokens(self, idx: torch.Tensor) -> "QTensor":
        """Gather tokens idx (b, h, k): exact (no requantization) for per-token groups (axis="per_token")."""
        if self.axis != PER_TOKEN or self.packed_along != "channel":
            raise ValueError("only per-token quantized, channel-packed tensors can gather tokens exactly")

        def take(t):
            return t.gather(2, idx[..., None].expand(*idx.shape, t.shape[-1]))

        return self.map(take)


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (b, h, n, c) at rows idx (b, h, k) along dim 2 -> (b, h, k, c), contiguous."""
    return t.gather(2, idx[..., None].expand(*idx.shape, t.shape[-1])).contiguous()


def _slice_step(elements_per_token: int, unit: int) -> int:
    """Tokens per slice: a multiple of `unit`, about `SLICE_ELEMENTS` elements (at least one unit)."""
    return max(unit, SLICE_ELEMENTS // max(1, elements_per_token) // unit * unit)


def quantize(x: torch.Tensor, bits: int, axis: str, group: int, pack_along: str = "channel") -> QTensor:
    """Quantize x (b, h, n, d) with `bits`-bit asymmetric min/max, per channel (`axis="per_channel"`: groups of
    `group` tokens) or per token (`axis="per_token"`: groups of `group` channels) (see module doc), codes packed
    along `pack_along` ("channel" or "token"); scales and zeros in bfloat16 (any finite x). A long x is quantized
    in slices of whole groups and packed bytes (`SLICE_ELEMENTS`; the same result, bounded float32 temporaries).

    Raises ValueError for unsupported bits, an unknown axis, or n (per channel) / d (per token) not a multiple of
    `group`."""
    per = _check_bits(bits)
    _check_axis(axis)
    _packed_dim(pack_along)
    b, h, n, d = x.shape
    unit = (per if pack_along == "token" else 1) * (group if axis == PER_CHANNEL else 1)
    step = _slice_step(b * h * d, unit)
    if n > step and n % unit == 0:
        parts = [_quantize(x[:, :, s : s + step], bits, axis, group, pack_along) for s in range(0, n, step)]
        return replace(parts[0], codes=torch.cat([p.codes for p in parts], 2),
                       scale=torch.cat([p.scale for p in parts], 2), zero=torch.cat([p.zero for p in parts], 2))
    return _quantize(x, bits, axis, group, pack_along)


def _quantize(x: torch.Tensor, bits: int, axis: str, group: int, pack_along: str) -> QTensor:
    b, h, n, d = x.shape
    xf = x.float()
    if axis == PER_CHANNEL:
        if n % group:
            raise ValueError(f"{n} tokens is not a multiple of the token group size {group}")
        g = xf.view(b, h, n // group, group, d)
        lo, hi = g.amin(3), g.amax(3)  # (b, h, n/G, d)
    else:
        if d % group:
            raise ValueError(f"head_dim {d} is not a multiple of the channel group size {group}")
        g = xf.view(b, h, n, d // group, group)
        lo, hi = g.amin(-1), g.amax(-1)  # (b, h, n, d/G)
    qmax = (1 << bits) - 1
    zero = round_bf16(lo, up=False)  # z <= min: no code below 0
    scale = round_bf16((hi - zero.float()) / qmax, up=True)  # z + qmax * s >= max: no code above 2^b - 1
    s, z = scale.float(), zero.float()
    if axis == PER_CHANNEL:
        s, z = s[:, :, :, None, :], z[:, :, :, None, :]
    else:
        s, z = s[..., None], z[..., None]
    codes = torch.where(s > 0, torch.round((g - z) / torch.where(s > 0, s, 1.0)), 0.0).clamp_(0, qmax)
    codes = codes.to(torch.uint8).view(b, h, n, d)
    return QTensor(pack(codes, bits, pack_along), scale, zero, bits, axis, group, d, pack_along)
