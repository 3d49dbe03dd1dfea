"""Top-k indices in increasing order, one Triton program per row (GPU): the page choice of a decode-time selector.

A selector (Quest's static step, `selection/static_quest.py`) keeps the k pages of largest score per (row, kv
head) out of P, every layer and step, then reads them in increasing order. `torch.topk` followed by a sort costs
about 60 us per layer on an H200 at P = 8192 (128k tokens in pages of 16; `bench/gpu_decode.py --profile`:
radix-select passes over memory, then two sorts), far more than the attention it selects for. Here one program
holds its row in registers and finds the k-th largest value by bisection on the value's bits, with no memory
traffic per pass:

    key(x) = bits(x) XOR (0x7FFFFFFF if x < 0 else 0)     (an int32 whose order is the float order)
    T      = max { t : #{j : key_j >= t} >= k }          (32 halvings of the int32 range)
    take_j = key_j > T  or  (key_j == T and j among the first k - #{key > T} such j)
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
        bits = x.to(tl.int32, bitcast=True)
        key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)
        key = tl.where(ok, key, -(2 ** 40))  # padding: below every real key, never taken (K <= P)
        lo = tl.min(tl.where(ok, key, 2 ** 40), 0)  # count(key >= lo) = P >= K
        hi = tl.max(key, 0)
        for _ in range(33):  # invariant: count(key >= lo) >= K and the answer is in [lo, hi]; 2^32 keys: 33 halvings
            mid = lo + (hi - lo + 1) // 2
            enough = tl.sum((key >= mid).to(tl.int32), 0) >= K
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
        gt = key > lo
        eq = key == lo
        need = K - tl.sum(gt.to(tl.int32), 0)
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
