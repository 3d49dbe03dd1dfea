"""Quest's per-page upper bound of q.k in one pass over the page metadata (Triton).

Quest (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", arXiv
2406.10774, section 3.2) scores page j of a kv head for query head h by an upper bound of q . k over the page's
keys, from the channel-wise minimum m and maximum M of those keys:

    U[b, h, j] = sum_d max(q[b, h, d] * m[b, hk, j, d], q[b, h, d] * M[b, hk, j, d]),   hk = h // (HQ / HK)

computed here as written, in float32, one program per ((row, kv head), block of pages) reading each page's
metadata once for the GQ query heads of its group. `selection.quest.page_scores` computes the same sum as two
float32 matrix products (q+ . M + q- . m, the eager rule and the reference); on an H200 at 128k those two
products ran at ~0.3 TB/s (1.87 ms of a 9.9 ms step, docs/gpu.md), while this pass is a plain read of the
metadata. The sums differ from the products' only in float32 rounding order.

The same sum can also run as two `tl.dot` per block of pages (`products=True`; `PRODUCTS` sets the default):
U = M . q+ + m . q-, with q+ = max(q, 0) and q- = min(q, 0) over the GQ heads as the columns. The operands are
the 16-bit metadata and query parts, which are exact, and the products are summed in float32. The metadata is
still read once, and the per-element multiplies, maxima and cross-lane sums leave the CUDA cores (offline sm_90
build: 544 instructions per program against 984). Not yet timed on a GPU.

`page_bound` is the entry point (a user-defined Triton kernel: also under `torch.compile`, capturable in a CUDA
graph); `reference_page_bound` is the rule in torch (any device).
"""

from __future__ import annotations

import torch

from .split_kv import tl, triton

BLOCK_P = 32  # pages per program (bench/page_bound.py sweeps it)
WARPS = 4
PRODUCTS = False  # True: the bound as two tl.dot (M . q+ + m . q-) where the dtypes allow it; untimed on a GPU

if triton is not None:

    @triton.jit
    def _page_bound(Q, KMIN, KMAX, U, P, s_q_b, s_q_h, s_m_b, s_m_h, s_m_p, s_u_b, s_u_h,
                    HK: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr,
                    PRODUCTS: tl.constexpr = False, GP: tl.constexpr = 16):
        bh = tl.program_id(0)
        b = bh // HK
        hk = bh % HK
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        pm = p < P
        ch = tl.arange(0, D)
        off = b * s_m_b + hk * s_m_h + p[:, None] * s_m_p + ch[None, :]
        if PRODUCTS:
            # U = M . q+ + m . q- as two tl.dot over the GQ heads (columns, GP >= 16 with zeros): the metadata
            # and the query's positive and negative parts in their own 16-bit dtype (exact), products summed in
            # float32 (float32 metadata: IEEE products, no TF32)
            mn = tl.load(KMIN + off, mask=pm[:, None], other=0.0)
            mx = tl.load(KMAX + off, mask=pm[:, None], other=0.0)
            g = tl.arange(0, GP)
            q = tl.load(Q + b * s_q_b + (hk * GQ + g)[None, :] * s_q_h + ch[:, None], mask=(g < GQ)[None, :],
                        other=0.0).to(mn.dtype)  # (D, GP)
            if mn.dtype == tl.float32:
                u = tl.dot(mx, tl.maximum(q, 0.0), input_precision="ieee")
                u = tl.dot(mn, tl.minimum(q, 0.0), u, input_precision="ieee")  # (BLOCK_P, GP)
            else:
                u = tl.dot(mx, tl.maximum(q, 0.0).to(mn.dtype))
                u = tl.dot(mn, tl.minimum(q, 0.0).to(mn.dtype), u)
            tl.store(U + b * s_u_b + (hk * GQ + g)[None, :] * s_u_h + p[:, None], u,
                     mask=pm[:, None] & (g < GQ)[None, :])
        else:
            mn = tl.load(KMIN + off, mask=pm[:, None], other=0.0).to(tl.float32)
            mx = tl.load(KMAX + off, mask=pm[:, None], other=0.0).to(tl.float32)
            for g in tl.static_range(GQ):
                h = hk * GQ + g
                q = tl.load(Q + b * s_q_b + h * s_q_h + ch).to(tl.float32)
                u = tl.sum(tl.maximum(q[None, :] * mn, q[None, :] * mx), 1)
                tl.store(U + b * s_u_b + h * s_u_h + p, u, mask=pm)


def page_bound(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, block_p: int | None = None,
               num_warps: int | None = None, products: bool | None = None) -> torch.Tensor:
    """Quest's bound U (b, hq, P) float32 for query (b, hq, d) (any float dtype, unit last stride) over the page
    metadata kmin / kmax (b, hk, P, d) (one float dtype, e.g. the keys' own: the min and max of bf16 keys are bf16
    values, so storing them in bf16 loses nothing; the same strides, a unit last one), summed in float32. hq a
    multiple of hk, d a power of two. `block_p` pages per program (a power of two, default `BLOCK_P`) and
    `num_warps` (default `WARPS`) tune it. `products` (default `PRODUCTS`) computes the same sum as two `tl.dot`
    per block, M . q+ + m . q- over the GQ heads (tensor cores, the metadata still read once), where the query is
    in the metadata's dtype or the metadata is float32, and block_p >= 16; the elementwise form otherwise.
    Raises RuntimeError without triton, ValueError for shapes the kernel does not take."""
    if triton is None:
        raise RuntimeError("the page bound kernel needs triton (pip install 'kvsqueeze[gpu]')")
    b, hq, d = query.shape
    hk, P = kmin.shape[1], kmin.shape[2]
    if hq % hk or d & (d - 1) or query.stride(-1) != 1 or kmin.stride() != kmax.stride() or kmin.stride(-1) != 1 \
            or kmin.dtype != kmax.dtype or not kmin.is_floating_point() or tuple(kmin.shape) != (b, hk, P, d):
        raise ValueError(f"unsupported shapes for the page bound kernel: query {tuple(query.shape)}, "
                         f"metadata {tuple(kmin.shape)} {kmin.dtype}")
    block_p = BLOCK_P if block_p is None else block_p
    num_warps = WARPS if num_warps is None else num_warps
    if block_p < 1 or block_p & (block_p - 1):
        raise ValueError(f"page bound: block_p={block_p} is not a power of two")
    products = PRODUCTS if products is None else products
    products = products and block_p >= 16 and d >= 16 and (query.dtype == kmin.dtype or kmin.dtype == torch.float32)
    u = torch.empty(b, hq, P, dtype=torch.float32, device=query.device)
    _page_bound[(b * hk, triton.cdiv(P, block_p))](
        query, kmin, kmax, u, P, query.stride(0), query.stride(1), kmin.stride(0), kmin.stride(1), kmin.stride(2),
        u.stride(0), u.stride(1), HK=hk, GQ=hq // hk, D=d, BLOCK_P=block_p, PRODUCTS=products,
        GP=max(16, triton.next_power_of_2(hq // hk)), num_warps=num_warps)
    return u


def reference_page_bound(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """`page_bound` in torch, elementwise as the rule is written: (b, hq, d), (b, hk, P, d) x2 -> (b, hq, P)."""
    b, hq, d = query.shape
    hk = kmin.shape[1]
    q = query.float().view(b, hk, hq // hk, 1, d)
    u = torch.maximum(q * kmin[:, :, None].float(), q * kmax[:, :, None].float()).sum(-1)
    return u.view(b, hq, -1)
