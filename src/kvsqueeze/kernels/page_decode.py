"""Decode attention over selected pages of fixed-capacity slots, read in place (Triton, split-KV).

Quest-style sparse decoding (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
Inference", arXiv 2406.10774) in the static decode step: each (row, kv head) attends only to `KP` pages of `PAGE`
consecutive slots of its layer's buffers, page j holding slots [j * PAGE, (j + 1) * PAGE). The selected page ids
(B, HK, KP) are read by the kernel, which loads those pages' keys and values straight from the buffers (no gather
copy per step):

    out[b, h] = sum_{c in pages[b, hk]} softmax_c(q[b, h] . k[b, hk, c] * scale  over valid c) v[b, hk, c],
    hk = h // (HQ / HK)

Slots of a selected page that hold no entry (`valid` False: the part of the current page not yet written, an empty
page picked when fewer pages hold entries than KP) are masked inside the kernel. The rest is `slot_decode.py`'s
flash-decoding: one program per (row, kv head) and split of the KP * PAGE selected slots, the GQ query heads of
the group as the rows of one `tl.dot` tile, an online softmax in base 2, the splits merged by
`split_kv._merge_splits`.

`page_decode_attention` is the entry point (also under `torch.compile`: a user-defined Triton kernel, capturable
in a CUDA graph); `reference_page_decode` is the same computation in torch (gather + masked attention; any device:
the tests' reference and the static step's page attention for its torch kernels).
"""

from __future__ import annotations

import torch

from .slot_decode import _dot_dtype, reference_slot_decode
from .split_kv import (PROGRAMS_PER_SM, _sm_count, _split_plan, _store_split, require_triton, split_kv_decode, tl,
                       triton)

