"""Split-KV (flash-decoding) helpers shared by the decode kernels: the merge of the splits' partial results, the
split plan, and the host side of a launch (`split_kv_decode`: checks, partial buffers, split kernel, merge).

A decode kernel runs one program per ((batch, kv head), split of the tokens) and writes, for each of the GQ query
heads of its group, a partial output `acc` (unnormalised, fp32), the running max `m` (base-2 logits) and the sum
`l` of exp2(logit - m); `_merge_splits` combines them with log-sum-exp weights (Dao et al., "Flash-Decoding for
long-context inference", 2023):

    out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s,     M = max_s m_s

Layouts: O_ACC (B*HK*splits*GQ, D) fp32, O_M and O_L (B*HK*splits*GQ,), indexed ((b*HK + hk)*splits + s)*GQ + r.

The merge runs in one of two ways:
- a second kernel, `_merge_splits`, one program per (batch, query head), after the split kernel (any caller);
- fused into the split kernel (`lock` given: the static decode step passes a persistent zeroed int32 buffer of
  B*HK counters). Each program stores its partials, then takes a ticket (`atomic_add` on its (batch, kv head)'s
  counter, acquire-release at GPU scope, after a block barrier); the program that draws the last ticket merges
  the group's splits, reading them through L2 (`.cg`), writes the output and resets the counter to 0 for the
  next launch (a CUDA graph replays with the same buffer). One launch per layer and step instead of two, the
  "last block" reduction of CUDA's threadFenceReduction sample.

A split kernel takes, in this order: its input tensors, O_ACC, O_M, O_L, OUT, LOCK, qk_scale (the softmax scale
times log2(e): the kernels run exp2), its other arguments, then s_o_b, s_o_h (OUT's strides); the constexprs HK,
GQ (query heads per kv head), GP (GQ rounded up to a power of two, at least 16: the rows of its `tl.dot` tile), D
and FUSED by keyword; and it ends with `_finish_split`.
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

_merge_splits = None

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
    def _finish_split(O_ACC, O_M, O_L, OUT, LOCK, acc, m_i, l_i, s_o_b, s_o_h,
                      HK: tl.constexpr, GQ: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                      FUSED: tl.constexpr):
        # the end of every split kernel: store this program's partials (acc (GP, D), m_i and l_i (GP,) fp32);
        # FUSED: the last program of its (batch, kv head) to finish merges them (see the module docstring)
        bh = tl.program_id(0)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        rows = tl.arange(0, GP)
        ch = tl.arange(0, D)
        qmask = rows < GQ
        off = bh * n_splits + split
        tl.store(O_M + off * GQ + rows, m_i, mask=qmask)
        tl.store(O_L + off * GQ + rows, l_i, mask=qmask)
        tl.store(O_ACC + (off * GQ + rows)[:, None] * D + ch[None, :], acc, mask=qmask[:, None])
        if FUSED:
            tl.debug_barrier()  # every thread's partials issued before the ticket (release, GPU scope)
            ticket = tl.atomic_add(LOCK + bh, 1, sem="acq_rel", scope="gpu")
            if ticket == n_splits - 1:
                b = bh // HK
                hk = bh % HK
                si = tl.arange(0, 32)
                for r in tl.static_range(GQ):
                    base = bh * n_splits * GQ + r
                    m_run = tl.max(tl.full([32], float("-inf"), tl.float32), 0)
                    l_run = tl.max(tl.zeros([32], tl.float32), 0)
                    o_run = tl.zeros([D], tl.float32)
                    for s0 in range(0, n_splits, 32):  # online log-sum-exp over blocks of 32 splits
                        sm = (s0 + si) < n_splits
                        ms = tl.load(O_M + base + (s0 + si) * GQ, mask=sm, other=float("-inf"), cache_modifier=".cg")
                        ls = tl.load(O_L + base + (s0 + si) * GQ, mask=sm, other=0.0, cache_modifier=".cg")
                        a = tl.load(O_ACC + (base + (s0 + si) * GQ)[:, None] * D + ch[None, :], mask=sm[:, None],
                                    other=0.0, cache_modifier=".cg")
                        m_new = tl.maximum(m_run, tl.max(ms, 0))
                        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                        alpha = tl.exp2(m_run - m_safe)
                        w = tl.exp2(ms - m_safe)
                        l_run = l_run * alpha + tl.sum(ls * w, 0)
                        o_run = o_run * alpha + tl.sum(a * w[:, None], 0)
                        m_run = m_new
                    tl.store(OUT + b * s_o_b + (hk * GQ + r) * s_o_h + ch, (o_run / l_run).to(OUT.dtype.element_ty))
                tl.atomic_xchg(LOCK + bh, 0)  # ready for the next launch


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
                    scale: float | None, what: str, unit_stride: tuple = (), lock: torch.Tensor | None = None,
                    **meta) -> torch.Tensor:
    """Launch a split kernel over (B * HK programs, `n_splits` splits), merging the splits in the kernel (`lock`
    given) or with `_merge_splits` after it: one decode query per row and query head, q (B, HQ, D), over
    `n_kv_heads` = HK kv heads. `inputs` are the kernel's tensors before the partial buffers, `args` its arguments
    after qk_scale, `meta` its other keyword arguments (constexprs, num_warps, ...); scale None is D ** -0.5.
    `lock`: a zeroed int32 device tensor of at least B * HK counters that persists across calls (each launch
    leaves it zeroed); see the module docstring. Returns (B, HQ, D) in q's dtype.

    Raises ValueError (naming `what`) when HQ is not a multiple of HK, D is not a power of two >= 16, q or a
    tensor of `unit_stride` has a last stride other than 1, or `lock` is not an int32 tensor of q's device with
    B * HK elements or more. Call `require_triton` first."""
    B, HQ, D = q.shape
    HK = n_kv_heads
    if HQ % HK or D < 16 or D & (D - 1) or any(t.stride(-1) != 1 for t in (q, *unit_stride)):
        raise ValueError(f"unsupported shapes for {what}: q {tuple(q.shape)}, {HK} kv heads"
                         + "".join(f", {tuple(t.shape)}" for t in unit_stride))
    check_lock(lock, B * HK, q.device, what)
    GQ = HQ // HK
    GP = max(16, triton.next_power_of_2(GQ))
    scale = D ** -0.5 if scale is None else scale
    o_acc = torch.empty(B * HK * n_splits * GQ, D, dtype=torch.float32, device=q.device)
    o_m = torch.empty(B * HK * n_splits * GQ, dtype=torch.float32, device=q.device)
    o_l = torch.empty_like(o_m)
    out = torch.empty(B, HQ, D, dtype=q.dtype, device=q.device)
    kernel[(B * HK, n_splits)](*inputs, o_acc, o_m, o_l, out, o_m if lock is None else lock,
                               scale * 1.4426950408889634, *args, out.stride(0), out.stride(1),
                               HK=HK, GQ=GQ, GP=GP, D=D, FUSED=lock is not None, **meta)
    if lock is None:
        _merge_splits[(B * HQ,)](o_acc, o_m, o_l, out, n_splits, out.stride(0), out.stride(1),
                                 HK=HK, GQ=GQ, D=D, BLOCK_S=32, num_warps=4)
    return out


def check_lock(lock: torch.Tensor | None, need: int, device: torch.device, what: str) -> None:
    """Raises ValueError (naming `what`) unless `lock` is None or an int32 tensor on `device` with at least `need`
    elements (the fused merge's counters: one per (batch, kv head))."""
    if lock is not None and (lock.dtype != torch.int32 or lock.device != device or lock.numel() < need):
        raise ValueError(f"{what}: the split lock must be an int32 tensor on {device} with >= {need} counters, got "
                         f"{lock.dtype} on {lock.device} with {lock.numel()}")


def split_lock(n: int, device) -> torch.Tensor:
    """A zeroed int32 buffer of `n` counters on `device` for the fused merge (`lock=` of the decode kernels),
    (B * HK counters for a batch of B rows and HK kv heads). It must outlive the launches that use it (a static
    cache owns one; under CUDA graphs mark its address static)."""
    return torch.zeros(n, dtype=torch.int32, device=device)


def _split_plan(bh: int, nq: int, block_n: int, n_sm: int, per_sm: int = 4) -> tuple[int, int]:
    """(number of splits over `nq` tokens, tokens per split, a multiple of `block_n`): about `per_sm` programs per
    SM over the `bh` (batch, kv head) pairs."""
    blocks = max(1, math.ceil(nq / block_n))
    n = max(1, min(blocks, math.ceil(per_sm * n_sm / max(1, bh))))
    chunk = math.ceil(blocks / n) * block_n
    return math.ceil(max(nq, 1) / chunk), chunk
