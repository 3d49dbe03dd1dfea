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

The sample variant (`topk_increasing(x, k, algo="sample")`, `_topk_sample`; the same output) reads the full row
about twice instead of 3 + the search's passes: a pivot from a sample in registers, one pass compacting the scores
at or above it, the exact search on those only. One program per row; S, RA, RB and CAP come from the shapes
(`sample_plan`), so a CUDA graph keeps them:

    S        = min(SAMPLE, next_pow2(P))   sample_i = x[floor(i P / S)], i < S  (the whole row when P <= S)
    r        = k S / P                      the expected sample rank of the k-th largest
    RA, RB   = ceil(r + 3 sqrt(r) + 3), ceil(r + 5 sqrt(r) + 8)                (RA = RB = k when P <= S)
    a        = a sample score with RA <= count(sample >= a) <= RB   (the search above on the sample's registers,
               stopping once the count is in the window: a pass or two)
    one pass : n = count(x >= a); the first CAP of them (score, index) to a buffer, in increasing index order
               (positions by a prefix sum per tile); a barrier (the buffer is read by every thread)
    CAP      = min(next_pow2(P), next_pow2(2 (RB + 4 sqrt(RB) + 4) P / S))  (the buffer: torch.empty per call)
    k <= n <= CAP : the k-th largest of the row is the k-th largest of the buffer, all the row's scores above it
               and every tie at it are in the buffer: T by the exact search over the n buffered scores (chunks of
               min(TILE, CAP) from L1), then take_j and out as above over the buffer, which is in index order
    otherwise : the row runs the search kernel's steps as they are (`_search_row`; per row, the flag FELL = 1)

