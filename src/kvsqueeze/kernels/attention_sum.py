"""Attention summed over queries without the q x n probabilities in memory (Triton, GPU): the scores of SnapKV,
H2O, PyramidKV, AdaKV over them, EMS, WindowKV and D2O at prefill.

`attention_probs.attention_chunks` computes the rule (transformers' eager attention in float32) by materialising
each chunk's logits: at 32k tokens and SnapKV's 64-query window, 268 MB of float32 per layer, written and read
five times (product, scale, mask, softmax, NaN fix) before the sum over the queries. SnapKV's one-chunk prefill at
32k on an H200 cost 5.6% more than the full cache's (K-norm's, with no attention in its score: 1.8%; docs/gpu.md).
Here two passes read the keys instead and keep the probabilities in registers:

    pass 1, per query row i (grid: row blocks):    m_i = max_t l_it,   Z_i = sum_t exp(l_it - m_i)   (online)
    pass 2, per key block (grid: key blocks):      out[h, t] = sum_{i of head h} exp(l_it - m_i) / Z_i
    l_it = scaling * q_i . k_t  over the visible keys (-inf elsewhere), as `attention_chunks`

with the same visibility: by position (k_pos <= q_pos, and k_pos > q_pos - window on a sliding layer) and `valid`.
A query with no visible key contributes nothing (its Z is 0), as the rule's zeroed NaN row. Grouped-query attention:
the program of a kv head reads its keys once for the g query heads of its group. Products in the inputs' dtype
with float32 accumulation (bf16 x bf16 products are exact in float32; float32 inputs use IEEE products, not TF32),
so the sums equal the rule's up to float32 summation order. Softcap (Gemma 2) is not in the kernel: the caller
falls back to the chunks.
"""

from __future__ import annotations

import torch

from .split_kv import tl, triton

BLOCK_M = 32  # query rows per program step
BLOCK_N = 64  # keys per program step
# On by default since its first GPU run (fourteenth session, H200: SnapKV's 32k prefill overhead +3.6% with it, +5.1%
# with the float32 chunks): `attention_probs.attention_sum` takes the kernel where `kernel_applies`; False restores
# the chunks' sums everywhere (bench/gpu_prefill.py --attention-sum torch)
KERNEL = True

