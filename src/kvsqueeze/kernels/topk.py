"""Top-k indices in increasing order, one Triton program per row (GPU): the page choice of a decode-time selector.

A selector (Quest's static step, `selection/static_quest.py`) keeps the k pages of largest score per (row, kv
head) out of P, every layer and step, then reads them in increasing order. `torch.topk` followed by a sort costs
about 60 us per layer on an H200 at P = 8192 (128k tokens in pages of 16; `bench/gpu_decode.py --profile`:
radix-select passes over memory, then two sorts), far more than the attention it selects for. Here one program
holds its row in registers and finds the k-th largest value by bisection on the value's bits, with no memory
traffic per pass (a radix select):

    key(x) = an unsigned 32-bit integer whose order is the float order (sign bit flipped for x >= 0, every bit
             flipped for x < 0)
    T      = the k-th largest key, found 8 bits at a time from the top: per pass a 256-bin histogram of the next
             digit over the keys sharing the digits found so far, and the largest digit with >= `need` keys at or
             above it (`need` drops by the keys strictly above)
    take_j = key_j > T  or  (key_j == T and j among the first `need` such j)
    out    = the taken j in increasing order               (positions by a prefix sum: no sort)

Ties at the threshold go to the lowest indices (`torch.topk` leaves their order unspecified). Rows longer than
`MAX_ROW` fall back to `torch.topk` + sort (registers). `reference_topk_increasing` is the torch rule.
"""

from __future__ import annotations

import torch

from .split_kv import tl, triton

MAX_ROW = 16384  # longest row one program holds in registers

if triton is not None:

    @triton.jit
    def _topk_increasing(X, OUT, P, K, s_x, s_o, BLOCK_P: tl.constexpr):
        row = tl.program_id(0)
        j = tl.arange(0, BLOCK_P)
        ok = j < P
        x = tl.load(X + row * s_x + j, mask=ok, other=float("-inf")).to(tl.float32)
        bits = x.to(tl.int32, bitcast=True).to(tl.int64)
        # an unsigned 32-bit key in the float order: negative floats have every bit flipped, positive ones the sign
        key = tl.where(bits < 0, -1 - bits, bits + 2 ** 31)  # bits < 0: 2^31 - 1 - (bits & 0x7FFFFFFF)
        bins = tl.arange(0, 512)
        real = bins < 256
        prefix = tl.zeros([], tl.int64)  # the high digits of the k-th largest key found so far
        need = tl.zeros([], tl.int32) + K  # how many of the keys with that prefix are still to be taken
        for p in tl.static_range(4):  # radix select, 8 bits per pass from the top
            shift: tl.constexpr = 24 - 8 * p
            match = ok & ((key >> (shift + 8)) == prefix)
            digit = tl.where(match, (key >> shift) & 255, 256 + (j & 255))  # others into the spare bins
            h = tl.histogram(digit.to(tl.int32), 512)
            h = tl.where(real, h, 0)
            above_eq = tl.sum(h, 0) - tl.cumsum(h, 0) + h  # keys with this prefix and digit >= the bin
            d = tl.max(tl.where(real & (above_eq >= need), bins, -1), 0)
            need = need - (tl.sum(tl.where(bins == d, above_eq - h, 0), 0)).to(tl.int32)
            prefix = prefix * 256 + d
        gt = ok & (key > prefix)
        eq = ok & (key == prefix)
        take = gt | (eq & (tl.cumsum(eq.to(tl.int32), 0) <= need))
        pos = tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(OUT + row * s_o + pos, j.to(tl.int64), mask=take)


def reference_topk_increasing(x: torch.Tensor, k: int) -> torch.Tensor:
    """x (..., P) float -> (..., k) long: the indices of the k largest values of each row, in increasing order
    (torch.topk, then a sort; ties in any order)."""
    return x.topk(k, dim=-1).indices.sort(dim=-1).values


def topk_increasing(x: torch.Tensor, k: int) -> torch.Tensor:
    """x (..., P) float -> (..., k) long: the indices of the k largest values of each row, in increasing order;
    ties at the k-th value go to the lowest indices. The Triton kernel (module docstring) where triton is installed
    and x is on CUDA (or under TRITON_INTERPRET=1 on the CPU) with P <= MAX_ROW; `reference_topk_increasing`
    otherwise. Capturable in a CUDA graph (a fixed grid, no host number). Raises ValueError for k outside [1, P]."""
    P = x.shape[-1]
    if not 1 <= k <= P:
        raise ValueError(f"top-k: k={k} outside [1, {P}]")
    # the CPU interpreter is not traceable: a compiled step on the CPU takes the torch rule
    interpret = x.device.type == "cpu" and _interpreting() and not torch.compiler.is_compiling()
    if triton is None or P > MAX_ROW or not (x.device.type == "cuda" or interpret):
        return reference_topk_increasing(x, k)
    rows = x.reshape(-1, P)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], k, dtype=torch.long, device=x.device)
    _topk_increasing[(rows.shape[0],)](rows, out, P, k, rows.stride(0), out.stride(0),
                                       BLOCK_P=max(16, triton.next_power_of_2(P)), num_warps=8)
    return out.view(*x.shape[:-1], k)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"
