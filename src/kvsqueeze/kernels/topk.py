"""Top-k indices in increasing order, one Triton program per row (GPU): the page choice of a decode-time selector.

Quest's and AttentionPredictor's static steps (`selection/static_quest.py`, `selection/static_attention_predictor.py`)
keep, every layer and step, the k pages of largest score per (row, kv head) out of P, and read them in increasing
order. `torch.topk` followed by a sort of the indices cost 43 + 4.5 us per layer on an H200 at P = 8192 (128k
tokens in pages of 16, k = 256; `bench/gpu_decode.py --profile 2`, thirteenth session): a single-block radix
select of 16 passes of 2 bits over memory for 8 rows, 1.4 ms of a 7.8 ms step over 30 layers. Here one program
holds its row in registers and finds the k-th largest value by a W-ary search on the values' order keys, stopping
as soon as the count at the lower end is exactly k:

    key(x)   = bits(x) XOR (0x7FFFFFFF if x < 0 else 0)        an int32 whose order is the float order
    [lo, hi] : count(key >= lo) >= k > count(key >= hi + 1)      (lo, hi: the smallest and largest key at first)
    per pass : W - 1 cuts t_i = lo + ceil(i (hi - lo + 1) / W) counted at once (a (W, P) comparison and a sum),
               [lo, hi] becomes the cut interval holding the k-th largest key; until lo = hi or count(key >= lo) = k
    T        = the float of key lo
    take_j   = x_j > T  or  (x_j = T and j among the first k - count(x > T) such j)
    out      = the taken j in increasing order                  (positions by a prefix sum: no sort)

At most ceil(32 / log2 W) passes; usually fewer (the count hits k exactly once the interval separates the k-th
value from the (k+1)-th). Ties at the k-th value go to the lowest indices (`torch.topk` leaves them unspecified);
NaN scores count as -inf. Comparisons are on the floats (thresholds converted back from keys), so the padding of
the row's block is NaN and never counts. Rows longer than `MAX_ROW` fall back to `reference_topk_increasing`.

The twelfth session's two kernels were a binary search (one cut per pass: 33 passes, 67 us per layer, slower than
torch) and a radix select on `tl.histogram` (failed on the H200 with triton 3.6; git history, 3d418e7).
"""

from __future__ import annotations

import os

import torch

from .split_kv import tl, triton

MAX_ROW = 16384  # longest row one program holds in registers
WAYS = 4  # cuts + 1 per pass (bench/topk.py)
WARPS = 8
KERNEL = True  # False: `topk_increasing` always takes the torch rule (bench/gpu_decode.py --topk torch)

if triton is not None:

    @triton.jit
    def _key_float(t):
        # int64 order key (int32 range) -> the float32 whose key it is (the XOR is its own inverse)
        bits = tl.where(t >= 0, t, t ^ 0x7FFFFFFF)
        return bits.to(tl.int32).to(tl.float32, bitcast=True)

    @triton.jit
    def _topk_increasing(X, OUT, P, K, s_x, s_o, BLOCK_P: tl.constexpr, W: tl.constexpr):
        row = tl.program_id(0)
        j = tl.arange(0, BLOCK_P)
        ok = j < P
        x = tl.load(X + row * s_x + j, mask=ok, other=0.0).to(tl.float32)
        x = tl.where(x == x, x, float("-inf"))  # NaN scores: -inf
        bits = x.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        lo = tl.min(tl.where(ok, key, 2147483647), 0).to(tl.int64)
        hi = tl.max(tl.where(ok, key, -2147483648), 0).to(tl.int64)
        x = tl.where(ok, x, float("nan"))  # padding: no comparison holds
        cnt_lo = P
        w = tl.arange(0, W).to(tl.int64) + 1  # cut i = 1 .. W (cut W is hi + 1: count < K, invariant)
        while (lo < hi) & (cnt_lo != K):
            t = lo + (w * (hi - lo + 1) + W - 1) // W  # (W,) increasing, t_1 > lo
            c = tl.sum((x[None, :] >= _key_float(t)[:, None]).to(tl.int32), 1)  # (W,) decreasing in i
            enough = c >= K
            lo = tl.max(tl.where(enough, t, lo), 0)
            cnt_lo = tl.min(tl.where(enough, c, cnt_lo), 0)
            hi = tl.min(tl.where(enough, hi + 1, t), 0) - 1
        thr = _key_float(lo)
        gt = x > thr
        eq = x == thr
        need = K - tl.sum(gt.to(tl.int32), 0)
        take = gt | (eq & (tl.cumsum(eq.to(tl.int32), 0) <= need))
        pos = tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(OUT + row * s_o + pos, j.to(tl.int64), mask=take)


def reference_topk_increasing(x: torch.Tensor, k: int) -> torch.Tensor:
    """x (..., P) float -> (..., k) long: the indices of the k largest values of each row, in increasing order
    (`torch.topk(sorted=False)`, then a sort of the indices; ties in any order)."""
    return x.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values


def kernel_applies(x: torch.Tensor) -> bool:
    """Whether `topk_increasing` runs the Triton kernel for `x`: `KERNEL` set, triton installed, rows of at most
    `MAX_ROW`, and x on CUDA (or on the CPU under TRITON_INTERPRET=1 outside torch.compile, for tests)."""
    if not KERNEL or triton is None or x.shape[-1] > MAX_ROW:
        return False
    if x.device.type == "cuda":
        return True
    return (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
            and not torch.compiler.is_compiling())


def topk_increasing(x: torch.Tensor, k: int, ways: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """x (..., P) float (any float dtype) -> (..., k) long: the indices of the k largest values of each row, in
    increasing order; ties at the k-th value go to the lowest indices, NaN counts as -inf. The Triton kernel
    (module docstring) where `kernel_applies(x)`, `reference_topk_increasing` otherwise (the same set up to the
    order of ties). `ways` (a power of two >= 2, default `WAYS`) and `num_warps` (default `WARPS`) tune the kernel.
    Capturable in a CUDA graph (a fixed grid, no host number per call). Raises ValueError for k outside [1, P] or a
    bad `ways`."""
    P = x.shape[-1]
    if not 1 <= k <= P:
        raise ValueError(f"top-k: k={k} outside [1, {P}]")
    ways = WAYS if ways is None else ways
    if ways < 2 or ways & (ways - 1):
        raise ValueError(f"top-k: ways={ways} is not a power of two >= 2")
    if not kernel_applies(x):
        return reference_topk_increasing(x, k)
    rows = x.reshape(-1, P)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], k, dtype=torch.long, device=x.device)
    _topk_increasing[(rows.shape[0],)](rows, out, P, k, rows.stride(0), out.stride(0),
                                       BLOCK_P=max(16, triton.next_power_of_2(P)), W=ways,
                                       num_warps=WARPS if num_warps is None else num_warps)
    return out.view(*x.shape[:-1], k)
