"""Fused decode attention over KIVI storage (Triton, GPU): dequantization happens inside the attention kernel.

For one decoding step (one query token per sequence), each program takes one (batch, kv head) and one split of
the quantized tokens (flash-decoding), with all the query heads of that kv head's GQA group as the rows of a
`tl.dot` tile. Codes are packed along tokens (`packing.py`): a block of BLOCK_N tokens is BLOCK_N / (8/b)
contiguous rows of d bytes (16-byte loads), which unpack by shifts into 8/b sub-tiles of whole tokens in natural
channel order. Per block it loads the packed key and value rows and the key groups' scale/zero rows once; per
sub-tile it dequantizes keys in registers (scale/zero broadcast over the group's tokens), computes the logits,
runs an online softmax (exp2), dequantizes the values (per-token scale/zero broadcast over each group of G_v
channels) and accumulates P V (`scale_loads=True` loads per-row scales instead of broadcasting in registers).
One extra split per kv head attends to the full-precision residual. A second small kernel merges the splits
(log-sum-exp weights), one program per query head. Only the packed bytes, scales and residual cross the memory
bus: about 5x fewer bytes than an fp16 cache at 2 bits (d = 128, G = 32: 96 instead of 512 bytes per token).

    out = softmax(q K_hat^T * scale) V_hat      K_hat, V_hat as in kivi.py, never materialised in memory

`kivi_decode_attention` is the entry point over an eager store; `kivi_decode_static` the same kernel over the
fixed-capacity buffers of the static decode step (lengths read from device tensors, optional per-slot masks, a grid
planned on the capacity: capturable in a CUDA graph); `reference_decode_attention` dequantizes with torch and calls
`scaled_dot_product_attention` (the reference path, also used to check the kernel). Deviation from KIVI's own
CUDA kernels: values are packed along tokens too (KIVI packs them along channels), so both share one loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .split_kv import _store_split, _sm_count, _split_plan, split_kv_decode

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
    tl = None


if triton is not None:

    @triton.jit
    def _kivi_decode_split(
        Q, KC, KS, KZ, VC, VS, VZ, KR, VR, QM, RM, O_ACC, O_M, O_L,
        qk_scale, NQ, NR, CHUNK,
        s_q_b, s_q_h,
        s_qm_b, s_qm_h, s_rm_b, s_rm_h,
        s_kc_bh, s_kc_r, s_ks_bh, s_ks_g,
        s_vc_bh, s_vc_r, s_vs_bh, s_vs_n,
        s_kr_bh, s_kr_n, s_vr_bh, s_vr_n,
        HK: tl.constexpr, GQ: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
        G: tl.constexpr, GV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        SCALE_LOADS: tl.constexpr, FOLD: tl.constexpr, DT: tl.constexpr,
        DEV_LENS: tl.constexpr = False, HAS_MASK: tl.constexpr = False,
    ):
        # DEV_LENS: NQ and NR are pointers to device scalars (the static decode step: no host number per step);
        # HAS_MASK: QM (quantized slots) and RM (residual slots) are per-(row, kv head) bool masks of the slots
        # attention may see (padding, hidden slots of narrower heads), on top of the lengths.
        # codes are packed along tokens: packed row r of a (batch, kv head) holds tokens PER*r + j (j < PER), every
        # channel in natural order; key scales/zeros: one row of D per group of G tokens; value scales/zeros:
        # D // GV per token. DT: the tl.dot operand dtype (bfloat16 unless the model is float16: dequantized values
        # of fp32/bf16 models can exceed float16's range).
        PER: tl.constexpr = 8 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        RB: tl.constexpr = BLOCK_N // PER  # packed rows per block = tokens per sub-tile
        NG: tl.constexpr = BLOCK_N // G  # key groups per block
        NGV: tl.constexpr = D // GV  # value groups per token
        bh = tl.program_id(0)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        b = bh // HK
        hk = bh % HK
        if DEV_LENS:
            nq = tl.load(NQ)
            nr = tl.load(NR)
        else:
            nq = NQ
            nr = NR
        rows = tl.arange(0, GP)
        ch = tl.arange(0, D)
        qmask = rows < GQ
        q = tl.load(Q + b * s_q_b + (hk * GQ + rows)[:, None] * s_q_h + ch[None, :], mask=qmask[:, None], other=0.0)
        qf = q.to(tl.float32) * qk_scale
        q = qf.to(DT)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        if split < n_splits - 1:
            ri = tl.arange(0, RB)
            gi = tl.arange(0, NG)
            gv = tl.arange(0, NGV)
            start = split * CHUNK
            # the blocks of this split below nq (none for a split past it: capacity-planned static grids)
            for it in range(0, tl.minimum(CHUNK // BLOCK_N, tl.cdiv(nq - start, BLOCK_N))):
                s0 = start + it * BLOCK_N
                r0 = s0 // PER
                rmask = (r0 + ri) < nq // PER  # nq is a multiple of G, so packed rows are all valid or not
                kp = tl.load(KC + bh * s_kc_bh + (r0 + ri)[:, None] * s_kc_r + ch[None, :], mask=rmask[:, None],
                             other=0).to(tl.int32)
                vp = tl.load(VC + bh * s_vc_bh + (r0 + ri)[:, None] * s_vc_r + ch[None, :], mask=rmask[:, None],
                             other=0).to(tl.int32)
                if FOLD:
                    # scales folded into the matrix products: q.(c*s + z) = (q*s).c + q.z per key group, and
                    # sum_t p_t (c_t*s_t + z_t) = (p*s).c + p.z per value group; the codes only need a conversion
                    rg = ri // (G // PER)  # key group (within the block) of each packed row
                    cg = ch // GV  # value group of each channel
                    for j in tl.static_range(PER):
                        tok = s0 + ri * PER + j
                        kc = ((kp >> (j * BITS)) & MASK).to(DT)
                        s = tl.zeros([GP, RB], tl.float32)
                        for lg in tl.static_range(NG):
                            kso = bh * s_ks_bh + (s0 // G + lg) * s_ks_g + ch
                            gok = (s0 // G + lg) < nq // G
                            ks = tl.load(KS + kso, mask=gok & (ch < D), other=0.0).to(tl.float32)
                            kz = tl.load(KZ + kso, mask=gok & (ch < D), other=0.0).to(tl.float32)
                            part = tl.dot((qf * ks[None, :]).to(DT), tl.trans(kc))
                            part += tl.sum(qf * kz[None, :], 1)[:, None]
                            s = tl.where((rg == lg)[None, :], part, s)
                        ok = rmask
                        if HAS_MASK:
                            ok = ok & (tl.load(QM + b * s_qm_b + hk * s_qm_h + tok, mask=rmask, other=0) != 0)
                        s = tl.where(ok[None, :], s, float("-inf"))
                        m_new = tl.maximum(m_i, tl.max(s, 1))
                        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible so far
                        alpha = tl.exp2(m_i - m_safe)
                        p = tl.exp2(s - m_safe[:, None])
                        l_i = l_i * alpha + tl.sum(p, 1)
                        acc = acc * alpha[:, None]
                        vc = ((vp >> (j * BITS)) & MASK).to(DT)
                        for g in tl.static_range(NGV):
                            vso = bh * s_vs_bh + tok * s_vs_n + g
                            vs = tl.load(VS + vso, mask=rmask, other=0.0).to(tl.float32)
                            vz = tl.load(VZ + vso, mask=rmask, other=0.0).to(tl.float32)
                            contrib = tl.dot((p * vs[None, :]).to(DT), vc)
                            contrib += tl.sum(p * vz[None, :], 1)[:, None]
                            acc += tl.where((cg == g)[None, :], contrib, 0.0)
                        m_i = m_new
                elif not SCALE_LOADS:
                    gmask = (s0 // G + gi) < nq // G
                    kso = bh * s_ks_bh + (s0 // G + gi)[:, None] * s_ks_g + ch[None, :]
                    ks = tl.load(KS + kso, mask=gmask[:, None], other=0.0).to(tl.float32)
                    kz = tl.load(KZ + kso, mask=gmask[:, None], other=0.0).to(tl.float32)
                for j in tl.static_range(0 if FOLD else PER):
                    tok = s0 + ri * PER + j  # sub-tile j: tokens PER*r + j; group of row r: r // (G // PER)
                    kc = ((kp >> (j * BITS)) & MASK).to(tl.float32)
                    if SCALE_LOADS:  # per-row scale/zero loads (rows of a group hit the same cache lines)
                        kso = bh * s_ks_bh + (tok // G)[:, None] * s_ks_g + ch[None, :]
                        k = kc * tl.load(KS + kso, mask=rmask[:, None], other=0.0).to(tl.float32) + \
                            tl.load(KZ + kso, mask=rmask[:, None], other=0.0).to(tl.float32)
                    else:  # broadcast the block's group rows over their tokens
                        k = tl.reshape(kc, (NG, G // PER, D)) * ks[:, None, :] + kz[:, None, :]
                    k = tl.reshape(k, (RB, D)).to(DT)
                    s = tl.dot(q, tl.trans(k))
                    ok = rmask
                    if HAS_MASK:
                        ok = ok & (tl.load(QM + b * s_qm_b + hk * s_qm_h + tok, mask=rmask, other=0) != 0)
                    s = tl.where(ok[None, :], s, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s, 1))
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    alpha = tl.exp2(m_i - m_safe)
                    p = tl.exp2(s - m_safe[:, None])
                    l_i = l_i * alpha + tl.sum(p, 1)
                    vc = ((vp >> (j * BITS)) & MASK).to(tl.float32)
                    if SCALE_LOADS:
                        vso = bh * s_vs_bh + tok[:, None] * s_vs_n + (ch // GV)[None, :]
                        v = vc * tl.load(VS + vso, mask=rmask[:, None], other=0.0).to(tl.float32) + \
                            tl.load(VZ + vso, mask=rmask[:, None], other=0.0).to(tl.float32)
                    else:
                        vso = bh * s_vs_bh + tok[:, None] * s_vs_n + gv[None, :]
                        vs = tl.load(VS + vso, mask=rmask[:, None], other=0.0).to(tl.float32)
                        vz = tl.load(VZ + vso, mask=rmask[:, None], other=0.0).to(tl.float32)
                        v = tl.reshape(vc, (RB, NGV, GV)) * vs[:, :, None] + vz[:, :, None]
                    v = tl.reshape(v, (RB, D)).to(DT)
                    acc = acc * alpha[:, None] + tl.dot(p.to(DT), v)
                    m_i = m_new
        else:
            for s0 in range(0, nr, BLOCK_R):
                tok = s0 + tl.arange(0, BLOCK_R)
                tmask = tok < nr
                k = tl.load(KR + bh * s_kr_bh + tok[:, None] * s_kr_n + ch[None, :], mask=tmask[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k.to(DT)))
                ok = tmask
                if HAS_MASK:
                    ok = ok & (tl.load(RM + b * s_rm_b + hk * s_rm_h + tok, mask=tmask, other=0) != 0)
                s = tl.where(ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(VR + bh * s_vr_bh + tok[:, None] * s_vr_n + ch[None, :], mask=tmask[:, None], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(DT), v.to(DT))
                m_i = m_new
        # partial results of the GQ real query rows only: (BH, splits, GQ, D)
        _store_split(O_ACC, O_M, O_L, acc, m_i, l_i, GQ=GQ, GP=GP, D=D)


def kivi_decode_attention(q: torch.Tensor, store, k_res: torch.Tensor, v_res: torch.Tensor,
                          scale: float | None = None, block_n: int | None = None, n_splits: int | None = None,
                          num_warps: int = 4, programs_per_sm: int = 2, num_stages: int | None = None,
                          scale_loads: bool = False, fold: bool = False) -> torch.Tensor:
    """Attention of one decode query per sequence over KIVI storage, fused on the GPU.

    q: (B, HQ, 1, D) or (B, HQ, D); store: a `KIVISegment` (codes packed along tokens; None when every token is
    still residual) of the oldest slots; k_res, v_res: (B, HK, NR, D) the full-precision residual (the newest
    slots). Returns (B, HQ, 1, D) in q's dtype. Slot order does not matter (one query token, every slot visible).

    Defaults (block of 128 tokens at 2 bits, 64 at 4 and 8; 4 warps; about 2 programs per SM; scales broadcast
    in registers) are the fastest of the settings swept on an H100 (bench/quant_decode_gpu.py --sweep; see
    docs/quantization.md). `fold=True` folds the scales into the matrix products instead (slower there).
    """
    if triton is None:
        raise RuntimeError("the fused KIVI decode kernel needs triton (pip install 'kvsqueeze[gpu]')")
    squeeze = q.dim() == 3
    q3 = q if squeeze else q[:, :, 0]
    B, HQ, D = q3.shape
    HK = k_res.shape[1]
    scale = D ** -0.5 if scale is None else scale
    dev = q.device
    if store is not None and store.n > 0:
        kq, vq = store.k, store.v
        if kq.packed_along != "token" or vq.packed_along != "token" or kq.bits != vq.bits:
            raise ValueError("the fused kernel reads KIVI stores packed along tokens, keys and values at equal bits")
        bits, G, GV, NQ = kq.bits, kq.group, vq.group, kq.n
        kc, ks, kz = kq.codes.contiguous(), kq.scale.contiguous(), kq.zero.contiguous()
        vc, vs, vz = vq.codes.contiguous(), vq.scale.contiguous(), vq.zero.contiguous()
    else:  # nothing quantized yet: dummy tensors, no quantized split runs
        bits, G, GV, NQ = 2, 32, D, 0
        kc = vc = torch.zeros(B, HK, 1, D, dtype=torch.uint8, device=dev)
        ks = kz = torch.zeros(B, HK, 1, D, dtype=torch.bfloat16, device=dev)
        vs = vz = torch.zeros(B, HK, 1, 1, dtype=torch.bfloat16, device=dev)
    per = 8 // bits
    if block_n is None:
        block_n = 128 if bits <= 2 else 64
    block_n = max(block_n, G, 16 * per)  # a block holds whole key groups, sub-tiles of >= 16 tokens
    if block_n % G or G % per or (G & (G - 1)) or (GV & (GV - 1)):
        raise ValueError(f"unsupported KIVI grouping for the kernel: G={G}, G_v={GV}, {bits} bits, block {block_n}")
    k_res, v_res = k_res.contiguous(), v_res.contiguous()
    n_sm = _sm_count(dev)
    if NQ + k_res.shape[2] == 0:
        raise ValueError("nothing to attend to")
    if NQ == 0:
        n_q_splits, chunk = 0, block_n
    elif n_splits is None:
        n_q_splits, chunk = _split_plan(B * HK, NQ, block_n, n_sm, programs_per_sm)
    else:
        chunk = math.ceil(NQ / n_splits / block_n) * block_n
        n_q_splits = math.ceil(NQ / chunk)
    total = n_q_splits + 1  # + the residual split
    extra = {} if num_stages is None else {"num_stages": num_stages}
    out = split_kv_decode(
        _kivi_decode_split, (q3, kc, ks, kz, vc, vs, vz, k_res, v_res, q3, q3),
        (NQ, k_res.shape[2], chunk,
         q3.stride(0), q3.stride(1), 0, 0, 0, 0,
         kc.stride(1), kc.stride(2), ks.stride(1), ks.stride(2),
         vc.stride(1), vc.stride(2), vs.stride(1), vs.stride(2),
         k_res.stride(1), k_res.stride(2), v_res.stride(1), v_res.stride(2)),
        q3, HK, total, scale, "the fused KIVI kernel",
        BITS=bits, G=G, GV=GV, BLOCK_N=block_n, BLOCK_R=64, SCALE_LOADS=scale_loads, FOLD=fold,
        DT=tl.float16 if q.dtype == torch.float16 else tl.bfloat16, num_warps=num_warps, **extra,
    )
    return out if squeeze else out[:, :, None]


def _static_dot_dtype(q: torch.Tensor):
    """The `tl.dot` operand dtype of the static entry point: as `kivi_decode_attention` on the GPU (float16 for
    float16 models, else bfloat16); float32 off CUDA (Triton's CPU interpreter: its bfloat16 `tl.dot` is broken)."""
    if q.device.type != "cuda":
        return tl.float32
    return tl.float16 if q.dtype == torch.float16 else tl.bfloat16


def kivi_decode_static(q: torch.Tensor, kc: torch.Tensor, ks: torch.Tensor, kz: torch.Tensor, vc: torch.Tensor,
                       vs: torch.Tensor, vz: torch.Tensor, k_res: torch.Tensor, v_res: torch.Tensor,
                       nq: torch.Tensor, nr: torch.Tensor, bits: int, group: int, value_group: int,
                       scale: float | None = None, q_valid: torch.Tensor | None = None,
                       r_valid: torch.Tensor | None = None, block_n: int | None = None,
                       num_warps: int = 4, programs_per_sm: int = 2) -> torch.Tensor:
    """The fused KIVI decode attention over fixed-capacity buffers with lengths on the device (the static,
    capturable decode step: `kvsqueeze.quant.kivi_static.StaticKIVI`); the same kernel as `kivi_decode_attention`.

    q: (B, HQ, D). Packed keys kc: (B, HK, CQ * bits / 8, D) uint8 (codes packed along tokens), ks / kz:
    (B, HK, CQ / group, D) bfloat16 per-channel scales / zeros; values vc: (B, HK, CQ * bits / 8, D) uint8,
    vs / vz: (B, HK, CQ, D / value_group) bfloat16 per-token scales / zeros (CQ: the quantized capacity, a
    multiple of `group`); k_res / v_res: (B, HK, NR_max, D) the full-precision residual buffers. nq, nr: 1-element
    long device tensors, the quantized tokens (a multiple of `group`) and residual tokens in use (slots
    [0, nq) and [0, nr) count); q_valid (B, HK, CQ) / r_valid (B, HK, NR_max) bool, optional: which of those slots
    attention may see (padding, narrower heads); both or neither. The grid is planned on CQ (no host number per
    step: capturable in a CUDA graph, a user-defined Triton kernel under `torch.compile`); splits past nq exit
    at once. Returns (B, HQ, D) in q's dtype. Raises RuntimeError without triton, ValueError for a grouping the
    kernel does not take. Every (row, kv head) must see one slot at least (the current token is in the residual)."""
    if triton is None:
        raise RuntimeError("the fused KIVI decode kernel needs triton (pip install 'kvsqueeze[gpu]')")
    B, HQ, D = q.shape
    HK = k_res.shape[1]
    scale = D ** -0.5 if scale is None else scale
    per = 8 // bits
    cq = kc.shape[2] * per
    if block_n is None:
        block_n = 128 if bits <= 2 else 64
    block_n = max(block_n, group, 16 * per)
    if block_n % group or group % per or (group & (group - 1)) or (value_group & (value_group - 1)) or \
            (q_valid is None) != (r_valid is None):
        raise ValueError(f"unsupported KIVI grouping for the kernel: G={group}, G_v={value_group}, {bits} bits, "
                         f"block {block_n} (or only one of q_valid / r_valid given)")
    n_q_splits, chunk = _split_plan(B * HK, cq, block_n, _sm_count(q.device), programs_per_sm)
    total = n_q_splits + 1  # + the residual split
    masked = q_valid is not None
    qm, rm = (q_valid, r_valid) if masked else (q, q)
    return split_kv_decode(
        _kivi_decode_split, (q, kc, ks, kz, vc, vs, vz, k_res, v_res, qm, rm),
        (nq, nr, chunk,
         q.stride(0), q.stride(1),
         qm.stride(0) if masked else 0, qm.stride(1) if masked else 0,
         rm.stride(0) if masked else 0, rm.stride(1) if masked else 0,
         kc.stride(1), kc.stride(2), ks.stride(1), ks.stride(2),
         vc.stride(1), vc.stride(2), vs.stride(1), vs.stride(2),
         k_res.stride(1), k_res.stride(2), v_res.stride(1), v_res.stride(2)),
        q, HK, total, scale, "the fused KIVI kernel",
        BITS=bits, G=group, GV=value_group, BLOCK_N=block_n, BLOCK_R=64,
        SCALE_LOADS=False, FOLD=False, DT=_static_dot_dtype(q), DEV_LENS=True, HAS_MASK=masked,
        num_warps=num_warps,
    )


def reference_decode_attention(q: torch.Tensor, store, k_res: torch.Tensor, v_res: torch.Tensor,
                               scale: float | None = None) -> torch.Tensor:
    """Dequantize with torch, then `scaled_dot_product_attention` (the reference path; any device)."""
    squeeze = q.dim() == 3
    q4 = q[:, :, None] if squeeze else q
    k, v = k_res, v_res
    if store is not None and store.n > 0:
        k = torch.cat([store.keys(q.dtype), k_res.to(q.dtype)], dim=2)
        v = torch.cat([store.values(q.dtype), v_res.to(q.dtype)], dim=2)
    out = gqa_decode_sdpa(q4, k, v, scale)
    return out[:, :, 0] if squeeze else out


def gqa_decode_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """One-token decode attention with GQA through sdpa: the group's query heads become query rows of their kv
    head (no mask needed: every slot is visible), which lets sdpa use its fused kernels. q: (B, HQ, 1, D)."""
    B, HQ, _, D = q.shape
    HK = k.shape[1]
    out = F.scaled_dot_product_attention(q.reshape(B, HK, HQ // HK, D), k, v, scale=scale)
    return out.reshape(B, HQ, 1, D)