The window puts count(x >= a) >= k with a margin of about 3 standard deviations of the sample rank when the
sample's positions are independent of the scores (Quest's: no fallback on `bench/topk.py`'s rows at 8x8200:256,
8x2056:128 and 8x3000:64 in the interpreter, nor on 16 rows of each at S = 512 to 2048 in a numpy model). Rows
where they are not (the largest scores on the sampled positions, more equal scores at the k-th than the buffer
holds) take the fallback and cost one pass more than the search kernel. In the numpy model of the searches
(`bench/topk.py`'s Quest rows, W = 8) the search kernel makes 1 + about 4.3 + 2 full-row passes at 8x8200:256,
the sample variant one full-row pass (with a prefix sum per tile) plus about 2 passes over a 1024-score sample
and 1 + about 4 + 2 over about 450 buffered scores.

Measured on the H200 (fifteenth session, `python bench/topk.py --algos search,sample --samples 512,1024,2048 --ways
8,16 --warps 4,8 --tiles 1024`; us per call, 8 rows, in a CUDA graph; every variant "ok" against the rule, no
fallback on the Quest-like rows nor the tie rows, the 5 rows made to fall back did):

    scores : k       torch topk + sort   search (W 8, 8 warps)   sample S=1024   sample S=2048 (W 8, 8 warps)
    8 x 8200 : 256   71.1                32.8                    21.2            22.3
    8 x 2056 : 128   30.5                14.0                    14.4            12.9

so `ALGO` became "sample" with `SAMPLE` = 2048: a third less than the search at 128k's Quest rows, 8% less at 32k's.

The split variant (`topk_increasing(x, k, algo="split")`; the same output, the same plan) spreads the sample
variant's one full-row pass over programs, since a step has only as many rows as kv heads (8 of the H200's 132
SMs ran the sample kernel):

    kernel 1, grid (rows, NS = ceil(P / SEG)) : every program finds the row's pivot a from the sample (the same
               search, so the same a), then compacts its segment [s SEG, (s + 1) SEG) of scores >= a to the
               segment's own part of a row-sized buffer (it cannot overflow), and writes their count n_s
    kernel 2, grid (rows) : n = sum n_s; if K <= n <= CAP the candidates are gathered in segment order (so in
               increasing index order) into a CAP buffer, position i from the last segment whose first position
               sum_{s' < s} n_s' is <= i, then the sample variant's step (3); otherwise the full-row search

Measured on the H200 (sixteenth session, `python bench/topk.py --algos sample,split --samples 2048 --segments
256,512,1024 --ways 8 --warps 4,8 --tiles 1024`; us per call as above, every variant "ok", no fallback on the Quest
rows):

    scores : k       sample S=2048 (8 warps)   split SEG=256   SEG=512   SEG=1024 (8 warps)
    8 x 8200 : 256   22.0                      28.0            20.7      18.2
    8 x 2056 : 128   12.9                      15.5            14.5      14.2

In the static Quest step at 128k, split with SEG=512 took 620 us per step against the sample kernel's 656
(`bench/gpu_decode.py ... --topk split`, 6.92 ms per token either way). So `ALGO` is "auto": rows of at least
`SPLIT_FROM` scores take "split" with `SEGMENT` = 1024, shorter rows "sample".
"""

from __future__ import annotations

import math
import os

import torch

from .split_kv import tl, triton

WAYS = 8  # cuts + 1 per pass (bench/topk.py)
WARPS = 8
TILE = 1024  # scores a program holds in registers at once; a longer row is read in tiles per pass (from L1)
ALGOS = ("search", "sample", "split")
ALGO = "auto"  # `topk_increasing`'s kernel: one of ALGOS, or "auto" (module docstring, last section: measured)
SPLIT_FROM = 4096  # "auto": rows of at least this many scores take "split", shorter ones "sample"
SAMPLE = 2048  # the sample variant's sample size (scores read into registers; bench/topk.py --samples)
SEGMENT = 1024  # the split variant's segment: scores per compaction program (bench/topk.py --segments)
MARGIN = 3.0  # the sample variant's pivot: standard deviations of the sample rank above the expected one
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
    def _kth_key(X, P, K, TILE: tl.constexpr, W: tl.constexpr):
        # the order key of the K-th largest of the P scores at X (read by `_tile`): the W-ary search, stopping at
        # count = K or lo = hi (ties)
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
        return lo

    @triton.jit
    def _take_top(X, XI, OUT, n, K, TILE: tl.constexpr, W: tl.constexpr, INDEXED: tl.constexpr):
        # the top-K of the n scores at X: the K-th largest's key, then the taken indices in increasing order (ties
        # at it to the lowest). INDEXED: X is a compacted buffer whose row indices (increasing) are at XI; else
        # the indices are the positions in X (XI unused)
        thr = _key_float(_kth_key(X, n, K, TILE, W))
        j = tl.arange(0, TILE)
        n_gt = tl.zeros([TILE], tl.int32)
        for t0 in range(0, n, TILE):
            x, ok = _tile(X, t0, j, n)
            n_gt += (x > thr).to(tl.int32)
        need = K - tl.sum(n_gt, 0)  # ties at thr to take, lowest index first
        n_eq = tl.zeros([], tl.int32)
        n_take = tl.zeros([], tl.int32)
        for t0 in range(0, n, TILE):
            x, ok = _tile(X, t0, j, n)
            if INDEXED:
                idx = tl.load(XI + t0 + j, mask=ok, other=0)
            else:
                idx = t0 + j
            eq = (x == thr).to(tl.int32)
            take = (x > thr) | ((n_eq + tl.cumsum(eq, 0) <= need) & (eq != 0))
            pos = n_take + tl.cumsum(take.to(tl.int32), 0) - 1
            tl.store(OUT + pos, idx.to(tl.int64), mask=take)
            n_eq += tl.sum(eq, 0)
            n_take += tl.sum(take.to(tl.int32), 0)

    @triton.jit
    def _search_row(X, OUT, P, K, TILE: tl.constexpr, W: tl.constexpr):
        # the top-K of one row (X, OUT at the row): the default kernel's whole program, and the sampled variants'
        # fallback
        _take_top(X, X, OUT, P, K, TILE, W, False)

    @triton.jit
    def _topk_increasing(X, OUT, P, K, s_x, s_o, TILE: tl.constexpr, W: tl.constexpr):
        row = tl.program_id(0)
        _search_row(X + row * s_x, OUT + row * s_o, P, K, TILE, W)

    # ---- the sample variant (algo="sample"; module docstring, last section) ----

    @triton.jit
    def _search_regs(v, KLO, KHI, W: tl.constexpr):
        # v (N,) float32 in registers, NaN where no score. The W-ary key search of `_topk_increasing` on v alone:
        # returns (lo, c) with c = count(v >= float(lo)) >= KLO (lo = key(-inf), c = the scores when fewer than
        # KLO are above -inf), stopping at the first lo with c <= KHI (or lo = hi: ties)
        up = v > float("-inf")
        above = tl.sum(up.to(tl.int32), 0)
        n_all = tl.sum((v == v).to(tl.int32), 0)
        n_inf = tl.sum((v == float("inf")).to(tl.int32), 0)
        mn = tl.min(tl.where(up, v, float("inf")), 0)
        mx = tl.max(tl.where(v < float("inf"), v, float("-inf")), 0)
        lo = tl.where(above >= KLO, _float_key(mn), -2139095041)  # key(-inf)
        cnt = tl.where(above >= KLO, above, n_all)
        hi = _float_key(mx)
        top = n_inf >= KLO
        lo = tl.where(top, 2139095040, lo)  # key(+inf)
        hi = tl.where(top, lo, hi)
        w = tl.arange(0, W).to(tl.int64) + 1
        while (lo < hi) & (cnt > KHI):
            t = lo + (w * (hi - lo + 1) + W - 1) // W
            tf = _key_float(t)
            c = tl.sum((v[None, :] >= tf[:, None]).to(tl.int32), 1)
            enough = c >= KLO
            lo = tl.max(tl.where(enough, t, lo), 0)
            cnt = tl.min(tl.where(enough, c, cnt), 0)
            hi = tl.min(tl.where(enough, hi + 1, t), 0) - 1
        return lo, cnt

    @triton.jit
    def _sample_pivot(X, P, RA, RB, S: tl.constexpr, W: tl.constexpr):
        # the sample: scores floor(i P / S), i < S (the whole row when P <= S), in registers; the pivot a is a
        # sample score with between RA and RB sample scores >= it
        i = tl.arange(0, S).to(tl.int64)
        pick = tl.where(P > S, i * P // S, i)
        ok = pick < P
        v = tl.load(X + pick, mask=ok, other=0.0).to(tl.float32)
        v = tl.where(v == v, v, float("-inf"))
        v = tl.where(ok, v, float("nan"))
        a_key, _c = _search_regs(v, RA, RB, W)
        return _key_float(a_key)

    @triton.jit
    def _compact(X, SV, SI, t_lo, t_hi, a, CAP, TILE: tl.constexpr):
        # one pass over the scores [t_lo, t_hi) of X: those >= a and their indices (absolute) to SV / SI from
        # position 0, in increasing index order (the first CAP of them); returns how many there are
        j = tl.arange(0, TILE)
        n = tl.zeros([], tl.int32)
        for t0 in range(t_lo, t_hi, TILE):
            x, okx = _tile(X, t0, j, t_hi)
            ge = (x >= a).to(tl.int32)
            pos = n + tl.cumsum(ge, 0) - 1
            keep = (ge != 0) & (pos < CAP)
            tl.store(SV + pos, x, mask=keep)
            tl.store(SI + pos, t0 + j, mask=keep)
            n += tl.sum(ge, 0)
        return n

    @triton.jit
    def _topk_sample(X, OUT, SV, SI, FELL, P, K, RA, RB, s_x, s_o, s_c, CAP: tl.constexpr, TILE: tl.constexpr,
                     S: tl.constexpr, CT: tl.constexpr, W: tl.constexpr):
        row = tl.program_id(0)
        X = X + row * s_x
        OUT = OUT + row * s_o
        SV = SV + row * s_c
        SI = SI + row * s_c
        a = _sample_pivot(X, P, RA, RB, S, W)  # (1)
        n = _compact(X, SV, SI, 0, P, a, CAP, TILE)  # (2) one pass over the row
        tl.debug_barrier()  # the compacted scores, written by every thread, read by every thread
        fell = (n < K) | (n > CAP)
        tl.store(FELL + row, fell.to(tl.int32))
        if fell:
            # (3') the sample missed: the full-row search
            _search_row(X, OUT, P, K, TILE, W)
        else:
            # (3) the K-th largest of the row is the K-th largest of the compacted scores
            _take_top(SV, SI, OUT, n, K, CT, W, True)

    # ---- the split variant (algo="split"; module docstring, last section) ----

    @triton.jit
    def _topk_split_compact(X, SV, SI, CNT, P, RA, RB, SEG, s_x, s_c, s_n, TILE: tl.constexpr, S: tl.constexpr,
                            W: tl.constexpr):
        # program (row, segment): the row's pivot from its sample (every segment's program finds the same one),
        # then its segment [seg SEG, (seg + 1) SEG) compacted to the segment's own part of SV / SI, the count to CNT
        row = tl.program_id(0)
        seg = tl.program_id(1)
        X = X + row * s_x
        a = _sample_pivot(X, P, RA, RB, S, W)
        t_lo = seg * SEG
        t_hi = tl.minimum(t_lo + SEG, P)
        n = _compact(X, SV + row * s_c + t_lo, SI + row * s_c + t_lo, t_lo, t_hi, a, SEG, TILE)
        tl.store(CNT + row * s_n + seg, n)

    @triton.jit
    def _topk_split_take(X, OUT, SV, SI, CNT, BV, BI, FELL, P, K, NS, SEG, s_x, s_o, s_c, s_n, s_b,
                         CAP: tl.constexpr, TILE: tl.constexpr, CT: tl.constexpr, GT: tl.constexpr,
                         NSP: tl.constexpr, W: tl.constexpr):
        # program (row): the segments' compacted scores gathered in order into BV / BI (CAP), then as the sample
        # variant's step (3), or its fallback when they are fewer than K or more than CAP
        row = tl.program_id(0)
        X = X + row * s_x
        OUT = OUT + row * s_o
        SV = SV + row * s_c
        SI = SI + row * s_c
        BV = BV + row * s_b
        BI = BI + row * s_b
        sid = tl.arange(0, NSP)
        live = sid < NS
        cnt = tl.load(CNT + row * s_n + sid, mask=live, other=0)
        first = tl.cumsum(cnt, 0) - cnt  # each segment's first position in the gathered buffer
        n = tl.sum(cnt, 0)
        fell = (n < K) | (n > CAP)
        tl.store(FELL + row, fell.to(tl.int32))
        if fell:
            _search_row(X, OUT, P, K, TILE, W)
        else:
            g = tl.arange(0, GT)
            for c0 in range(0, n, GT):
                i = c0 + g
                ok = i < n
                # position i's segment: the last live one starting at or before i (empty ones start where the
                # next does, so the last is the one that holds i)
                seg = tl.sum(((first[None, :] <= i[:, None]) & live[None, :]).to(tl.int32), 1) - 1
                start = tl.sum(tl.where(seg[:, None] == sid[None, :], first[None, :], 0), 1)
                src = seg * SEG + (i - start)
                tl.store(BV + i, tl.load(SV + src, mask=ok, other=0.0), mask=ok)
                tl.store(BI + i, tl.load(SI + src, mask=ok, other=0), mask=ok)
            tl.debug_barrier()  # the gathered scores, written by every thread, read by every thread
            _take_top(BV, BI, OUT, n, K, CT, W, True)


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


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def sample_plan(P: int, k: int, sample: int | None = None) -> tuple[int, int, int, int]:
    """The sample variant's numbers for a row of P scores and k kept (shapes only: no data, so a CUDA graph keeps
    them): (S, RA, RB, CAP), the sample size (a power of two), the pivot's sample-rank window and the compacted
    buffer's size (a power of two). Module docstring, last section."""
    S = min(SAMPLE if sample is None else sample, max(16, _pow2(P)))
    if P <= S:  # the sample is the row: the pivot is the k-th largest itself
        return S, k, k, _pow2(P)
    r = k * S / P
    ra = math.ceil(r + MARGIN * math.sqrt(r) + 3)
    rb = math.ceil(r + (MARGIN + 2) * math.sqrt(r) + 8)
    cap = 2 * (rb + 4 * math.sqrt(rb) + 4) * P / S
    return S, ra, rb, min(_pow2(P), _pow2(math.ceil(cap)))


