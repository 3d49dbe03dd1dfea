"""The fused KIVI decode kernels over the static step's buffers (`kivi_decode_static`): the split kernel and the
folded one (`_kivi_decode_folded`: scales folded into the matrix products, codes never dequantized) against
dequantization in torch and softmax attention, on raw buffers (codes, scales, zeros, residual, lengths, masks).
Runs on CUDA, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1)."""

import os

import pytest
import torch

from kvsqueeze.kernels.split_kv import triton

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
kernel_runs = pytest.mark.skipif(triton is None or (not CUDA and os.environ.get("TRITON_INTERPRET") != "1"),
                                 reason="needs triton (not in the CPU venv), and CUDA or TRITON_INTERPRET=1")
needs_triton = pytest.mark.skipif(triton is None, reason="needs triton (not in the CPU venv)")


def _buffers(seed, B, HK, cq, nr_max, D, bits, G, GV):
    g = torch.Generator().manual_seed(seed)
    per = 8 // bits
    codes_k = torch.randint(0, 1 << bits, (B, HK, cq, D), generator=g)
    codes_v = torch.randint(0, 1 << bits, (B, HK, cq, D), generator=g)

    def pack(c):  # along tokens: packed row r holds tokens per * r + j at bits j * bits
        c = c.view(B, HK, cq // per, per, D)
        return sum(c[:, :, :, j] << (j * bits) for j in range(per)).to(torch.uint8)

    ks = (torch.rand(B, HK, cq // G, D, generator=g) + 0.1).bfloat16()
    kz = torch.randn(B, HK, cq // G, D, generator=g).bfloat16()
    ks[..., :4] *= 8  # outlier key channels
    vs = (torch.rand(B, HK, cq, D // GV, generator=g) * 0.5 + 0.05).bfloat16()
    vz = torch.randn(B, HK, cq, D // GV, generator=g).bfloat16()
    kr = torch.randn(B, HK, nr_max, D, generator=g).bfloat16()
    vr = torch.randn(B, HK, nr_max, D, generator=g).bfloat16()
    k = codes_k * ks.float().repeat_interleave(G, 2) + kz.float().repeat_interleave(G, 2)
    v = codes_v * vs.float().repeat_interleave(GV, 3) + vz.float().repeat_interleave(GV, 3)
    return (pack(codes_k), ks, kz, pack(codes_v), vs, vz, kr, vr), (k, v)


def _reference(q, k, v, kr, vr, nq, nr, qv, rv):
    B, HQ, D = q.shape
    HK = k.shape[1]
    keys = torch.cat([k[:, :, :nq], kr[:, :, :nr].float()], 2).repeat_interleave(HQ // HK, 1)
    vals = torch.cat([v[:, :, :nq], vr[:, :, :nr].float()], 2).repeat_interleave(HQ // HK, 1)
    logits = torch.einsum("bhd,bhnd->bhn", q.float(), keys) * D ** -0.5
    if qv is not None:
        seen = torch.cat([qv[:, :, :nq], rv[:, :, :nr]], 2).repeat_interleave(HQ // HK, 1)
        logits = logits.masked_fill(~seen, float("-inf"))
    return torch.einsum("bhn,bhnd->bhd", logits.softmax(-1), vals)


@kernel_runs
@pytest.mark.parametrize("hq,hk,bits,G,GV,nq,masked", [
    (32, 8, 2, 32, 32, 416, False),  # Llama-3.1-8B's group (4 queries per kv head), KIVI-2's default groups
    (9, 3, 2, 32, 32, 160, True),  # SmolLM2's group of 3 (padded to 4 stacked rows), hidden slots
    (8, 8, 4, 32, 32, 192, False),  # one query per kv head, 4 bits
    (4, 2, 2, 64, 16, 320, False),  # one key group per half block, value groups of 16 channels
])
@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("r0", [0, 40])
def test_static_kernels_equal_dequantized_attention(hq, hk, bits, G, GV, nq, masked, fold, r0):
    """r0: the residual ring's start (`StaticKIVI`): residual token j in slot (r0 + j) mod 48; at 40 the 37 tokens
    wrap around the buffer's end."""
    from kvsqueeze.kernels.kivi_decode import kivi_decode_static

    B, D, cq, nr_max, nr = 2, 64, 512, 48, 37
    bufs, (k, v) = _buffers(hq + nq, B, hk, cq, nr_max, D, bits, G, GV)
    q = torch.randn(B, hq, D, generator=torch.Generator().manual_seed(nq)).bfloat16()
    qv = rv = None
    if masked:
        qv = torch.rand(B, hk, cq, generator=torch.Generator().manual_seed(1)) > 0.3
        rv = torch.ones(B, hk, nr_max, dtype=torch.bool)
        rv[1, :, :5] = False
    ref = _reference(q, k, v, bufs[6], bufs[7], nq, nr, qv, rv)
    n = lambda x: torch.tensor([x], device=DEV)  # noqa: E731
    bufs = (*bufs[:6], bufs[6].roll(r0, 2), bufs[7].roll(r0, 2))  # the residual as a ring starting at slot r0
    rv = None if rv is None else rv.roll(r0, 2)
    out = kivi_decode_static(q.to(DEV), *(t.to(DEV) for t in bufs), n(nq), n(nr), bits, G, GV,
                             q_valid=None if qv is None else qv.to(DEV), r_valid=None if rv is None else rv.to(DEV),
                             fold=fold, r0=n(r0))
    assert out.shape == (B, hq, D)
    err = float((out.float().cpu() - ref).norm() / ref.norm())
    # the output is rounded to bf16 (2^-9); on CUDA the tl.dot operands too (the interpreter multiplies in fp32)
    assert err < (2e-2 if CUDA else 6e-3), err


@needs_triton
def test_folded_kernel_refuses_value_groups_below_16():
    from kvsqueeze.kernels.kivi_decode import _variant

    with pytest.raises(ValueError, match="value groups"):
        _variant(True, 4, 32, 8, 128, 2)
    assert _variant(True, 4, 32, 32, 128, 2)[1]["GQP"] == 4
    assert _variant(True, 1, 32, 32, 128, 2)[1]["GQP"] == 4  # 4 groups x 4 rows: the 16 rows of a tl.dot
    assert _variant(True, 3, 128, 32, 128, 2)[1]["GQP"] == 16
    with pytest.raises(ValueError, match="2 or 4 bits"):
        _variant(True, 4, 32, 32, 128, 8)


@needs_triton
def test_default_kernel_falls_back_where_the_folded_one_does_not_apply(monkeypatch):
    from kvsqueeze.kernels import kivi_decode

    monkeypatch.setattr(kivi_decode, "FOLD", True)
    folded = kivi_decode._variant(True, 4, 32, 32, 128, 2)[0]
    assert kivi_decode._variant(None, 4, 32, 32, 128, 2)[0] is folded
    for args in [(4, 32, 32, 64, 8), (4, 32, 8, 128, 2)]:  # 8 bits; value groups of 8 channels
        assert kivi_decode._variant(None, *args)[0] is not folded
    monkeypatch.setattr(kivi_decode, "FOLD", False)
    assert kivi_decode._variant(None, 4, 32, 32, 128, 2)[0] is not folded


_COMPILE = """
import sys
from triton import compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton.language as tl
from kvsqueeze.kernels import kivi_decode as K

fn = getattr(K, sys.argv[1])
sig = {n: "*bf16" for n in ["Q", "KS", "KZ", "VS", "VZ", "KR", "VR", "QM", "RM"]}
sig.update({"KC": "*u8", "VC": "*u8", "O_ACC": "*fp32", "O_M": "*fp32", "O_L": "*fp32", "qk_scale": "fp64",
            "NQ": "*i64", "NR": "*i64", "R0": "*i64", "RC": "i32", "CHUNK": "i32"})
sig.update({n: "i32" for n in fn.arg_names if n.startswith("s_")})
consts = dict(HK=8, GQ=4, GP=16, D=128, BITS=2, G=32, GV=32, BLOCK_N=128, BLOCK_R=64, DT=tl.bfloat16,
              DEV_LENS=True, HAS_MASK=False, GQP=4, ASM=True, SCALE_LOADS=False)
consts = {k: v for k, v in consts.items() if k in fn.arg_names}
sig = {k: v for k, v in sig.items() if k in fn.arg_names}
sig.update({name: "constexpr" for name in consts})
k = compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
            options={"num_warps": 4})
print("cubin", len(k.asm["cubin"]))
"""


@needs_triton
@pytest.mark.parametrize("kernel", ["_kivi_decode_split", "_kivi_decode_folded"])
def test_kernels_compile_for_sm90_with_a_float64_scale(kernel):
    """Both KIVI kernels through Triton's whole compiler for sm_90 (no GPU needed; a subprocess without
    TRITON_INTERPRET), with qk_scale typed float64 as torch.compile's wrapper of user-defined kernels passes a
    Python float: the softmax must stay in float32 (the folded kernel's batched tl.dot with an accumulator failed
    to compile in the sixteenth session's compiled step)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", _COMPILE, kernel], capture_output=True, text=True, env=env,
                       timeout=600)
    if r.returncode != 0 and ("ImportError" in r.stderr or "ModuleNotFoundError" in r.stderr):
        pytest.skip(f"this triton cannot compile for sm_90 here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[1]) > 0
