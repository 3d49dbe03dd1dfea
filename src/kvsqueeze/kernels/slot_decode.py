"""Decode attention over fixed-capacity slots with a per-(row, kv head) validity mask (Triton, split-KV).

One decoding step (one query token per row) over a static layer's buffers: keys and values (B, HK, C, D), of which
the slots with `valid[b, hk, c]` are attended (head-wise budgets, evicted or empty slots are simply skipped):

    out[b, h] = sum_c softmax_c(q[b, h] . k[b, hk, c] * scale  over valid c) v[b, hk, c],    hk = h // (HQ / HK)

Flash-decoding (Dao et al., "Flash-Decoding for long-context inference", 2023): each program takes one
(row, kv head) and one split of the C slots, with the GQ query heads of the group as the rows of one `tl.dot` tile
(keys are never repeated per query head), runs an online softmax in base 2 over blocks of BLOCK_N slots, and
writes its partial result; `split_kv._merge_splits` combines the splits. Every slot is read once: the bytes moved
are the K and V buffers plus one bool per slot, so the step's attention runs near the memory-bandwidth limit
however long the capacity, where two matrix products write and re-read fp32 scores (`runtime/static.py`'s
"matmul" kernel). Fully masked blocks still load (the mask is data on the device: no host decision per step).

`slot_decode_attention` is the entry point (also under `torch.compile`: a user-defined Triton kernel, capturable
in a CUDA graph); `reference_slot_decode` is the same computation in torch (any device, the tests' reference).
"""

from __future__ import annotations

import torch

from .split_kv import (PROGRAMS_PER_SM, _sm_count, _split_plan, _store_split, require_triton, split_kv_decode, tl,
                       triton)

if triton is not None:

    @triton.jit
    def _slot_decode_split(
        Q, K, V, M, O_ACC, O_M, O_L,
        qk_scale, C, CHUNK,
        s_q_b, s_q_h, s_k_b, s_k_h, s_k_n, s_v_b, s_v_h, s_v_n, s_m_b, s_m_h, s_m_n,
        HK: tl.constexpr, GQ: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        DT: tl.constexpr,
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
            n = start + it * BLOCK_N + tl.arange(0, BLOCK_N)
            nm = n < C
            ok = tl.load(M + b * s_m_b + hk * s_m_h + n * s_m_n, mask=nm, other=0) != 0
            k = tl.load(K + b * s_k_b + hk * s_k_h + n[:, None] * s_k_n + ch[None, :], mask=nm[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k.to(DT)))
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with no valid slot so far
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * s_v_b + hk * s_v_h + n[:, None] * s_v_n + ch[None, :], mask=nm[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(DT), v.to(DT))
            m_i = m_new
        _store_split(O_ACC, O_M, O_L, acc, m_i, l_i, GQ=GQ, GP=GP, D=D)


def _dot_dtype(q: torch.Tensor):
    """The `tl.dot` operand dtype: the model's 16-bit type on the GPU; float32 for float32 inputs and under
    Triton's CPU interpreter (its bfloat16 `tl.dot` returns garbage: checked with triton 3.9)."""
    if q.device.type != "cuda" or q.dtype == torch.float32:
        return tl.float32
    return tl.float16 if q.dtype == torch.float16 else tl.bfloat16


def slot_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                          scale: float | None = None, block_n: int = 64, num_warps: int = 4,
                          programs_per_sm: int = PROGRAMS_PER_SM) -> torch.Tensor:
    """One decode query per row over masked slots, split-KV on the GPU.

    q: (B, HQ, D); k, v: (B, HK, C, D) (any strides with a unit last one); valid: (B, HK, C) bool (any strides;
    e.g. a view of a static cache's slot mask). HQ a multiple of HK (GQA), D a power of two >= 16. Returns
    (B, HQ, D) in q's dtype. Every (row, kv head) must have a valid slot (the current token is one).
    `programs_per_sm`: the split plan (about that many programs per SM; `split_kv._split_plan`). Raises
    RuntimeError without triton, ValueError for shapes the kernel does not take."""
    require_triton("the slot decode kernel")
    B, HK, C = k.shape[0], k.shape[1], k.shape[2]
    n_splits, chunk = _split_plan(B * HK, C, block_n, _sm_count(q.device), programs_per_sm)
    mask = valid  # bool, read as int1 (a dtype view to uint8 does not lower in inductor: torch 2.11)
    return split_kv_decode(
        _slot_decode_split, (q, k, v, mask),
        (C, chunk,
         q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
         mask.stride(0), mask.stride(1), mask.stride(2)),
        q, HK, n_splits, scale, "the slot decode kernel", unit_stride=(k, v),
        BLOCK_N=block_n, DT=_dot_dtype(q), num_warps=num_warps,
    )


def reference_slot_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                          scale: float | None = None) -> torch.Tensor:
    """`slot_decode_attention` in torch (fp32 softmax): q (B, HQ, D), k / v (B, HK, C, D), valid (B, HK, C)."""
    B, HQ, D = q.shape
    HK = k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    qg = q.reshape(B, HK, HQ // HK, D).float()
    s = torch.matmul(qg, k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    return torch.matmul(torch.softmax(s, -1), v.float()).reshape(B, HQ, D).to(q.dtype)


def grouped_matmul_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                          scaling: float | None = None) -> torch.Tensor:
    """Decode attention as two batched matrix products per kv-head group (no repeated keys), any device: query
    (b, hq, q, d), key / value (b, hk, C, d), mask (b, hk, 1, C) bool (True: attend). Scores q K^T * scaling in the
    inputs' dtype, masked, softmax in float32 (as transformers' eager attention), then times V. Returns
    (b, q, hq, d) contiguous. The static step's "matmul" kernel and the static KIVI cache's reference path."""
    b, hq, q, d = query.shape
    hk = key.shape[1]
    qg = query.reshape(b, hk, (hq // hk) * q, d)
    scale = scaling if scaling is not None else d ** -0.5
    s = torch.matmul(qg, key.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(p, value).reshape(b, hq, q, -1).transpose(1, 2).contiguous()