def resolve_algo(P: int, algo: str | None = None) -> str:
    """The kernel a row of P scores takes: `algo` (default `ALGO`); "auto" is "split" from `SPLIT_FROM` scores
    on, "sample" below (measured on the H200: module docstring). Other names pass through (checked later)."""
    algo = ALGO if algo is None else algo
    if algo == "auto":
        return "split" if P >= SPLIT_FROM else "sample"
    return algo


def _check(P: int, k: int, ways: int, tile: int | None, algo: str, sample: int | None,
           segment: int | None = None) -> None:
    if not 1 <= k <= P:
        raise ValueError(f"top-k: k={k} outside [1, {P}]")
    if ways < 2 or ways & (ways - 1):
        raise ValueError(f"top-k: ways={ways} is not a power of two >= 2")
    if tile is not None and (tile < 16 or tile & (tile - 1)):
        raise ValueError(f"top-k: tile={tile} is not a power of two >= 16")
    if algo not in ALGOS:
        raise ValueError(f"top-k: algo={algo!r} is not one of {ALGOS}")
    if sample is not None and (sample < 16 or sample & (sample - 1)):
        raise ValueError(f"top-k: sample={sample} is not a power of two >= 16")
    if segment is not None and (segment < 16 or segment & (segment - 1)):
        raise ValueError(f"top-k: segment={segment} is not a power of two >= 16")


