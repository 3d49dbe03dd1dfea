"""Top-k indices in increasing order, one Triton program per row (GPU): the page choice of a decode-time selector.

Quest's and AttentionPredictor's static steps (`selection/static_quest.py`, `selection/static_attention_predictor.py`)
keep, every layer and step, the k pages of largest score per (row, kv head) out of P, and read them in increasing
order. `torch.topk` followed by a sort of the indices cost 43 + 4.5 us per layer on an H200 at P = 8192 (128k
tokens in pages of 16, k = 256; `bench/gpu_decode.py --profile 2`, thirteenth session): a single-block radix
select of 16 passes of 2 bits over memory for 8 rows, 1.4 ms of a 7.8 ms step over 30 layers. Here one program
per row finds the k-th largest value by a W-ary search on the values' order keys, stopping as soon as the count
at the lower end is exactly k. Each pass reads the row in tiles of `TILE` scores (from L1 after the first pass)
and counts per lane, so one cross-warp reduction per pass whatever the row's length:

    key(x)   = bits(x) XOR (0x7FFFFFFF if x < 0 else 0)        an int32 whose order is the float order
    [lo, hi] : count(key >= lo) >= k > count(key >= hi + 1)      (at first the smallest and largest finite keys)
    per pass : W - 1 cuts t_i = lo + ceil(i (hi - lo + 1) / W) counted at once (a (W, P) comparison and a sum),
               [lo, hi] becomes the cut interval holding the k-th largest key; until lo = hi or count(key >= lo) = k
    T        = the float of key lo
    take_j   = x_j > T  or  (x_j = T and j among the first k - count(x > T) such j)
    out      = the taken j in increasing order                  (positions by a prefix sum: no sort)

At most ceil(32 / log2 W) passes; usually fewer (the count hits k exactly once the interval separates the k-th
value from the (k+1)-th). Ties at the k-th value go to the lowest indices (`torch.topk` leaves them unspecified);
NaN scores count as -inf. Comparisons are on the floats (thresholds converted back from keys), so the padding of
the last tile is NaN and never counts.

Measured on the H200 (docs/gpu.md, thirteenth session): 33 us per layer inside the 128k Quest step (986 us per
step against 1421 for torch.topk and the sort; the step 7.14 ms against 7.77), and in `bench/topk.py` 32.6 us
against 70.8 (8 rows x 8200 scores, k = 256) and 14.1 against 30.5 (8 x 2056, k = 128). The eighth session's two
kernels were a binary search (one cut per pass: 33 passes, 67 us per layer, slower than torch) and a radix select
on `tl.histogram` (failed on the H200 with triton 3.6; git history, 3d418e7).
"""

from __future__ import annotations

import os

import torch

from .split_kv import tl, triton

WAYS = 8  # cuts + 1 per pass (bench/topk.py)
WARPS = 8
TILE = 1024  # scores a program holds in registers at once; a longer row is read in tiles per pass (from L1)
KERNEL = True  # False: `topk_increasing` always takes the torch rule (bench/gpu_decode.py --topk torch)

