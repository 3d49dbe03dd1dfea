"""KIVI storage in the static decode step (issue 12, item 2): `StaticCompressedCache.from_cache` over a cache whose
layers hold `KIVIStore`s (full cache, or after a prefill eviction) decodes the same greedy tokens with the same
logits as the eager KIVI cache, holds the same codes after the residual is flushed inside the decoded steps,
compiles whole (aot_eager, one graph) and, under Triton's CPU interpreter (TRITON_INTERPRET=1 with triton
installed), runs the fused kernel over the packed buffers with device-side lengths and slot masks.

Small groups (G = R = 8) make the residual flush (R + G tokens -> one packed group) happen every 8 decoded steps."""

import os
import shutil

import pytest
import torch

import kvsqueeze as kq
from kvsqueeze.methods import get_method
from kvsqueeze.quant import kivi
from kvsqueeze.quant.kivi_static import StaticKIVI
from kvsqueeze.runtime.generate import decode_step, prefill
from kvsqueeze.runtime.static import StaticCompressedCache, static_greedy_decode

from conftest import check_compiled_static_step, kv, tiny_llama

TOL = dict(atol=1e-5, rtol=1e-5)
N = 20  # tokens generated: the residual (8..15 tokens after the prefill) is flushed twice or three times
G = 8
CASES = {"full": ("full", {}), "knorm": ("knorm", dict(compression_ratio=0.5)),
         "snapkv": ("snapkv", dict(compression_ratio=0.5, window=8))}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """One torch thread (conftest's `one_thread`)."""


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def _ids(b=1, t=40, seed=0):
    return torch.randint(1, 101, (b, t), generator=torch.Generator().manual_seed(seed))


def _caches(model, case, bits, ids, mask=None, n=2):
    name, kw = CASES[case]
    caches, firsts = [], []
    for _ in range(n):
        c = kq.CompressedCache(model, get_method(name, **kw), layer_factory=kivi(bits, group=G, residual=G))
        if mask is None:
            firsts.append(prefill(model, c, ids))
        else:  # left padding, as generate() prefills: 2D mask, row-relative positions
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad(), c.prefill():
                out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **kv(c), use_cache=True)
            firsts.append(out.logits[:, -1])
        caches.append(c)
    return caches, firsts


@torch.no_grad()
def _eager(model, cache, first, n, position=None):
    tok = first.argmax(-1)
    toks, logits = [tok], []
    for i in range(n - 1):
        if position is None:
            lg = decode_step(model, cache, tok)
        else:
            lg = model(input_ids=tok[:, None], position_ids=(position + i)[:, None], **kv(cache),
                       use_cache=True).logits[:, -1]
        logits.append(lg)
        tok = lg.argmax(-1)
        toks.append(tok)
    return torch.stack(toks, 1).tolist(), logits


