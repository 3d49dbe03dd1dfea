"""Fused decode attention over KIVI storage (Triton, GPU): the packed codes read in place, never dequantized in memory.

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

The folded kernel (`_kivi_decode_folded`, `fold=True`; the same split, inputs and partial results) never
dequantizes at all. The scales fold into the matrix products, and the codes enter them as they are:

    keys, key group g of a block:  q . (c s_g + z_g) = (q * s_g) . c + q . z_g
    values, value group g:         sum_t p_t (c_tg s_tg + z_tg) = (p * s_g) . c_g + (p * z_g) . 1

Each key group of a block gets its own copy of the query rows, scaled by that group's s_g (stacked rows: NG
groups x GQP queries). A stacked row sees only its group's tokens and keeps its own online softmax; the rows of
a query merge at the end. The value groups run as one batched `tl.dot`. A code becomes a `tl.dot` operand by two
PRMT instructions per four bytes, which put it into the low byte of a 16-bit float: 128 + c in bfloat16, 1024 + c
in float16. The offset is taken back out with the same rounded operands, so it cancels exactly. On the H200 it
takes 39-43% less time than the split kernel (docs/gpu.md, sixteenth session).

`kivi_decode_attention` is the entry point over an eager store; `kivi_decode_static` the same kernel over the
fixed-capacity buffers of the static decode step (lengths read from device tensors, optional per-slot masks, a grid
planned on the capacity: capturable in a CUDA graph); `reference_decode_attention` dequantizes with torch and calls
`scaled_dot_product_attention` (the reference path, also used to check the kernel). Deviation from KIVI's own
CUDA kernels: values are packed along tokens too (KIVI packs them along channels), so both share one loop.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .split_kv import _store_split, _sm_count, _split_plan, split_kv_decode

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
    tl = None


def _prmt(bits: int, shift: int):
    """PTX for `_code_operand`: four code bytes (register $2), shifted and masked to one code each, become the low
    bytes of four 16-bit floats whose high bytes come from $3 (two registers out, $0 and $1)."""
    mask = "0x03030303" if bits == 2 else "0x0f0f0f0f"
    move = f"shr.b32 t, $2, {shift}; and.b32 t, t, {mask};" if shift else f"and.b32 t, $2, {mask};"
    return tl.constexpr("{ .reg .b32 t; " + move + " prmt.b32 $0, t, $3, 0x5140; prmt.b32 $1, t, $3, 0x7362; }")


if triton is not None:
    _PRMT_2_0, _PRMT_2_1, _PRMT_2_2, _PRMT_2_3 = (_prmt(2, 2 * j) for j in range(4))
    _PRMT_4_0, _PRMT_4_1 = (_prmt(4, 4 * j) for j in range(2))

    @triton.jit
    def _split_program(NQ, NR, R0, HK: tl.constexpr, DEV_LENS: tl.constexpr):
        # a KIVI split program's place: (batch * kv head, split, splits, batch, kv head), the quantized / residual
        # lengths and the residual's ring start rs (read from device scalars with DEV_LENS: the static step; else
        # the start is 0; `r0` in the kernels is a block's first packed row)
        bh = tl.program_id(0)
        if DEV_LENS:
            nq = tl.load(NQ)
            nr = tl.load(NR)
            rs = tl.load(R0)
        else:
            nq = NQ
            nr = NR
            rs = 0
        return bh, tl.program_id(1), tl.num_programs(1), bh // HK, bh % HK, nq, nr, rs

    @triton.jit
    def _online(s, m_i, l_i):
        # one online-softmax step over logits s (rows, n) (base 2; -inf where hidden): (p, alpha, m_new, l_new)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible so far
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)

    @triton.jit
    def _attend_residual(q, acc, m_i, l_i, KR, VR, RM, nr, rs, rc, b, hk, bh, s_rm_b, s_rm_h, s_kr_bh, s_kr_n,
                         s_vr_bh, s_vr_n, row_ok, D: tl.constexpr, BLOCK_R: tl.constexpr, DT: tl.constexpr,
                         HAS_MASK: tl.constexpr):
        # the residual split: full-precision keys / values (nr tokens), seen by the rows where row_ok; residual
        # token j sits in slot (rs + j) mod rc of the rc-slot buffer (a ring: the static step's flush moves its
        # start instead of shifting the tokens; the softmax does not depend on their order)
        ch = tl.arange(0, D)
        for s0 in range(0, nr, BLOCK_R):
            tok = s0 + tl.arange(0, BLOCK_R)
            tmask = tok < nr
            tok = (rs + tok) % rc
            k = tl.load(KR + bh * s_kr_bh + tok[:, None] * s_kr_n + ch[None, :], mask=tmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k.to(DT)))
            ok = tmask
            if HAS_MASK:
                ok = ok & (tl.load(RM + b * s_rm_b + hk * s_rm_h + tok, mask=tmask, other=0) != 0)
            p, alpha, m_i, l_i = _online(tl.where(row_ok[:, None] & ok[None, :], s, float("-inf")), m_i, l_i)
            v = tl.load(VR + bh * s_vr_bh + tok[:, None] * s_vr_n + ch[None, :], mask=tmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(DT), v.to(DT))
        return acc, m_i, l_i

    @triton.jit
    def _code_offset(DT: tl.constexpr):
        # the constant `_code_operand` adds to every code: 1024 in float16, 128 otherwise
        if DT == tl.float16:
            return 1024.0
        return 128.0

    @triton.jit
    def _code_operand(packed, j: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
        # packed codes (uint8, PER = 8 / BITS tokens a byte) -> sub-tile j's codes as tl.dot operands in DT, each
        # c + _code_offset(DT), exact. On the GPU two PRMT instructions per four bytes (after one shift and one
        # mask): each code byte becomes the low byte of a bfloat16 (high byte 0x43: 128 + c) or float16 (0x64:
        # 1024 + c), so no integer-to-float conversion runs. Without ASM (Triton's CPU interpreter): arithmetic.
        if not ASM:
            return (((packed.to(tl.int32) >> (j * BITS)) & ((1 << BITS) - 1)).to(tl.float32) + _code_offset(DT)).to(DT)
        else:
            if BITS == 2:
                if j == 0:
                    asm: tl.constexpr = _PRMT_2_0
                elif j == 1:
                    asm: tl.constexpr = _PRMT_2_1
                elif j == 2:
                    asm: tl.constexpr = _PRMT_2_2
                else:
                    asm: tl.constexpr = _PRMT_2_3
            else:
                if j == 0:
                    asm: tl.constexpr = _PRMT_4_0
                else:
                    asm: tl.constexpr = _PRMT_4_1
            high = tl.full(packed.shape, _code_high(DT), tl.uint8)
            return tl.inline_asm_elementwise(asm, "=r,=r,r,r", [packed, high],
                                             dtype=tl.float16 if DT == tl.float16 else tl.bfloat16,
                                             is_pure=True, pack=4)

    @triton.jit
    def _code_high(DT: tl.constexpr):
        if DT == tl.float16:
            return 0x64
        return 0x43


    @triton.jit
    def _kivi_decode_split(
        Q, KC, KS, KZ, VC, VS, VZ, KR, VR, QM, RM, O_ACC, O_M, O_L,
        qk_scale, NQ, NR, R0, RC, CHUNK,
        s_q_b, s_q_h,
        s_qm_b, s_qm_h, s_rm_b, s_rm_h,
        s_kc_bh, s_kc_r, s_ks_bh, s_ks_g,
        s_vc_bh, s_vc_r, s_vs_bh, s_vs_n,
        s_kr_bh, s_kr_n, s_vr_bh, s_vr_n,
        HK: tl.constexpr, GQ: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
        G: tl.constexpr, GV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        SCALE_LOADS: tl.constexpr, DT: tl.constexpr,
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
        bh, split, n_splits, b, hk, nq, nr, rs = _split_program(NQ, NR, R0, HK, DEV_LENS)
        rows = tl.arange(0, GP)
        ch = tl.arange(0, D)
        qmask = rows < GQ
        q = tl.load(Q + b * s_q_b + (hk * GQ + rows)[:, None] * s_q_h + ch[None, :], mask=qmask[:, None], other=0.0)
        qf = (q.to(tl.float32) * qk_scale).to(tl.float32)  # float32 even where the scale comes as float64
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
                if not SCALE_LOADS:
                    gmask = (s0 // G + gi) < nq // G
                    kso = bh * s_ks_bh + (s0 // G + gi)[:, None] * s_ks_g + ch[None, :]
                    ks = tl.load(KS + kso, mask=gmask[:, None], other=0.0).to(tl.float32)
                    kz = tl.load(KZ + kso, mask=gmask[:, None], other=0.0).to(tl.float32)
                for j in tl.static_range(PER):
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
                    p, alpha, m_new, l_i = _online(tl.where(ok[None, :], s, float("-inf")), m_i, l_i)
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
            acc, m_i, l_i = _attend_residual(q, acc, m_i, l_i, KR, VR, RM, nr, rs, RC, b, hk, bh, s_rm_b, s_rm_h,
                                             s_kr_bh, s_kr_n, s_vr_bh, s_vr_n, rows >= 0, D=D, BLOCK_R=BLOCK_R, DT=DT,
                                             HAS_MASK=HAS_MASK)
        # partial results of the GQ real query rows only: (BH, splits, GQ, D)
        _store_split(O_ACC, O_M, O_L, acc, m_i, l_i, GQ=GQ, GP=GP, D=D)


    @triton.jit
    def _logits(qs, kp, qz, ok, QM, qm_off, rmask, j: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr,
                HAS_MASK: tl.constexpr, ASM: tl.constexpr):
        # the folded kernel's logits of sub-tile j (ROWS, RB), -inf where hidden (ok; the slot masks at QM)
        s = tl.dot(qs, tl.trans(_code_operand(kp, j, BITS, DT, ASM))) + qz[:, None]
        if HAS_MASK:
            ok = ok & (tl.load(QM + qm_off + j, mask=rmask, other=0) != 0)[None, :]
        return tl.where(ok, s, float("-inf"))

    @triton.jit
    def _values(acc3, p, vp, VS, VZ, vso, rmask, ones, minus_offset, j: tl.constexpr, s_vs_n, BITS: tl.constexpr,
                DT: tl.constexpr, ASM: tl.constexpr):
        # the folded kernel's P V of sub-tile j: (p * s).(c + offset) - offset (p * s).1 + (p * z).1 per value
        # group, three batched products (NGV, ROWS, RB) x (NGV, RB, GV) and no sum across lanes
        vs = tl.load(VS + vso + j * s_vs_n, mask=rmask[None, :], other=0.0).to(tl.float32)
        vz = tl.load(VZ + vso + j * s_vs_n, mask=rmask[None, :], other=0.0).to(tl.float32)
        ps = (p[None, :, :] * vs[:, None, :]).to(DT)
        acc3 = tl.dot(ps, _code_operand(vp, j, BITS, DT, ASM), acc3)
        acc3 = tl.dot(ps, minus_offset, acc3)
        return tl.dot((p[None, :, :] * vz[:, None, :]).to(DT), ones, acc3)

    @triton.jit
    def _kivi_decode_folded(
        Q, KC, KS, KZ, VC, VS, VZ, KR, VR, QM, RM, O_ACC, O_M, O_L,
        qk_scale, NQ, NR, R0, RC, CHUNK,
        s_q_b, s_q_h,
        s_qm_b, s_qm_h, s_rm_b, s_rm_h,
        s_kc_bh, s_kc_r, s_ks_bh, s_ks_g,
        s_vc_bh, s_vc_r, s_vs_bh, s_vs_n,
        s_kr_bh, s_kr_n, s_vr_bh, s_vr_n,
        HK: tl.constexpr, GQ: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
        G: tl.constexpr, GV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DT: tl.constexpr,
        GQP: tl.constexpr, DEV_LENS: tl.constexpr = False, HAS_MASK: tl.constexpr = False, ASM: tl.constexpr = True,
    ):
        # The same split as _kivi_decode_split (arguments, layouts, partial results), with the scales folded into
        # the matrix products so that codes enter tl.dot as they are (`_code_operand`), never dequantized:
        #   keys, group g:    q.(c s_g + z_g) = (q * s_g).c + q.z_g: ROWS = NG * GQP stacked rows, row (g, r) holds
        #                     query r scaled by the block's key group g and sees only that group's tokens; each row
        #                     keeps its own online softmax, merged per query at the end (log-sum-exp);
        #   values, token t:  sum_t p_t (c_t s_tg + z_tg) = (p * s_g).c_g + p.z_g per value group g: one batched
        #                     tl.dot over the NGV groups (NGV, ROWS, RB) x (NGV, RB, GV).
        PER: tl.constexpr = 8 // BITS
        RB: tl.constexpr = BLOCK_N // PER  # packed rows per block = tokens per sub-tile
        NG: tl.constexpr = BLOCK_N // G  # key groups per block
        NGV: tl.constexpr = D // GV  # value groups per token
        ROWS: tl.constexpr = NG * GQP
        bh, split, n_splits, b, hk, nq, nr, rs = _split_program(NQ, NR, R0, HK, DEV_LENS)
        rows = tl.arange(0, ROWS)
        qr = rows % GQP  # the query of a stacked row
        grp = rows // GQP  # its key group within a block
        ch = tl.arange(0, D)
        qf = tl.load(Q + b * s_q_b + (hk * GQ + qr)[:, None] * s_q_h + ch[None, :], mask=(qr < GQ)[:, None],
                     other=0.0).to(tl.float32) * qk_scale
        qf = qf.to(tl.float32)  # torch.compile passes the scale as float64: the softmax stays in float32
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        if split < n_splits - 1:
            ri = tl.arange(0, RB)
            gv = tl.arange(0, NGV)
            cv = tl.arange(0, GV)
            own = grp[:, None] == (ri // (G // PER))[None, :]  # (ROWS, RB): the row's group holds the packed row
            acc3 = tl.zeros([NGV, ROWS, GV], tl.float32)
            ones = tl.full([NGV, RB, GV], 1.0, DT)
            minus_offset = tl.full([NGV, RB, GV], -_code_offset(DT), DT)
            start = split * CHUNK
            for it in range(0, tl.minimum(CHUNK // BLOCK_N, tl.cdiv(nq - start, BLOCK_N))):
                s0 = start + it * BLOCK_N
                r0 = s0 // PER
                rmask = (r0 + ri) < nq // PER  # nq is a multiple of G, so packed rows are all valid or not
                kp = tl.load(KC + bh * s_kc_bh + (r0 + ri)[:, None] * s_kc_r + ch[None, :], mask=rmask[:, None],
                             other=0)
                vp = tl.load(VC + bh * s_vc_bh + (r0 + ri)[None, :, None] * s_vc_r + (gv * GV)[:, None, None]
                             + cv[None, None, :], mask=rmask[None, :, None], other=0)  # (NGV, RB, GV)
                kso = bh * s_ks_bh + (s0 // G + grp)[:, None] * s_ks_g + ch[None, :]
                gok = ((s0 // G + grp) < nq // G)[:, None]
                qs = (qf * tl.load(KS + kso, mask=gok, other=0.0).to(tl.float32)).to(DT)
                # q.z_g, less the codes' offset times the scaled query (as rounded for tl.dot: they cancel exactly)
                qz = tl.sum(qf * tl.load(KZ + kso, mask=gok, other=0.0).to(tl.float32)
                            - _code_offset(DT) * qs.to(tl.float32), 1)
                # the block's PER sub-tiles of logits side by side (ROWS, RB, 2[, 2]): one online-softmax step
                ok = own & rmask[None, :]
                qm_off = b * s_qm_b + hk * s_qm_h + s0 + ri * PER  # sub-tile 0's slots in the mask
                x = tl.join(_logits(qs, kp, qz, ok, QM, qm_off, rmask, 0, BITS, DT, HAS_MASK, ASM),
                            _logits(qs, kp, qz, ok, QM, qm_off, rmask, 1, BITS, DT, HAS_MASK, ASM))
                if PER == 4:
                    x = tl.join(x, tl.join(_logits(qs, kp, qz, ok, QM, qm_off, rmask, 2, BITS, DT, HAS_MASK, ASM),
                                           _logits(qs, kp, qz, ok, QM, qm_off, rmask, 3, BITS, DT, HAS_MASK, ASM)))
                if PER == 4:
                    m_new = tl.maximum(m_i, tl.max(tl.max(tl.max(x, 3), 2), 1))
                else:
                    m_new = tl.maximum(m_i, tl.max(tl.max(x, 2), 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible so far
                alpha = tl.exp2(m_i - m_safe)
                x = tl.exp2(x - (m_safe[:, None, None, None] if PER == 4 else m_safe[:, None, None]))
                if PER == 4:
                    l_i = l_i * alpha + tl.sum(tl.sum(tl.sum(x, 3), 2), 1)
                else:
                    l_i = l_i * alpha + tl.sum(tl.sum(x, 2), 1)
                m_i = m_new
                acc3 = acc3 * alpha[None, :, None]
                vso = bh * s_vs_bh + (s0 + ri * PER)[None, :] * s_vs_n + gv[:, None]  # (NGV, RB): sub-tile 0
                if PER == 4:
                    x01, x23 = tl.split(x)
                    p0, p1 = tl.split(x01)
                    p2, p3 = tl.split(x23)
                    acc3 = _values(acc3, p0, vp, VS, VZ, vso, rmask, ones, minus_offset, 0, s_vs_n, BITS, DT, ASM)
                    acc3 = _values(acc3, p1, vp, VS, VZ, vso, rmask, ones, minus_offset, 1, s_vs_n, BITS, DT, ASM)
                    acc3 = _values(acc3, p2, vp, VS, VZ, vso, rmask, ones, minus_offset, 2, s_vs_n, BITS, DT, ASM)
                    acc3 = _values(acc3, p3, vp, VS, VZ, vso, rmask, ones, minus_offset, 3, s_vs_n, BITS, DT, ASM)
                else:
                    p0, p1 = tl.split(x)
                    acc3 = _values(acc3, p0, vp, VS, VZ, vso, rmask, ones, minus_offset, 0, s_vs_n, BITS, DT, ASM)
                    acc3 = _values(acc3, p1, vp, VS, VZ, vso, rmask, ones, minus_offset, 1, s_vs_n, BITS, DT, ASM)
            acc = tl.reshape(tl.permute(acc3, (1, 0, 2)), (ROWS, D))
        else:
            acc = tl.zeros([ROWS, D], tl.float32)
            acc, m_i, l_i = _attend_residual(qf.to(DT), acc, m_i, l_i, KR, VR, RM, nr, rs, RC, b, hk, bh, s_rm_b,
                                             s_rm_h, s_kr_bh, s_kr_n, s_vr_bh, s_vr_n, grp == 0, D=D,
                                             BLOCK_R=BLOCK_R, DT=DT, HAS_MASK=HAS_MASK)
        # merge the NG stacked rows of each query (log-sum-exp weights), then the GQ real queries' partials
        m3 = tl.reshape(m_i, (NG, GQP))
        m_q = tl.max(m3, 0)
        w = tl.exp2(m3 - tl.where(m_q == float("-inf"), 0.0, m_q)[None, :])
        l_q = tl.sum(tl.reshape(l_i, (NG, GQP)) * w, 0)
        acc_q = tl.sum(tl.reshape(acc, (NG, GQP, D)) * w[:, :, None], 0)
        _store_split(O_ACC, O_M, O_L, acc_q, m_q, l_q, GQ=GQ, GP=GQP, D=D)


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
    docs/quantization.md). `fold=True` takes `_kivi_decode_folded` instead: the scales folded into the matrix
    products, codes never dequantized (ValueError where its shapes do not allow it: `_variant`).
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
    kernel, meta = _variant(fold, HQ // HK, G, GV, block_n, bits, scale_loads)
    out = split_kv_decode(
        kernel, (q3, kc, ks, kz, vc, vs, vz, k_res, v_res, q3, q3),
        (NQ, k_res.shape[2], 0, k_res.shape[2], chunk,
         q3.stride(0), q3.stride(1), 0, 0, 0, 0,
         kc.stride(1), kc.stride(2), ks.stride(1), ks.stride(2),
         vc.stride(1), vc.stride(2), vs.stride(1), vs.stride(2),
         k_res.stride(1), k_res.stride(2), v_res.stride(1), v_res.stride(2)),
        q3, HK, total, scale, "the fused KIVI kernel",
        BITS=bits, G=G, GV=GV, BLOCK_N=block_n, BLOCK_R=64,
        DT=tl.float16 if q.dtype == torch.float16 else tl.bfloat16, num_warps=num_warps, **meta,
        **_launch_options(0, num_stages, dev),
    )
    return out if squeeze else out[:, :, None]


# the static step's kernel where it applies: True `_kivi_decode_folded` (bench/kivi_kernels.py on the H200: 1241 against
# the split kernel's 2197 us per step of 32 layers at 32k; in the compiled KIVI-2 step at 32k 1143 us of 5877, the step
# 6.03-6.08 ms against 7.06 with the split kernel; tests/test_gpu_static.py -k kivi passed with it, seventeenth
# session), False `_kivi_decode_split`
FOLD = True
MAXNREG = None  # the split kernel's register cap per thread in `kivi_decode_static` (None: the compiler's choice)
PER_SM = 2  # the split kernel's programs per SM of the split plan in `kivi_decode_static`
# the folded kernel's launch in `kivi_decode_static`: the fastest of bench/kivi_kernels.py's sweep on the H200
# (1244 us per step of 32 layers at 32k; 1337 at 2 per SM without a cap)
FOLDED_PER_SM = 3
FOLDED_MAXNREG = 168


def _launch_options(maxnreg: int | None, num_stages: int | None, device) -> dict:
    """Triton launch options of `kivi_decode_static`: the register cap (default `MAXNREG`, 0 none; CUDA only, and not
    under torch.compile, whose wrapper of user-defined Triton kernels passes `maxnreg` to the kernel as an
    argument: the sixteenth session's compiled step failed on it) and the software-pipelining stages, where set."""
    out = {} if num_stages is None else {"num_stages": num_stages}
    maxnreg = MAXNREG if maxnreg is None else maxnreg
    if maxnreg and device.type == "cuda" and not torch.compiler.is_compiling():
        out["maxnreg"] = maxnreg
    return out


def folded_applies(group: int, value_group: int, block_n: int, bits: int) -> bool:
    """Whether `_kivi_decode_folded` takes this layout: 2 or 4 bits, value groups of >= 16 channels and sub-tiles
    of >= 16 tokens (its tl.dot shapes)."""
    return bits in (2, 4) and value_group >= 16 and block_n * bits // 8 >= 16 and block_n % group == 0


def _variant(fold: bool | None, gq: int, group: int, value_group: int, block_n: int, bits: int,
             scale_loads: bool = False) -> tuple:
    """(kernel, its extra constexprs): `_kivi_decode_split`, or `_kivi_decode_folded` with `fold` and its stacked
    rows per query (GQP: the GQ queries rounded up to a power of two, and so that NG * GQP >= 16 rows for
    tl.dot). fold None: `FOLD` where `folded_applies`, else the split kernel. Raises ValueError for fold=True
    where the folded kernel does not apply (`folded_applies`) or with scale_loads."""
    if not _folds(fold, group, value_group, block_n, bits, scale_loads):
        return _kivi_decode_split, {"SCALE_LOADS": scale_loads}
    if scale_loads or not folded_applies(group, value_group, block_n, bits):
        raise ValueError(f"the folded KIVI kernel needs 2 or 4 bits, value groups and sub-tiles of >= 16 (G_v="
                         f"{value_group}, block {block_n} at {bits} bits) and no scale_loads")
    ng = block_n // group
    return _kivi_decode_folded, {"GQP": max(triton.next_power_of_2(gq), triton.next_power_of_2(-(-16 // ng))),
                                 "ASM": os.environ.get("TRITON_INTERPRET") != "1"}


def _folds(fold: bool | None, group: int, value_group: int, block_n: int, bits: int, scale_loads: bool = False) -> bool:
    """Whether `_variant` picks the folded kernel: `fold`, or where None, `FOLD` where `folded_applies` (a plain
    bool, so that torch.compile's tracing of `kivi_decode_static` never compares kernel objects)."""
    if fold is None:
        return FOLD and not scale_loads and folded_applies(group, value_group, block_n, bits)
    return bool(fold)


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
                       num_warps: int = 4, programs_per_sm: int | None = None, fold: bool | None = None,
                       maxnreg: int | None = None, num_stages: int | None = None,
                       r0: torch.Tensor | None = None) -> torch.Tensor:
    """The fused KIVI decode attention over fixed-capacity buffers with lengths on the device (the static,
    capturable decode step: `kvsqueeze.quant.kivi_static.StaticKIVI`); the same kernels as `kivi_decode_attention`.

    q: (B, HQ, D). Packed keys kc: (B, HK, CQ * bits / 8, D) uint8 (codes packed along tokens), ks / kz:
    (B, HK, CQ / group, D) bfloat16 per-channel scales / zeros; values vc: (B, HK, CQ * bits / 8, D) uint8,
    vs / vz: (B, HK, CQ, D / value_group) bfloat16 per-token scales / zeros (CQ: the quantized capacity, a
    multiple of `group`); k_res / v_res: (B, HK, NR_max, D) the full-precision residual buffers, a ring. nq, nr,
    r0: 1-element long device tensors, the quantized tokens (a multiple of `group`), the residual tokens in use and
    the residual's start (slots [0, nq) of the packed buffers and slots (r0 + j) mod NR_max, j < nr, of the
    residual count; r0 None: 0); q_valid (B, HK, CQ) / r_valid (B, HK, NR_max) bool, optional: which of those slots
    attention may see (padding, narrower heads); both or neither. The grid is planned on CQ (no host number per
    step: capturable in a CUDA graph); splits past nq exit at once.

    `fold` (default `FOLD`, where `folded_applies`) picks `_kivi_decode_folded`; it runs as the opaque operator
    `kvsqueeze::kivi_decode_folded` (under torch.compile an extern kernel: its launch options reach Triton, which
    torch.compile's wrapper of user-defined kernels does not allow for `maxnreg`), launched by default at
    `FOLDED_PER_SM` programs per SM and `FOLDED_MAXNREG` registers (the fastest on the H200). The split kernel is a
    user-defined Triton kernel under torch.compile, at `PER_SM` programs per SM. `programs_per_sm`, `maxnreg`
    (registers per thread, 0: the compiler's choice) and `num_stages` override those (bench/kivi_kernels.py sweeps
    them). Returns (B, HQ, D) in q's dtype. Raises RuntimeError without triton, ValueError for a grouping the
    kernel does not take. Every (row, kv head) must see one slot at least (the current token is in the residual)."""
    if triton is None:
        raise RuntimeError("the fused KIVI decode kernel needs triton (pip install 'kvsqueeze[gpu]')")
    per = 8 // bits
    if block_n is None:
        block_n = 128 if bits <= 2 else 64
    block_n = max(block_n, group, 16 * per)
    if block_n % group or group % per or (group & (group - 1)) or (value_group & (value_group - 1)) or \
            (q_valid is None) != (r_valid is None):
        raise ValueError(f"unsupported KIVI grouping for the kernel: G={group}, G_v={value_group}, {bits} bits, "
                         f"block {block_n} (or only one of q_valid / r_valid given)")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if r0 is None:
        r0 = torch.zeros_like(nr)
    if not _folds(fold, group, value_group, block_n, bits):
        # dynamo traces this branch: the kernel and its constexprs named here, no kernel objects compared
        return _launch_static(_kivi_decode_split, {"SCALE_LOADS": False}, q, kc, ks, kz, vc, vs, vz, k_res, v_res,
                              nq, nr, r0, q_valid, r_valid, bits, group, value_group, scale, block_n, num_warps,
                              PER_SM if programs_per_sm is None else programs_per_sm,
                              MAXNREG if maxnreg is None else maxnreg, num_stages)
    return _folded_op(q, kc, ks, kz, vc, vs, vz, k_res, v_res, nq, nr, r0, q_valid, r_valid, bits, group, value_group,
                      scale, block_n, num_warps, FOLDED_PER_SM if programs_per_sm is None else programs_per_sm,
                      (FOLDED_MAXNREG if maxnreg is None else maxnreg) or 0, num_stages or 0)


def _launch_static(kernel, meta: dict, q, kc, ks, kz, vc, vs, vz, k_res, v_res, nq, nr, r0, q_valid, r_valid,
                   bits: int, group: int, value_group: int, scale: float, block_n: int, num_warps: int, per_sm: int,
                   maxnreg: int | None, num_stages: int | None) -> torch.Tensor:
    """`kivi_decode_static`'s launch of `kernel` (the split or folded one, its constexprs `meta`: `_variant`;
    arguments checked there)."""
    B, HQ, D = q.shape
    HK = k_res.shape[1]
    cq = kc.shape[2] * (8 // bits)
    n_q_splits, chunk = _split_plan(B * HK, cq, block_n, _sm_count(q.device), per_sm)
    total = n_q_splits + 1  # + the residual split
    masked = q_valid is not None
    qm, rm = (q_valid, r_valid) if masked else (q, q)
    return split_kv_decode(
        kernel, (q, kc, ks, kz, vc, vs, vz, k_res, v_res, qm, rm),
        (nq, nr, r0, k_res.shape[2], chunk,
         q.stride(0), q.stride(1),
         qm.stride(0) if masked else 0, qm.stride(1) if masked else 0,
         rm.stride(0) if masked else 0, rm.stride(1) if masked else 0,
         kc.stride(1), kc.stride(2), ks.stride(1), ks.stride(2),
         vc.stride(1), vc.stride(2), vs.stride(1), vs.stride(2),
         k_res.stride(1), k_res.stride(2), v_res.stride(1), v_res.stride(2)),
        q, HK, total, scale, "the fused KIVI kernel",
        BITS=bits, G=group, GV=value_group, BLOCK_N=block_n, BLOCK_R=64,
        DT=_static_dot_dtype(q), DEV_LENS=True, HAS_MASK=masked, num_warps=num_warps, **meta,
        **_launch_options(maxnreg, num_stages, q.device),
    )


# The folded kernel as one opaque operator for torch.compile (as kernels/predictor_cnn.py's): inductor calls the
# launch as an extern kernel, so `maxnreg` reaches Triton and the scale stays a float32 argument; CUDA graphs
# capture the launch as any other.
@torch.library.custom_op("kvsqueeze::kivi_decode_folded", mutates_args=())
def _folded_op(q: torch.Tensor, kc: torch.Tensor, ks: torch.Tensor, kz: torch.Tensor, vc: torch.Tensor,
               vs: torch.Tensor, vz: torch.Tensor, k_res: torch.Tensor, v_res: torch.Tensor, nq: torch.Tensor,
               nr: torch.Tensor, r0: torch.Tensor, q_valid: torch.Tensor | None, r_valid: torch.Tensor | None,
               bits: int, group: int, value_group: int, scale: float, block_n: int, num_warps: int, per_sm: int,
               maxnreg: int, num_stages: int) -> torch.Tensor:
    kernel, meta = _variant(True, q.shape[1] // k_res.shape[1], group, value_group, block_n, bits)
    return _launch_static(kernel, meta, q, kc, ks, kz, vc, vs, vz, k_res, v_res, nq, nr, r0, q_valid, r_valid, bits,
                          group, value_group, scale, block_n, num_warps, per_sm, maxnreg or None, num_stages or None)


@_folded_op.register_fake
def _(q, kc, ks, kz, vc, vs, vz, k_res, v_res, nq, nr, r0, q_valid, r_valid, bits, group, value_group, scale, block_n,
      num_warps, per_sm, maxnreg, num_stages):
    return q.new_empty(q.shape)


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