if triton is not None:

    @triton.jit
    def _float_key(x):
        # float32 scalar -> its int64 order key (int32 range)
        bits = x.to(tl.int32, bitcast=True)
        return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)

    @triton.jit
    def _key_float(t):
        # int64 order key (int32 range) -> the float32 whose key it is (the XOR is its own inverse)
        bits = tl.where(t >= 0, t, t ^ 0x7FFFFFFF)
        return bits.to(tl.int32).to(tl.float32, bitcast=True)

    @triton.jit
    def _tile(X, t0, j, P):
        # scores t0 + j of a row as float32: NaN scores -inf, positions past P NaN (no comparison holds)
        ok = t0 + j < P
        x = tl.load(X + t0 + j, mask=ok, other=0.0).to(tl.float32)
        x = tl.where(x == x, x, float("-inf"))
        return tl.where(ok, x, float("nan")), ok

    @triton.jit
    def _topk_increasing(X, OUT, P, K, s_x, s_o, TILE: tl.constexpr, W: tl.constexpr):
        row = tl.program_id(0)
        X = X + row * s_x
        j = tl.arange(0, TILE)
        # the search starts on the finite scores' range (infinities would cost it two or three passes): lo the
        # smallest score above -inf (-inf itself when fewer than K are above it), hi the largest below +inf (lo =
        # hi = +inf when K or more are +inf)
        mn = tl.full([TILE], float("inf"), tl.float32)
        mx = tl.full([TILE], float("-inf"), tl.float32)
        n_up = tl.zeros([TILE], tl.int32)  # scores above -inf
        n_inf = tl.zeros([TILE], tl.int32)  # +inf
        for t0 in range(0, P, TILE):
            x, ok = _tile(X, t0, j, P)
            up = ok & (x > float("-inf"))
            n_up += up.to(tl.int32)
            n_inf += (x == float("inf")).to(tl.int32)
            mn = tl.minimum(mn, tl.where(up, x, float("inf")))
            mx = tl.maximum(mx, tl.where(x < float("inf"), x, float("-inf")))
        above = tl.sum(n_up, 0)
        lo = tl.where(above >= K, _float_key(tl.min(mn, 0)), -2139095041)  # key(-inf)
        cnt_lo = tl.where(above >= K, above, P)
        hi = _float_key(tl.max(mx, 0))
        top = tl.sum(n_inf, 0) >= K
        lo = tl.where(top, 2139095040, lo)  # key(+inf)
        hi = tl.where(top, lo, hi)
        w = tl.arange(0, W).to(tl.int64) + 1  # cut i = 1 .. W (cut W is hi + 1: count < K, invariant)
        while (lo < hi) & (cnt_lo != K):
            t = lo + (w * (hi - lo + 1) + W - 1) // W  # (W,) increasing, t_1 > lo
            tf = _key_float(t)
            acc = tl.zeros([W, TILE], tl.int32)  # per-lane counts: one cross-warp reduction per pass
            for t0 in range(0, P, TILE):
                x, ok = _tile(X, t0, j, P)
                acc += (x[None, :] >= tf[:, None]).to(tl.int32)
            c = tl.sum(acc, 1)  # (W,) decreasing in i
            enough = c >= K
            lo = tl.max(tl.where(enough, t, lo), 0)
            cnt_lo = tl.min(tl.where(enough, c, cnt_lo), 0)
            hi = tl.min(tl.where(enough, hi + 1, t), 0) - 1
        thr = _key_float(lo)
        n_gt = tl.zeros([TILE], tl.int32)
        for t0 in range(0, P, TILE):
            x, ok = _tile(X, t0, j, P)
            n_gt += (x > thr).to(tl.int32)
        need = K - tl.sum(n_gt, 0)  # ties at thr to take, lowest index first
        n_eq = tl.zeros([], tl.int32)
        n_take = tl.zeros([], tl.int32)
        for t0 in range(0, P, TILE):
            x, ok = _tile(X, t0, j, P)
            eq = (x == thr).to(tl.int32)
            take = (x > thr) | ((n_eq + tl.cumsum(eq, 0) <= need) & (eq != 0))
            pos = n_take + tl.cumsum(take.to(tl.int32), 0) - 1
            tl.store(OUT + row * s_o + pos, (t0 + j).to(tl.int64), mask=take)
            n_eq += tl.sum(eq, 0)
            n_take += tl.sum(take.to(tl.int32), 0)


def reference_topk_increasing(x: torch.Tensor, k: int) -> torch.Tensor:
    """x (..., P) float -> (..., k) long: the indices of the k largest values of each row, in increasing order
    (`torch.topk(sorted=False)`, then a sort of the indices; ties in any order)."""
    return x.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values


def kernel_applies(x: torch.Tensor) -> bool:
    """Whether `topk_increasing` runs the Triton kernel for `x`: `KERNEL` set, triton installed, and x on CUDA (or
    on the CPU under TRITON_INTERPRET=1 outside torch.compile, for tests)."""
    if not KERNEL or triton is None:
        return False
    if x.device.type == "cuda":
        return True
    return (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
            and not torch.compiler.is_compiling())


def topk_increasing(x: torch.Tensor, k: int, ways: int | None = None, num_warps: int | None = None,
                    tile: int | None = None) -> torch.Tensor:
    """x (..., P) float (any float dtype) -> (..., k) long: the indices of the k largest values of each row, in
    increasing order; ties at the k-th value go to the lowest indices, NaN counts as -inf. The Triton kernel
    (module docstring) where `kernel_applies(x)`, `reference_topk_increasing` otherwise (the same set up to the
    order of ties). `ways` (a power of two >= 2, default `WAYS`) and `num_warps` (default `WARPS`) tune the kernel.
    Capturable in a CUDA graph (a fixed grid, no host number per call). Raises ValueError for k outside [1, P] or a
    bad `ways` or `tile`."""
    P = x.shape[-1]
    if not 1 <= k <= P:
        raise ValueError(f"top-k: k={k} outside [1, {P}]")
    ways = WAYS if ways is None else ways
    if ways < 2 or ways & (ways - 1):
        raise ValueError(f"top-k: ways={ways} is not a power of two >= 2")
    if tile is not None and (tile < 16 or tile & (tile - 1)):
        raise ValueError(f"top-k: tile={tile} is not a power of two >= 16")
    if not kernel_applies(x):
        return reference_topk_increasing(x, k)
    rows = x.reshape(-1, P)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], k, dtype=torch.long, device=x.device)
    tile = min(TILE if tile is None else tile, max(16, triton.next_power_of_2(P)))
    _topk_increasing[(rows.shape[0],)](rows, out, P, k, rows.stride(0), out.stride(0), TILE=tile, W=ways,
                                       num_warps=WARPS if num_warps is None else num_warps)
    return out.view(*x.shape[:-1], k)