def _same_store(static, eager_cache, nq0):
    """The static buffers hold what the eager stores hold: the quantized / residual counts, the prefill's packed
    groups bit for bit, the groups flushed while decoding (quantized from the decoded keys, equal to ~1e-7: a code
    may round the other way) and the residual within float tolerance."""
    s = static.slots
    per = 8 // s.bits
    for i, layer in enumerate(eager_cache.layers):
        st = layer.store
        nq, nr = st.n_compressed, st.residual_keys.shape[2]
        assert (int(s.nq[i]), int(s.nr[i])) == (nq, nr), f"layer {i}"
        seg = st.segments[0]
        p0 = int(nq0[i])
        assert torch.equal(s.kc[i, :, :, :p0 // per], seg.k.codes[:, :, :p0 // per])
        assert torch.equal(s.vs[i, :, :, :p0], seg.v.scale[:, :, :p0])
        for have, want in ((s.kc[i, :, :, :nq // per], seg.k.codes), (s.vc[i, :, :, :nq // per], seg.v.codes)):
            assert float((have != want).float().mean()) < 0.01
        torch.testing.assert_close(s.ks[i, :, :, :nq // G].float(), seg.k.scale.float(), atol=1e-5, rtol=1e-2)
        ring = (int(s.r0[i]) + torch.arange(nr)) % s.res_capacity  # the residual's slots, oldest first
        torch.testing.assert_close(s.kr[i][:, :, ring], st.residual_keys, **TOL)
        torch.testing.assert_close(s.vr[i][:, :, ring], st.residual_values, **TOL)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_static_kivi_equals_eager_kivi(model, case, bits):
    (c1, c2), (f1, f2) = _caches(model, case, bits, _ids())
    ref, ref_logits = _eager(model, c1, f1, N)
    static = StaticCompressedCache.from_cache(c2, N)
    assert isinstance(static.slots, StaticKIVI)
    nq0 = static.slots.nq.clone()
    logits = []
    got = static_greedy_decode(model, static, f2, N, set(), logits_out=logits)
    assert got == ref
    assert len(logits) == len(ref_logits)
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, **TOL)
    assert bool((static.slots.nq > nq0).all())  # the residual was flushed inside the decoded steps
    # each flush moved the residual ring's start by G instead of shifting the tokens (and it wrapped around)
    assert torch.equal(static.slots.r0, (static.slots.nq - nq0) % static.slots.res_capacity)
    _same_store(static, c1, nq0)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor on the CPU needs a C++ compiler")
def test_compiled_step_never_touches_a_whole_residual_buffer():
    """`begin_token` + `write_kv` + `end_token` of `StaticKIVI`, compiled by inductor on the CPU: no generated loop
    runs over a whole residual buffer or the whole slot mask (the flush moves the residual ring's start; shifting
    the residual by G was a select between every layer's buffers and their roll, written back whole, every step;
    `index_copy_` into a layer's view copied that layer's whole residual buffer before each write),
    and the compiled step leaves what the eager one does (packed codes and scales up to a code or scale rounded
    the other way by the fused arithmetic). Layer 0 flushes with its ring wrapped (start 8 of 16), layer 1 does
    not flush."""
    import re

    from torch._inductor.utils import run_and_get_code

    def build():  # 2 layers, 2 rows, 2 kv heads, head_dim 8, G = R = 8: residual buffers of 1024 elements
        s = StaticKIVI(2, 2, 2, 8, 128, 2, 8, 8, 8, torch.float32, "cpu")
        s.nq.copy_(torch.tensor([16, 32]))
        s.nr.copy_(torch.tensor([15, 9]))
        s.r0.copy_(torch.tensor([8, 0]))
        g = torch.Generator().manual_seed(0)
        s.kr.copy_(torch.randn(s.kr.shape, generator=g))
        s.vr.copy_(torch.randn(s.vr.shape, generator=g))
        cq = s.q_capacity
        s.valid[0, ..., :16] = s.valid[1, ..., :32] = True
        s.valid[0, ..., cq + 8:] = s.valid[0, ..., cq:cq + 7] = s.valid[1, ..., cq:cq + 9] = True
        return s

    def step(s, k, v):
        s.begin_token(None)
        s.write_kv(1, k, v)
        s.end_token()
        return s.nq.sum()

    k, v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    eager, comp = build(), build()
    step(eager, k, v)
    torch._dynamo.reset()
    _, code = run_and_get_code(torch.compile(lambda k, v: step(comp, k, v), fullgraph=True), k, v)
    bounds = {int(n) for n in re.findall(r"x0<static_cast<int64_t>\((\d+)L\)", "\n".join(code))}
    assert eager.kr.numel() not in bounds and eager.kr[1].numel() not in bounds, \
        "a compiled step loops over a whole residual buffer (a layer's or all layers')"
    assert eager.valid.numel() not in bounds, "a compiled step loops over the whole slot mask"
    assert eager.nq.tolist() == [24, 32] and eager.nr.tolist() == [8, 10] and eager.r0.tolist() == [0, 0]
    for name in ("kr", "vr", "valid", "nq", "nr", "r0", "w"):
        assert torch.equal(getattr(eager, name), getattr(comp, name)), name
    for name in ("kc", "vc", "ks", "kz", "vs", "vz"):
        assert float((getattr(eager, name) != getattr(comp, name)).float().mean()) < 0.1, name


@pytest.mark.parametrize("bits", [2, 4])
def test_left_padded_batch_masks_the_padding(model, bits):
    ids = _ids(2, 40, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    ids[1, :9] = 0
    (c1, c2), (f1, f2) = _caches(model, "full", bits, ids, mask)
    ref, ref_logits = _eager(model, c1, f1, N, position=mask.sum(-1))
    static = StaticCompressedCache.from_cache(c2, N)
    assert static.slots.masked
    logits = []
    assert static_greedy_decode(model, static, f2, N, set(), logits_out=logits) == ref
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, **TOL)


def test_compiled_fullgraph_equals_uncompiled_one_graph(model):
    (c1, c2), (f1, f2) = _caches(model, "knorm", 2, _ids())
    check_compiled_static_step(model, iter([(c1, f1), (c2, f2)]).__next__, N, TOL, graphs=1)


def test_a_forward_that_drops_the_kivi_buffers_is_refused(model, monkeypatch):
    """The KIVI buffers reach the attention as the forward's keyword argument `kvsqueeze_kivi` (Quest's route); a
    model whose forward did not hand it down would attend over the residual only: the first step says so instead
    (simulated: the step's forward carries no extra keyword arguments). With the keyword, the buffers are read."""
    from kvsqueeze.errors import KVSqueezeError
    from kvsqueeze.runtime.static import KIVI_KW, StaticDecoder

    (c1, c2), (f1, _) = _caches(model, "full", 2, _ids())
    static = StaticCompressedCache.from_cache(c1, N)
    assert KIVI_KW in static.forward_kwargs()
    StaticDecoder(model, static)(f1.argmax(-1))
    dropped = StaticCompressedCache.from_cache(c2, N)
    monkeypatch.setattr(type(dropped), "forward_kwargs", lambda self: {})
    with pytest.raises(KVSqueezeError, match="KIVI storage"):
        StaticDecoder(model, dropped)(f1.argmax(-1))


def test_model_generate_drives_the_static_kivi_cache(model):
    ids = _ids()
    (c1, c2), _ = _caches(model, "full", 2, ids[:, :-1])
    ref = model.generate(ids, **kv(c1), max_new_tokens=N, do_sample=False, pad_token_id=0)
    got = model.generate(ids, **kv(StaticCompressedCache.from_cache(c2, N)), max_new_tokens=N, do_sample=False,
                         pad_token_id=0)
    assert got.tolist() == ref.tolist()
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("bits", [2, 4])
def test_stats_count_packed_bytes_scales_and_residual(model, bits):
    (c,), _ = _caches(model, "full", bits, _ids(), n=1)
    st = StaticCompressedCache.from_cache(c, N)
    s = st.slots
    L, b, h, d = s.n_layers, s.batch, s.kv_heads, s.head_dim
    per_token = 2 * d * bits / 8 + 2 * 2 * d / G + 2 * 2 * d / s.value_group  # codes + bf16 scales and zeros
    residual = 2 * s.res_capacity * d * 4  # fp32 model
    assert st.stats().kv_bytes == L * b * h * (s.q_capacity * per_token + residual)
    # the eager store counts the same tensors: at equal token counts the bytes per quantized token agree
    eager = sum(t.numel() * t.element_size() for k, t in c.layers[0].store.tensors().items() if "residual" not in k)
    assert eager == b * h * c.layers[0].store.n_compressed * per_token
    assert s.q_capacity >= int(s.nq.max()) + N and s.q_capacity % G == 0


def test_decode_time_eviction_over_kivi_is_refused(model):
    c = kq.CompressedCache(model, get_method("knorm", budget=16, compression_interval=1),
                           layer_factory=kivi(2, group=G, residual=G))
    prefill(model, c, _ids())
    with pytest.raises(kq.KVSqueezeError, match="compression_interval.*eager"):
        StaticCompressedCache.from_cache(c, 4)


def _interpreter() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not _interpreter(), reason="Triton's CPU interpreter: TRITON_INTERPRET=1 with triton installed")
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_kernel_under_the_interpreter(model, bits, padded):
    """kernel="triton": the fused split-KV kernel over the packed buffers (lengths read on the device; the slot
    masks where the batch is padded) gives the eager KIVI cache's tokens and logits."""
    ids = _ids(2 if padded else 1, 40, seed=3)
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :9] = 0
        ids[1, :9] = 0
    (c1, c2), (f1, f2) = _caches(model, "full", bits, ids, mask)
    n = 12  # one flush crossed at least (the interpreter is slow: ~1 min per case)
    ref, ref_logits = _eager(model, c1, f1, n, position=None if mask is None else mask.sum(-1))
    static = StaticCompressedCache.from_cache(c2, n)
    assert static.slots.masked == padded
    nq0 = static.slots.nq.clone()
    logits = []
    got = static_greedy_decode(model, static, f2, n, set(), logits_out=logits, kernel="triton")
    assert bool((static.slots.nq > nq0).all())
    assert got == ref
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not _interpreter(), reason="Triton's CPU interpreter: TRITON_INTERPRET=1 with triton installed")
def test_compiled_folded_kernel_under_the_interpreter(monkeypatch):
    """The folded kernel (`kvsqueeze::kivi_decode_folded`, an opaque operator) in the compiled step (fullgraph,
    aot_eager): the eager KIVI cache's tokens and logits. Head dim 64 and groups of 32 (the folded kernel's tl.dot
    shapes); the split kernel cannot be traced under the interpreter, so it has no compiled twin here."""
    from conftest import tiny_llama_d64

    from kvsqueeze.kernels import kivi_decode

    monkeypatch.setattr(kivi_decode, "FOLD", True)
    m = tiny_llama_d64()
    ids = torch.randint(1, 128, (1, 100), generator=torch.Generator().manual_seed(5))
    caches, firsts = [], []
    for _ in range(2):
        c = kq.CompressedCache(m, get_method("full"), layer_factory=kivi(2, group=32, residual=32))
        firsts.append(prefill(m, c, ids))
        caches.append(c)
    n = 8
    ref, ref_logits = _eager(m, caches[0], firsts[0], n)
    static = StaticCompressedCache.from_cache(caches[1], n)
    assert int(static.slots.nq.min()) > 0  # the prefill left quantized groups for the kernel to read
    torch._dynamo.reset()
    logits = []
    got = static_greedy_decode(m, static, firsts[1], n, set(), compile=True, backend="aot_eager", logits_out=logits,
                               kernel="triton")
    assert got == ref
    for x, y in zip(logits, ref_logits):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor on the CPU needs a C++ compiler")
def test_cli_generate_compile_with_kivi(tiny_dir, tmp_path):
    """`generate --compile --quant kivi-2` decodes over `StaticKIVI` in the compiled step: the answer of
    `generate --quant kivi-2` (eager), the same KIVI bytes in the stats line; other --quant schemes with --compile
    are refused in one line (exit 2)."""
    from click.testing import CliRunner

    from conftest import assert_one_error_line, own_cache
    from kvsqueeze.cli import main

    ctx = tmp_path / "ctx.txt"
    ctx.write_text("The grass is green. The sky is blue. " * 20 + "The pass key is 71432. " + "Here we go. " * 10)
    args = ["generate", "--model", str(tiny_dir), "--method", "full", "--context-file", str(ctx), "--question",
            "What is the pass key?", "--max-new-tokens", "24", "--quant", "kivi-2"]
    with own_cache(tmp_path / "cache"):
        eager = CliRunner().invoke(main, args)
        comp = CliRunner().invoke(main, args + ["--compile"])
    assert eager.exit_code == 0 and comp.exit_code == 0, comp.output
    assert comp.output.splitlines()[0] == eager.output.splitlines()[0]  # the same answer
    assert "quant: kivi-2" in comp.output and "step compiled" in comp.output
    kv = [line for line in eager.output.splitlines() if line.startswith("KV memory")]
    assert kv and kv[0] in comp.output  # the prefill's bytes: the same packed cache
    for spec in ("gear-4", "mikv-8-2"):
        assert_one_error_line(args[:-1] + [spec, "--compile"], "decodes full-precision or KIVI caches")
