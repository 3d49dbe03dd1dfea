"""Split-KV (flash-decoding) helpers shared by the decode kernels: the merge of the splits' partial results, the
split plan, and the host side of a launch (`split_kv_decode`: checks, partial buffers, split kernel, merge).

A decode kernel runs one program per ((batch, kv head), split of the tokens) and writes, for each of the GQ query
heads of its group, a partial output `acc` (unnormalised, fp32), the running max `m` (base-2 logits) and the sum
`l` of exp2(logit - m); `_merge_splits` combines them with log-sum-exp weights (Dao et al., "Flash-Decoding for
long-context inference", 2023):

    out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s,     M = max_s m_s

Layouts: O_ACC (B*HK*splits*GQ, D) fp32, O_M and O_L (B*HK*splits*GQ,), indexed ((b*HK + hk)*splits + s)*GQ + r.

A second kernel, `_merge_splits` (one program per (batch, query head)), merges after the split kernel. Merging
inside the split kernel instead (the last program of each (batch, kv head) to finish, found by an atomic ticket,
merges its group: one launch per layer) was measured slower on the H200 in every plan tried (twelfth session,
docs/gpu.md: 32 layers at 4096 slots, 2 programs per SM, 500 against 370 us): the merging program's serial tail
costs more than the second launch inside a CUDA graph.

A split kernel takes, in this order: its input tensors, O_ACC, O_M, O_L, qk_scale (the softmax scale times
log2(e): the kernels run exp2), its other arguments; the constexprs HK, GQ (query heads per kv head), GP (GQ rounded
up to a power of two, at least 16: the rows of its `tl.dot` tile) and D by keyword; and it ends with
`_store_split`.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
    tl = None

_merge_splits = _store_split = None  # Triton kernels: None where triton is not installed (CPU-only installs)

if triton is not None:

    @triton.jit
    def _merge_splits(O_ACC, O_M, O_L, OUT, n_splits, s_o_b, s_o_h,
                      HK: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr):
        # one program per (batch, query head): log-sum-exp merge of its splits, BLOCK_S splits per load
        pid = tl.program_id(0)
        bh = pid // GQ
        r = pid % GQ
        b = bh // HK
        hk = bh % HK
        ch = tl.arange(0, D)
        si = tl.arange(0, BLOCK_S)
        base = bh * n_splits * GQ + r
        m_max = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), 0)
        for s0 in range(0, n_splits, BLOCK_S):
            sm = (s0 + si) < n_splits
            m_max = tl.maximum(m_max, tl.max(tl.load(O_M + base + (s0 + si) * GQ, mask=sm, other=float("-inf")), 0))
        acc = tl.zeros([D], tl.float32)
        l_sum = tl.max(tl.zeros([BLOCK_S], tl.float32), 0)
        for s0 in range(0, n_splits, BLOCK_S):
            sm = (s0 + si) < n_splits
            w = tl.exp2(tl.load(O_M + base + (s0 + si) * GQ, mask=sm, other=float("-inf")) - m_max)
            l_sum += tl.sum(tl.load(O_L + base + (s0 + si) * GQ, mask=sm, other=0.0) * w, 0)
            a = tl.load(O_ACC + (base + (s0 + si) * GQ)[:, None] * D + ch[None, :], mask=sm[:, None], other=0.0)
            acc += tl.sum(a * w[:, None], 0)
        tl.store(OUT + b * s_o_b + (hk * GQ + r) * s_o_h + ch, (acc / l_sum).to(OUT.dtype.element_ty))

    @triton.jit
    def _store_split(O_ACC, O_M, O_L, acc, m_i, l_i, GQ: tl.constexpr, GP: tl.constexpr, D: tl.constexpr):
        # the end of every split kernel: this program's partials (acc (GP, D), m_i and l_i (GP,) fp32), GQ real rows
        off = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        rows = tl.arange(0, GP)
        ch = tl.arange(0, D)
        qmask = rows < GQ
        tl.store(O_M + off * GQ + rows, m_i, mask=qmask)
        tl.store(O_L + off * GQ + rows, l_i, mask=qmask)
        tl.store(O_ACC + (off * GQ + rows)[:, None] * D + ch[None, :], acc, mask=qmask[:, None])


_SM: dict = {}


def _sm_count(dev) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 4 elsewhere (Triton's CPU interpreter)."""
    if dev.type != "cuda":
        return 4
    key = dev.index if dev.index is not None else torch.cuda.current_device()
    if key not in _SM:
        _SM[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM[key]


def require_triton(what: str) -> None:
    """Raises RuntimeError naming `what` (e.g. "the slot decode kernel") when triton is not installed."""
    if triton is None:
        raise RuntimeError(f"{what} needs triton (pip install 'kvsqueeze[gpu]')")


def split_kv_decode(kernel, inputs: tuple, args: tuple, q: torch.Tensor, n_kv_heads: int, n_splits: int,
                    scale: float | None, what: str, unit_stride: tuple = (), **meta) -> torch.Tensor:
    """Launch a split kernel over (B * HK programs, `n_splits` splits), then `_merge_splits`: one decode query per
    row and query head, q (B, HQ, D), over `n_kv_heads` = HK kv heads. `inputs` are the kernel's tensors before
    the partial buffers, `args` its arguments after qk_scale, `meta` its other keyword arguments (constexprs,
    num_warps, ...); scale None is D ** -0.5. Returns (B, HQ, D) in q's dtype.

    Raises ValueError (naming `what`) when HQ is not a multiple of HK, D is not a power of two >= 16, or q or a
    tensor of `unit_stride` has a last stride other than 1. Call `require_triton` first."""
    B, HQ, D = q.shape
    HK = n_kv_heads
    if HQ % HK or D < 16 or D & (D - 1) or any(t.stride(-1) != 1 for t in (q, *unit_stride)):
        raise ValueError(f"unsupported shapes for {what}: q {tuple(q.shape)}, {HK} kv heads"
                         + "".join(f", {tuple(t.shape)}" for t in unit_stride))
    GQ = HQ // HK
    GP = max(16, triton.next_power_of_2(GQ))
    scale = D ** -0.5 if scale is None else scale
    o_acc = torch.empty(B * HK * n_splits * GQ, D, dtype=torch.float32, device=q.device)
    o_m = torch.empty(B * HK * n_splits * GQ, dtype=torch.float32, device=q.device)
    o_l = torch.empty_like(o_m)
    kernel[(B * HK, n_splits)](*inputs, o_acc, o_m, o_l, scale * 1.4426950408889634, *args,
                               HK=HK, GQ=GQ, GP=GP, D=D, **meta)
    out = torch.empty(B, HQ, D, dtype=q.dtype, device=q.device)
    _merge_splits[(B * HQ,)](o_acc, o_m, o_l, out, n_splits, out.stride(0), out.stride(1),
                             HK=HK, GQ=GQ, D=D, BLOCK_S=32, num_warps=4)
    return out


PROGRAMS_PER_SM = 2  # the slot and page kernels' default split plan (measured on the H200: docs/gpu.md)


def _split_plan(bh: int, nq: int, block_n: int, n_sm: int, per_sm: int = PROGRAMS_PER_SM) -> tuple[int, int]:
    """(number of splits over `nq` tokens, tokens per split, a multiple of `block_n`): about `per_sm` programs per
    SM over the `bh` (batch, kv head) pairs. 2 per SM was the fastest of 1, 2, 4 and 8 on the H200 for 32 layers of
    4096, 16384 and 32768 slots and 4096 selected of 131072 (bench/split_plan.py, twelfth session: 370 / 821 /
    1336 / 408 us per step against 477 / 979 / 1561 / 445 at the 4 per SM used before)."""
    blocks = max(1, math.ceil(nq / block_n))
    n = max(1, min(blocks, math.ceil(per_sm * n_sm / max(1, bh))))
    chunk = math.ceil(blocks / n) * block_n
    return math.ceil(max(nq, 1) / chunk), chunk