if triton is not None:

    @triton.jit
    def _logits(q, K, KP, VAL, qp, j, ch, bhk, n, scaling, s_k_bh, s_k_n, s_kp_bh, s_v_bh,
                D: tl.constexpr, HAS_POS: tl.constexpr, HAS_VALID: tl.constexpr, WINDOW: tl.constexpr,
                IEEE: tl.constexpr):
        # (rows, keys j) float32 logits of the rows q against keys j of kv head bhk, -inf where not visible
        kmask = j < n
        k = tl.load(K + bhk * s_k_bh + j[:, None] * s_k_n + ch[None, :], mask=kmask[:, None] & (ch < D)[None, :],
                    other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = (s * scaling).to(tl.float32)  # float32 even where the scale comes as float64 (torch.compile)
        ok = kmask[None, :]
        if HAS_POS:
            kp = tl.load(KP + bhk * s_kp_bh + j, mask=kmask, other=0)
            ok = ok & (kp[None, :] <= qp[:, None])
            if WINDOW > 0:
                ok = ok & (kp[None, :] > qp[:, None] - WINDOW)
        if HAS_VALID:
            ok = ok & (tl.load(VAL + bhk * s_v_bh + j, mask=kmask, other=0) != 0)[None, :]
        return tl.where(ok, s, float("-inf"))

    @triton.jit
    def _rows(Q, QP, b, h, i, ch, w, s_q_b, s_q_h, s_q_i, s_qp_b, D: tl.constexpr, HAS_POS: tl.constexpr):
        # query rows i of (b, h): the rows (BM, DP), their positions (the row index without positions), their mask
        rmask = i < w
        q = tl.load(Q + b * s_q_b + h * s_q_h + i[:, None] * s_q_i + ch[None, :],
                    mask=rmask[:, None] & (ch < D)[None, :], other=0.0)
        if HAS_POS:
            qp = tl.load(QP + b * s_qp_b + i, mask=rmask, other=0)
        else:
            qp = i
        return q, qp, rmask

    @triton.jit
    def _row_stats(Q, K, QP, KP, VAL, M, Z, n, w, scaling,
                   s_q_b, s_q_h, s_q_i, s_k_bh, s_k_n, s_qp_b, s_kp_bh, s_v_bh,
                   HK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, HAS_POS: tl.constexpr, HAS_VALID: tl.constexpr,
                   WINDOW: tl.constexpr, IEEE: tl.constexpr):
        bh = tl.program_id(0)  # (b, query head)
        b = bh // (HK * G)
        h = bh % (HK * G)
        bhk = b * HK + h // G
        i = tl.program_id(1) * BM + tl.arange(0, BM)
        ch = tl.arange(0, DP)
        q, qp, rmask = _rows(Q, QP, b, h, i, ch, w, s_q_b, s_q_h, s_q_i, s_qp_b, D, HAS_POS)
        m_i = tl.full([BM], float("-inf"), tl.float32)
        z_i = tl.zeros([BM], tl.float32)
        for n0 in range(0, n, BN):
            s = _logits(q, K, KP, VAL, qp, n0 + tl.arange(0, BN), ch, bhk, n, scaling, s_k_bh, s_k_n, s_kp_bh,
                        s_v_bh, D, HAS_POS, HAS_VALID, WINDOW, IEEE)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet
            z_i = z_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
            m_i = m_new
        tl.store(M + bh * w + i, m_i, mask=rmask)
        tl.store(Z + bh * w + i, z_i, mask=rmask)

    @triton.jit
    def _column_sums(Q, K, QP, KP, VAL, M, Z, OUT, n, w, scaling,
                     s_q_b, s_q_h, s_q_i, s_k_bh, s_k_n, s_qp_b, s_kp_bh, s_v_bh,
                     HK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, HAS_POS: tl.constexpr, HAS_VALID: tl.constexpr,
                     WINDOW: tl.constexpr, IEEE: tl.constexpr):
        bhk = tl.program_id(0)  # (b, kv head)
        b = bhk // HK
        hk = bhk % HK
        j = tl.program_id(1) * BN + tl.arange(0, BN)
        ch = tl.arange(0, DP)
        for g in range(G):
            h = hk * G + g
            bh = b * HK * G + h
            acc = tl.zeros([BN], tl.float32)
            for i0 in range(0, w, BM):
                i = i0 + tl.arange(0, BM)
                q, qp, rmask = _rows(Q, QP, b, h, i, ch, w, s_q_b, s_q_h, s_q_i, s_qp_b, D, HAS_POS)
                s = _logits(q, K, KP, VAL, qp, j, ch, bhk, n, scaling, s_k_bh, s_k_n, s_kp_bh, s_v_bh,
                            D, HAS_POS, HAS_VALID, WINDOW, IEEE)
                m = tl.load(M + bh * w + i, mask=rmask, other=0.0)
                z = tl.load(Z + bh * w + i, mask=rmask, other=0.0)
                live = rmask & (z > 0)  # a row with no visible key contributes nothing
                m = tl.where(m == float("-inf"), 0.0, m)
                p = tl.exp(s - m[:, None]) / tl.where(live, z, 1.0)[:, None]
                acc += tl.sum(tl.where(live[:, None], p, 0.0), 0)
            tl.store(OUT + bh * n + j, acc, mask=j < n)


def attention_shapes(where: str, queries: torch.Tensor, keys: torch.Tensor, q_positions: torch.Tensor | None,
                     k_positions: torch.Tensor | None) -> tuple[int, int, int, int, int, int]:
    """(batch, q_heads, q, head_dim, kv_heads, n) of `attention_probs.attention_chunks`' arguments (and the
    attention-sum kernel's), checked: raises ValueError (naming `where`) when only one of the positions is given or
    q_heads is not a multiple of kv_heads."""
    if (q_positions is None) != (k_positions is None):
        raise ValueError(f"{where}: give both q_positions and k_positions, or neither")
    b, hq, w, d = queries.shape
    hk, n = keys.shape[1], keys.shape[2]
    if hq % hk:
        raise ValueError(f"{where}: {hq} query heads are not a multiple of {hk} kv heads")
    return b, hq, w, d, hk, n


def kernel_applies(queries: torch.Tensor, keys: torch.Tensor, softcap: float | None) -> bool:
    """Whether `attention_sum_kernel` takes these inputs: `KERNEL` set, triton, CUDA tensors (or the CPU under
    TRITON_INTERPRET=1 outside torch.compile, for tests), one floating dtype, no softcap."""
    import os

    if not KERNEL or triton is None or softcap or queries.dtype != keys.dtype or not keys.is_floating_point():
        return False
    if keys.device.type == "cuda":
        return True
    return (keys.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
            and not torch.compiler.is_compiling())


def attention_sum_kernel(queries: torch.Tensor, keys: torch.Tensor, *, scaling: float,
                         q_positions: torch.Tensor | None = None, k_positions: torch.Tensor | None = None,
                         valid: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """(batch, q_heads, n) float32: the softmax attention of `queries` (batch, q_heads, w, head_dim) over `keys`
    (batch, kv_heads, n, head_dim) summed over the w queries, the two passes of the module docstring. Arguments as
    `attention_probs.attention_chunks` (`q_positions` (w,) or (batch, w), `k_positions` (batch, kv_heads, n), both
    or neither; `valid` (batch, kv_heads, n) bool; `window`); no softcap (`kernel_applies`). Raises ValueError when
    only one of the positions is given or q_heads is not a multiple of kv_heads."""
    b, hq, w, d, hk, n = attention_shapes("attention_sum_kernel", queries, keys, q_positions, k_positions)
    out = torch.zeros(b, hq, n, dtype=torch.float32, device=keys.device)
    if w == 0 or n == 0:
        return out
    q = queries if queries.stride(-1) == 1 else queries.contiguous()
    k = keys.reshape(b * hk, n, d)
    if k.stride(-1) != 1:
        k = k.contiguous()
    has_pos = q_positions is not None
    if has_pos:
        qp = q_positions.expand(b, w) if q_positions.dim() == 1 else q_positions
        qp = qp.to(torch.long).contiguous()
        kp = k_positions.to(torch.long).reshape(b * hk, n).contiguous()
    else:
        qp = kp = out  # unused pointers
    has_valid = valid is not None
    val = valid.reshape(b * hk, n).to(torch.int8).contiguous() if has_valid else out
    m = torch.empty(b * hq, w, dtype=torch.float32, device=keys.device)
    z = torch.empty_like(m)
    meta = dict(HK=hk, G=hq // hk, D=d, DP=max(16, triton.next_power_of_2(d)), BM=BLOCK_M, BN=BLOCK_N,
                HAS_POS=has_pos, HAS_VALID=has_valid, WINDOW=int(window or 0),
                IEEE=keys.dtype == torch.float32)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), qp.stride(0) if has_pos else 0,
               kp.stride(0) if has_pos else 0, val.stride(0) if has_valid else 0)
    _row_stats[(b * hq, triton.cdiv(w, BLOCK_M))](q, k, qp, kp, val, m, z, n, w, float(scaling), *strides, **meta)
    _column_sums[(b * hk, triton.cdiv(n, BLOCK_N))](q, k, qp, kp, val, m, z, out, n, w, float(scaling), *strides,
                                                   **meta)
    return out
