"""Copy the flagged pages of a layer's slots into device page frames (Triton; a torch reference elsewhere).

The load half of an offloaded layer's device frames in the static step (`storage/frames.py`): frame f of a
(row, kv head) is to receive page `frame_page[b, hk, f]` (slots [p * page, (p + 1) * page) of the source buffers,
mapped host memory on CUDA) where `load[b, hk, f]` is set:

    dst[b, hk, f * page + i] = src[b, hk, frame_page[b, hk, f] * page + i]   for i < page, where load[b, hk, f]

One program per (row, kv head, frame) reads its flag and, when set, the page's keys and values (`page` x d each):
a frame not flagged costs one flag load and moves no byte, so a step moves over the host link only the pages it
lacks (a user-defined Triton kernel: capturable in a CUDA graph, no host synchronisation). `reference_copy_pages`
is the same in torch (a gather of every frame's page and a `where`: it reads every frame's page, so only for the
CPU and the tests).
"""

from __future__ import annotations

import torch

from .split_kv import tl, triton

if triton is not None:

    @triton.jit
    def _copy_pages(SK, SV, DK, DV, FP, LD, s_sk_b, s_sk_h, s_sk_n, s_sv_b, s_sv_h, s_sv_n,
                    s_dk_b, s_dk_h, s_dk_n, s_dv_b, s_dv_h, s_dv_n, s_f_b, s_f_h, s_f_n,
                    HK: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr, DVAL: tl.constexpr):
        bh = tl.program_id(0)
        f = tl.program_id(1)
        b = bh // HK
        hk = bh % HK
        go = tl.load(LD + b * s_f_b + hk * s_f_h + f * s_f_n)
        if go != 0:
            p = tl.load(FP + b * s_f_b + hk * s_f_h + f * s_f_n)
            rows = tl.arange(0, PAGE)
            ck = tl.arange(0, D)
            k = tl.load(SK + b * s_sk_b + hk * s_sk_h + (p * PAGE + rows)[:, None] * s_sk_n + ck[None, :])
            tl.store(DK + b * s_dk_b + hk * s_dk_h + (f * PAGE + rows)[:, None] * s_dk_n + ck[None, :], k)
            cv = tl.arange(0, DVAL)
            v = tl.load(SV + b * s_sv_b + hk * s_sv_h + (p * PAGE + rows)[:, None] * s_sv_n + cv[None, :])
            tl.store(DV + b * s_dv_b + hk * s_dv_h + (f * PAGE + rows)[:, None] * s_dv_n + cv[None, :], v)


def copy_pages(src_k: torch.Tensor, src_v: torch.Tensor, dst_k: torch.Tensor, dst_v: torch.Tensor,
               frame_page: torch.Tensor, load: torch.Tensor, page: int) -> None:
    """Copy page frame_page[b, hk, f] of src_k / src_v (B, HK, C, D) into frame f of dst_k / dst_v
    (B, HK, F * page, D) wherever load[b, hk, f] is set, in place; frame_page (B, HK, F) integer (any value where
    load is not set), load (B, HK, F) bool or uint8, with the same strides. On CUDA with triton one kernel moving only the
    flagged pages; elsewhere `reference_copy_pages`. page and D powers of two (the kernel's tiles). Raises
    ValueError for shapes that do not line up."""
    B, HK, F = frame_page.shape
    if tuple(load.shape) != (B, HK, F) or load.stride() != frame_page.stride() or dst_k.shape[2] != F * page \
            or src_k.shape[:2] != dst_k.shape[:2] or src_k.shape[-1] != dst_k.shape[-1] \
            or src_v.shape[-1] != dst_v.shape[-1] or src_k.shape[2] % page:
        raise ValueError(f"unsupported shapes for copy_pages: src {tuple(src_k.shape)}, frames {tuple(dst_k.shape)}, "
                         f"table {tuple(frame_page.shape)}, page {page}")
    D, DV = src_k.shape[-1], src_v.shape[-1]
    pow2 = all(x & (x - 1) == 0 for x in (page, D, DV))
    if not (dst_k.is_cuda and triton is not None and pow2 and all(t.stride(-1) == 1 for t in (src_k, src_v, dst_k,
                                                                                               dst_v))):
        reference_copy_pages(src_k, src_v, dst_k, dst_v, frame_page, load, page)
        return
    _copy_pages[(B * HK, F)](
        src_k, src_v, dst_k, dst_v, frame_page, load.view(torch.uint8) if load.dtype == torch.bool else load,
        src_k.stride(0), src_k.stride(1), src_k.stride(2), src_v.stride(0), src_v.stride(1), src_v.stride(2),
        dst_k.stride(0), dst_k.stride(1), dst_k.stride(2), dst_v.stride(0), dst_v.stride(1), dst_v.stride(2),
        frame_page.stride(0), frame_page.stride(1), frame_page.stride(2),
        HK=HK, PAGE=page, D=D, DVAL=DV, num_warps=1)


def reference_copy_pages(src_k: torch.Tensor, src_v: torch.Tensor, dst_k: torch.Tensor, dst_v: torch.Tensor,
                         frame_page: torch.Tensor, load: torch.Tensor, page: int) -> None:
    """`copy_pages` in torch: every frame's page gathered, written where `load` is set (in place, `copy_`)."""
    B, HK, F = frame_page.shape
    offs = torch.arange(page, device=frame_page.device)
    idx = (frame_page.clamp(min=0).long()[..., None] * page + offs).view(B, HK, F * page)
    on = load.bool()[..., None].expand(B, HK, F, page).reshape(B, HK, F * page, 1)
    for src, dst in ((src_k, dst_k), (src_v, dst_v)):
        got = src.gather(2, idx[..., None].expand(-1, -1, -1, src.shape[-1]))
        dst.copy_(torch.where(on, got.to(dst.dtype), dst))