def _launch_sample(rows: torch.Tensor, k: int, ways: int, num_warps: int, tile: int,
                   sample: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    R, P = rows.shape
    S, ra, rb, cap = sample_plan(P, k, sample)
    out = torch.empty(R, k, dtype=torch.long, device=rows.device)
    sv = torch.empty(R, cap, dtype=torch.float32, device=rows.device)
    si = torch.empty(R, cap, dtype=torch.int32, device=rows.device)
    fell = torch.empty(R, dtype=torch.int32, device=rows.device)
    _topk_sample[(R,)](rows, out, sv, si, fell, P, k, ra, rb, rows.stride(0), out.stride(0), cap, CAP=cap,
                       TILE=tile, S=S, CT=min(tile, cap), W=ways, num_warps=num_warps)
    return out, fell


def _launch_split(rows: torch.Tensor, k: int, ways: int, num_warps: int, tile: int, sample: int | None,
                  segment: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    R, P = rows.shape
    S, ra, rb, cap = sample_plan(P, k, sample)
    seg = min(SEGMENT if segment is None else segment, max(16, _pow2(P)))
    ns = triton.cdiv(P, seg)
    dev = rows.device
    out = torch.empty(R, k, dtype=torch.long, device=dev)
    sv = torch.empty(R, ns * seg, dtype=torch.float32, device=dev)  # each segment's compacted scores, in place
    si = torch.empty(R, ns * seg, dtype=torch.int32, device=dev)
    cnt = torch.empty(R, ns, dtype=torch.int32, device=dev)
    bv = torch.empty(R, cap, dtype=torch.float32, device=dev)  # gathered in order
    bi = torch.empty(R, cap, dtype=torch.int32, device=dev)
    fell = torch.empty(R, dtype=torch.int32, device=dev)
    _topk_split_compact[(R, ns)](rows, sv, si, cnt, P, ra, rb, seg, rows.stride(0), sv.stride(0), cnt.stride(0),
                                 TILE=min(tile, seg), S=S, W=ways, num_warps=num_warps)
    nsp = max(2, _pow2(ns))
    _topk_split_take[(R,)](rows, out, sv, si, cnt, bv, bi, fell, P, k, ns, seg, rows.stride(0), out.stride(0),
                           sv.stride(0), cnt.stride(0), bv.stride(0), CAP=cap, TILE=tile, CT=min(tile, cap),
                           GT=max(16, min(tile, cap, 8192 // nsp)), NSP=nsp, W=ways, num_warps=num_warps)
    return out, fell


def sample_fallbacks(x: torch.Tensor, k: int, ways: int | None = None, num_warps: int | None = None,
                     tile: int | None = None, sample: int | None = None, algo: str = "sample",
                     segment: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The sample (or split) variant's kernels on x (..., P) with their path per row: (indices as
    `topk_increasing(x, k, algo=algo)`, (...,) bool, True where the row took the full-row fallback). Needs
    `kernel_applies(x)` (tests, bench/topk.py). Raises ValueError as `topk_increasing`, and for algo "search"."""
    P = x.shape[-1]
    ways = WAYS if ways is None else ways
    _check(P, k, ways, tile, algo, sample, segment)
    if algo == "search":
        raise ValueError("top-k: the search kernel has no fallback (algo 'sample' or 'split')")
    if not kernel_applies(x):
        raise RuntimeError("top-k: sample_fallbacks needs the Triton kernel (CUDA, or TRITON_INTERPRET=1)")
    rows = x.reshape(-1, P)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    tile = min(TILE if tile is None else tile, max(16, triton.next_power_of_2(P)))
    warps = WARPS if num_warps is None else num_warps
    out, fell = (_launch_sample(rows, k, ways, warps, tile, sample) if algo == "sample"
                 else _launch_split(rows, k, ways, warps, tile, sample, segment))
    return out.view(*x.shape[:-1], k), fell.view(x.shape[:-1]).bool()


def topk_increasing(x: torch.Tensor, k: int, ways: int | None = None, num_warps: int | None = None,
                    tile: int | None = None, algo: str | None = None, sample: int | None = None,
                    segment: int | None = None) -> torch.Tensor:
    """x (..., P) float (any float dtype) -> (..., k) long: the indices of the k largest values of each row, in
    increasing order; ties at the k-th value go to the lowest indices, NaN counts as -inf. The Triton kernel
    (module docstring) where `kernel_applies(x)`, `reference_topk_increasing` otherwise (the same set up to the
    order of ties). `algo` picks the kernel (default `ALGO`; "auto": `resolve_algo`): "search" the full-row
    search, "sample" the sample variant (`sample` scores, a power of two, default `SAMPLE`; module docstring,
    last section), "split" the sample variant's pass spread over programs of `segment` scores each (default
    `SEGMENT`); the same output.
    `ways` (a power of two >= 2, default `WAYS`) and `num_warps` (default `WARPS`) tune them. Capturable in a CUDA
    graph (a fixed grid, no host number per call that depends on the data). Raises ValueError for k outside [1, P]
    or a bad `ways`, `tile`, `algo`, `sample` or `segment`."""
    P = x.shape[-1]
    ways = WAYS if ways is None else ways
    algo = resolve_algo(P, algo)
    _check(P, k, ways, tile, algo, sample, segment)
    if not kernel_applies(x):
        return reference_topk_increasing(x, k)
    rows = x.reshape(-1, P)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    tile = min(TILE if tile is None else tile, max(16, triton.next_power_of_2(P)))
    if algo == "sample":
        return _launch_sample(rows, k, ways, WARPS if num_warps is None else num_warps, tile, sample)[0].view(
            *x.shape[:-1], k)
    if algo == "split":
        return _launch_split(rows, k, ways, WARPS if num_warps is None else num_warps, tile, sample,
                             segment)[0].view(*x.shape[:-1], k)
    out = torch.empty(rows.shape[0], k, dtype=torch.long, device=x.device)
    _topk_increasing[(rows.shape[0],)](rows, out, P, k, rows.stride(0), out.stride(0), TILE=tile, W=ways,
                                       num_warps=WARPS if num_warps is None else num_warps)
    return out.view(*x.shape[:-1], k)