if triton is not None:

    @triton.jit
    def _page_decode_split(
        Q, K, V, M, PG, FR, O_ACC, O_M, O_L,
        qk_scale, NSEL, CHUNK,
        s_q_b, s_q_h, s_k_b, s_k_h, s_k_n, s_v_b, s_v_h, s_v_n, s_m_b, s_m_h, s_m_n, s_p_b, s_p_h, s_p_n,
        s_f_b, s_f_h, s_f_n,
        HK: tl.constexpr, GQ: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        PAGE: tl.constexpr, DT: tl.constexpr, HAS_FR: tl.constexpr,
    ):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // HK
        hk = bh % HK
        rows = tl.arange(0, GP)
        ch = tl.arange(0, D)
        qmask = rows < GQ
        q = tl.load(Q + b * s_q_b + (hk * GQ + rows)[:, None] * s_q_h + ch[None, :], mask=qmask[:, None], other=0.0)
        q = (q.to(tl.float32) * qk_scale).to(DT)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        start = split * CHUNK
        for it in range(0, CHUNK // BLOCK_N):
            e = start + it * BLOCK_N + tl.arange(0, BLOCK_N)  # index among the selected slots
            em = e < NSEL
            pid = tl.load(PG + b * s_p_b + hk * s_p_h + (e // PAGE) * s_p_n, mask=em, other=0)
            n = pid * PAGE + e % PAGE  # the slot in the layer's buffers (its validity)
            ok = (tl.load(M + b * s_m_b + hk * s_m_h + n * s_m_n, mask=em, other=0) != 0) & em
            if HAS_FR:  # keys and values from the page frame holding the page
                fid = tl.load(FR + b * s_f_b + hk * s_f_h + (e // PAGE) * s_f_n, mask=em, other=0)
                n = fid * PAGE + e % PAGE
            k = tl.load(K + b * s_k_b + hk * s_k_h + n[:, None] * s_k_n + ch[None, :], mask=em[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k.to(DT)))
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid slot so far
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * s_v_b + hk * s_v_h + n[:, None] * s_v_n + ch[None, :], mask=em[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(DT), v.to(DT))
            m_i = m_new
        _store_split(O_ACC, O_M, O_L, acc, m_i, l_i, GQ=GQ, GP=GP, D=D)


def page_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                          pages: torch.Tensor, page: int, scale: float | None = None, block_n: int = 64,
                          num_warps: int = 4, frames: torch.Tensor | None = None,
                          programs_per_sm: int = PROGRAMS_PER_SM) -> torch.Tensor:
    """One decode query per row over the selected pages of masked slots, read in place, split-KV on the GPU.

    q: (B, HQ, D); k, v: (B, HK, C, D) (any strides with a unit last one); valid: (B, HK, C) bool (any strides);
    pages: (B, HK, KP) integer page ids in [0, C // page) (any strides; page j = slots [j * page, (j + 1) * page));
    `page` slots per page (C a multiple of it). `frames` (B, HK, KP) integer, optional: the keys and values of
    selected page i are read from page frame frames[..., i] of k / v (slots [f * page, (f + 1) * page); k / v then
    (B, HK, F * page, D), the device frames of an offloaded layer, `storage/frames.py`) while its validity is still
    read at the page's slots in `valid` (B, HK, C). HQ a multiple of HK (GQA), D a power of two >= 16. Returns
    (B, HQ, D) in q's dtype. Every (row, kv head) must have a valid slot among its pages (the current token is
    one). The order of the page ids does not matter (up to float rounding). `programs_per_sm` as
    `slot_decode_attention`'s. Raises RuntimeError without triton, ValueError for shapes the kernel does not
    take."""
    require_triton("the page decode kernel")
    B, HQ, D = q.shape
    HK, C = k.shape[1], k.shape[2]
    KP = pages.shape[-1]
    if HQ % HK or D < 16 or D & (D - 1) or k.stride(-1) != 1 or v.stride(-1) != 1 or q.stride(-1) != 1 \
            or page < 1 or C % page or tuple(pages.shape[:2]) != (B, HK) \
            or (frames is not None and frames.shape != pages.shape):
        raise ValueError(f"unsupported shapes for the page decode kernel: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"pages {tuple(pages.shape)}, page {page}")
    nsel = KP * page
    n_splits, chunk = _split_plan(B * HK, nsel, block_n, _sm_count(q.device), programs_per_sm)
    fr = pages if frames is None else frames
    return split_kv_decode(
        _page_decode_split, (q, k, v, valid, pages, fr),
        (nsel, chunk,
         q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
         valid.stride(0), valid.stride(1), valid.stride(2), pages.stride(0), pages.stride(1), pages.stride(2),
         fr.stride(0), fr.stride(1), fr.stride(2)),
        q, HK, n_splits, scale, "the page decode kernel",
        BLOCK_N=block_n, PAGE=page, DT=_dot_dtype(q), HAS_FR=frames is not None, num_warps=num_warps,
    )


def page_slots(pages: torch.Tensor, page: int) -> torch.Tensor:
    """Page ids (B, HK, KP) -> the slots they cover (B, HK, KP * page) long, page by page in the ids' order."""
    B, HK, KP = pages.shape
    offs = torch.arange(page, device=pages.device)
    return (pages.long()[..., None] * page + offs).view(B, HK, KP * page)


def gather_pages(k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, pages: torch.Tensor, page: int,
                 frames: torch.Tensor | None = None):
    """The selected pages' keys, values (B, HK, KP * page, D) and validity (B, HK, KP * page) bool, copied out of
    k / v (B, HK, C, D) and valid (B, HK, C): the gather the Triton kernel avoids. With `frames` (B, HK, KP), the
    keys and values of page i come from frame frames[..., i] of k / v (B, HK, F * page, D), as
    `page_decode_attention`'s."""
    idx = page_slots(pages, page)
    kv_idx = idx if frames is None else page_slots(frames, page)
    kk = k.gather(2, kv_idx[..., None].expand(-1, -1, -1, k.shape[-1]))
    vv = v.gather(2, kv_idx[..., None].expand(-1, -1, -1, v.shape[-1]))
    return kk, vv, valid.gather(2, idx)


def reference_page_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                          pages: torch.Tensor, page: int, scale: float | None = None,
                          frames: torch.Tensor | None = None) -> torch.Tensor:
    """`page_decode_attention` in torch (gather the pages, then masked attention with an fp32 softmax):
    q (B, HQ, D), k / v (B, HK, C, D) (or frames: see `gather_pages`), valid (B, HK, C) bool, pages (B, HK, KP).
    Returns (B, HQ, D) in q's dtype."""
    kk, vv, m = gather_pages(k, v, valid, pages, page, frames)
    return reference_slot_decode(q, kk, vv, m, scale=scale)
