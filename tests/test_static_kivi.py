"""KIVI storage in the static decode step (issue 12, item 2): `StaticCompressedCache.from_cache` over a cache whose
layers hold `KIVIStore`s (full cache, or after a prefill eviction) decodes the same greedy tokens with the same
logits as the eager KIVI cache, holds the same codes after the residual is flushed inside the decoded steps,
compiles whole (aot_eager, one graph) and, under Triton's CPU interpreter (TRITON_INTERPRET=1 with triton
installed), runs the fused kernel over the packed buffers with device-side lengths and slot masks.

Small groups (G = R = 8) make the residual flush (R + G tokens -> one packed group) happen every 8 decoded steps."""

import os

import pytest
import torch

import kvsqueeze as kq
from kvsqueeze.methods import get_method
from kvsqueeze.quant import kivi
from kvsqueeze.quant.kivi_static import StaticKIVI
from kvsqueeze.quant.packing import unpack
from kvsqueeze.runtime.generate import decode_step, prefill
from kvsqueeze.runtime.static import StaticCompressedCache, static_greedy_decode

from conftest import kv, tiny_llama

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
    for i, layer in enumerate(eager_cache.layers):
        st = layer.store
        nq, nr = st.n_compressed, st.residual_keys.shape[2]
        assert (int(s.nq[i]), int(s.nr[i])) == (nq, nr), f"layer {i}"
        seg = st.segments[0]
        p0 = int(nq0[i])
        kc, vc = s.codes(i)  # the group-aligned buffers unpacked to token order
        ek, ev = unpack(seg.k.codes, s.bits, "token"), unpack(seg.v.codes, s.bits, "token")
        assert torch.equal(kc[:, :, :p0], ek[:, :, :p0]) and torch.equal(vc[:, :, :p0], ev[:, :, :p0])
        assert torch.equal(s.vs[i, :, :, :p0], seg.v.scale[:, :, :p0])
        for have, want in ((kc[:, :, :nq], ek), (vc[:, :, :nq], ev)):
            assert float((have != want).float().mean()) < 0.01
        torch.testing.assert_close(s.ks[i, :, :, :nq // G].float(), seg.k.scale.float(), atol=1e-5, rtol=1e-2)
        torch.testing.assert_close(s.kr[i, :, :, :nr], st.residual_keys, **TOL)


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
    _same_store(static, c1, nq0)


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
    import torch._dynamo
    from torch._dynamo.utils import counters

    (c1, c2), (f1, f2) = _caches(model, "knorm", 2, _ids())
    ref_logits = []
    ref = static_greedy_decode(model, StaticCompressedCache.from_cache(c1, N), f1, N, set(), logits_out=ref_logits)
    torch._dynamo.reset()
    counters.clear()
    logits = []
    got = static_greedy_decode(model, StaticCompressedCache.from_cache(c2, N), f2, N, set(), compile=True,
                               backend="aot_eager", logits_out=logits)
    assert got == ref
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, **TOL)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


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


# --- the group-aligned layout and the fused static kernel (kernels/kivi_decode.kivi_decode_static) ---------------

@pytest.mark.parametrize("bits,group", [(2, 8), (4, 8), (2, 32), (4, 16)])
def test_group_aligned_packing_places_group_j_in_bit_field_j(bits, group):
    """Row r of block k holds token k*BT + r + j*G in bit field j (BT = G * 8 / bits); unpacking inverts packing."""
    from kvsqueeze.quant.kivi_static import pack_group_aligned, unpack_group_aligned

    per, n, d = 8 // bits, 3 * group * (8 // bits), 4
    codes = torch.randint(0, 1 << bits, (2, 3, n, d), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = pack_group_aligned(codes, bits, group)
    assert packed.shape == (2, 3, n // per, d)
    for blk in range(n // (group * per)):
        for r in range(group):
            for j in range(per):
                field = (packed[:, :, blk * group + r] >> (j * bits)) & ((1 << bits) - 1)
                assert torch.equal(field, codes[:, :, blk * group * per + r + j * group])
    assert torch.equal(unpack_group_aligned(packed, bits, group), codes)
    with pytest.raises(ValueError, match="multiple"):
        pack_group_aligned(codes[:, :, :group], bits, group)  # a part of a block


def _eager_store(bits, group, n, b=2, h=2, d=64, seed=0, device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    layer = kivi(bits, group=group, residual=group)()
    k = torch.randn(b, h, n, d, generator=gen)
    k[..., :4] *= 8  # outlier channels, as real keys have
    layer.append(k.to(device, dtype), torch.randn(b, h, n, d, generator=gen).to(device, dtype))
    layer.commit()
    return layer.store


@pytest.mark.parametrize("bits", [2, 4])
def test_loaded_codes_equal_the_eager_codes(bits):
    """`load` repacks the eager store's codes: unpacked, both layouts give the same codes and the same
    dequantized keys / values (the static reference path reads the new layout)."""
    from kvsqueeze.quant.packing import unpack as unpack_tokens

    G = 16
    st = _eager_store(bits, G, 7 * G + 5)  # 6 groups quantized: not a whole number of blocks at 2 bits
    s = StaticKIVI(1, 2, 2, 64, st.n + 2 * G, bits, G, G, G, torch.float32, "cpu")
    s.load(0, st, None)
    seg = st.segments[0]
    nq = seg.n
    assert s.q_capacity % s.block == 0 and int(s.nq[0]) == nq
    kc, vc = s.codes(0)
    assert torch.equal(kc[:, :, :nq], unpack_tokens(seg.k.codes, bits, "token"))
    assert torch.equal(vc[:, :, :nq], unpack_tokens(seg.v.codes, bits, "token"))
    assert not kc[:, :, nq:].any() and not vc[:, :, nq:].any()
    keys, values = s.dequantized(0, torch.float32)
    torch.testing.assert_close(keys[:, :, :nq], seg.keys(torch.float32), atol=0, rtol=0)
    torch.testing.assert_close(values[:, :, :nq], seg.values(torch.float32), atol=0, rtol=0)


def _kernel_device():
    if torch.cuda.is_available():
        try:
            import triton  # noqa: F401
            return "cuda"
        except ImportError:
            return None
    return "cpu" if _interpreter() else None


needs_kernel = pytest.mark.skipif(_kernel_device() is None,
                                  reason="a CUDA GPU with triton, or Triton's CPU interpreter (TRITON_INTERPRET=1)")
VARIANTS = [(kf, vm) for kf in (True, False) for vm in ("fold", "gather", "reshape")]


def _static_from_eager(bits, group, n, dev, masked=False, spare=4, seed=0):
    """StaticKIVI (one layer) loaded from an eager store of n tokens, on `dev` (bf16 residual on CUDA); with
    `masked`, some quantized and residual slots hidden."""
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    st = _eager_store(bits, group, n, seed=seed, device=dev, dtype=dt)
    s = StaticKIVI(1, 2, 2, 64, st.n + spare * group, bits, group, group, group, dt, dev)
    valid = None
    if masked:
        valid = torch.rand(2, 2, st.n, generator=torch.Generator().manual_seed(seed + 1)) > 0.3
        valid[:, :, -1] = True  # one visible slot per (row, kv head) at least
    s.load(0, st, None if valid is None else valid.to(dev))
    return s


def _check_kernel(s, q, tol_cpu=2e-5):
    ref = s.attention(0, q.float(), None, None)  # the reference path in float32 (bf16 buffers on CUDA)
    out = s.attention(0, q, None, "triton").float()
    assert not out.isnan().any()
    if q.device.type == "cuda":
        assert float((out - ref).norm() / ref.norm()) < 1e-2
    else:
        torch.testing.assert_close(out, ref, atol=tol_cpu, rtol=tol_cpu)


@needs_kernel
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("k_fold,v_mode", VARIANTS)
@pytest.mark.parametrize("masked", [False, True])
def test_static_kernel_equals_reference(bits, k_fold, v_mode, masked):
    """Every variant of the fused static kernel equals dequantize + attention (the reference path) over
    group-aligned buffers with a partly filled last block and a residual holding a partial group, with and
    without slot masks, for two block sizes."""
    dev = _kernel_device()
    G = 32
    s = _static_from_eager(bits, G, 9 * G + 7, dev, masked=masked)  # 8 groups quantized, 39 residual tokens
    assert s.masked == masked and int(s.nr[0]) == G + 7
    q = torch.randn(2, 8, 1, 64, generator=torch.Generator().manual_seed(3)).to(dev, s.dtype)
    for block_n in (s.block, 2 * s.block):
        s.kernel_options = dict(k_fold=k_fold, v_mode=v_mode, block_n=block_n)
        _check_kernel(s, q)


@needs_kernel
@pytest.mark.parametrize("bits,group", [(2, 8), (4, 16)])
def test_static_kernel_small_groups(bits, group):
    """Groups below 16 tokens (no `tl.dot`: the broadcast-sum path) and 16-token groups give the reference."""
    dev = _kernel_device()
    s = _static_from_eager(bits, group, 11 * group + 3, dev, masked=True)
    q = torch.randn(2, 8, 1, 64, generator=torch.Generator().manual_seed(4)).to(dev, s.dtype)
    for k_fold, v_mode in ((True, "fold"), (False, "gather")):
        s.kernel_options = dict(k_fold=k_fold, v_mode=v_mode)
        _check_kernel(s, q)


@needs_kernel
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_static_kernel_over_end_token_steps(bits, masked):
    """Decode steps (begin_token, write_kv, the kernel, end_token) through two residual flushes: the kernel equals
    the reference at every step, including the step where the residual is full; each flush writes only its
    group's bit field (the codes of the groups held before are unchanged) and the new group's codes are what
    `quantize` gives for the flushed tokens."""
    from kvsqueeze.quant.packing import PER_CHANNEL, quantize, unpack as unpack_tokens

    dev = _kernel_device()
    G = 16
    s = _static_from_eager(bits, G, 4 * G + G - 2, dev, masked=masked)  # residual R + G - 2: flush after 2 steps
    gen = torch.Generator().manual_seed(5)
    flushes = 0
    for step in range(G + 4):
        nq = int(s.nq[0])
        kc0, vc0 = s.codes(0)
        s.begin_token(torch.zeros(2, dtype=torch.long, device=dev))
        k, v = (torch.randn(2, 2, 1, 64, generator=gen).to(dev, s.dtype) for _ in range(2))
        s.write_kv(0, k, v)
        full = int(s.nr[0]) == s.res_capacity
        oldest = s.kr[0, :, :, :G].clone()
        q = torch.randn(2, 8, 1, 64, generator=gen).to(dev, s.dtype)
        _check_kernel(s, q)
        s.end_token()
        kc1, vc1 = s.codes(0)
        assert torch.equal(kc1[:, :, :nq], kc0[:, :, :nq]) and torch.equal(vc1[:, :, :nq], vc0[:, :, :nq])
        if full:
            flushes += 1
            assert int(s.nq[0]) == nq + G
            want = quantize(oldest, bits, PER_CHANNEL, G, pack_along="token")
            assert torch.equal(kc1[:, :, nq:nq + G], unpack_tokens(want.codes, bits, "token"))
    assert flushes == 2


def test_compiled_group_write_stays_in_place():
    """`end_token`'s read-modify-write of a group's bit field compiles to in-place stores: inductor's code never
    loops over a whole packed code buffer (a scatter_, or a functional copy of the buffer, would), and the
    compiled step equals the eager one (two flushes: the codes, scales and counts)."""
    import re

    from torch._inductor.utils import run_and_get_code

    def _exact(shape, seed):  # values in {0, 3}: every group's scale is 0 or 1, so the codes have no rounding to
        # differ by (inductor's quantize may round a code the other way than eager's: ~1e-7 apart)
        return 3.0 * torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(seed))

    def build():  # kc / vc: 2 layers * 2 kv heads * 24 packed rows * 16 channels = 1536 bytes (no other buffer's size)
        s = StaticKIVI(2, 1, 2, 16, 96, 2, 8, 8, 8, torch.float32, "cpu")
        s.nq.copy_(torch.tensor([24, 40]))
        s.nr.copy_(torch.tensor([14, 15]))
        s.kr.copy_(_exact(s.kr.shape, 2))
        s.vr.copy_(_exact(s.vr.shape, 3))
        s.kc.copy_(torch.randint(0, 256, s.kc.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(4)))
        return s

    eager, comp = build(), build()
    assert comp.kc.numel() == 1536

    def step(s, k, v):
        s.begin_token(torch.zeros(1, dtype=torch.long))
        s.write_kv(0, k, v)
        s.write_kv(1, k, v)
        s.end_token()
        return s.nq.sum()

    torch._dynamo.reset()
    fn = torch.compile(lambda k, v: step(comp, k, v), fullgraph=True)
    for i in range(3):  # layer 0 flushes at the 2nd step, layer 1 at the 1st
        k, v = _exact((1, 2, 1, 16), 10 + i), _exact((1, 2, 1, 16), 20 + i)
        step(eager, k, v)
        if i == 0:
            _, code = run_and_get_code(fn, k, v)
            bounds = [int(n) for n in re.findall(r"x0<static_cast<int64_t>\((\d+)L\)", "\n".join(code))]
            assert 1536 not in bounds, "a compiled write loops over a whole packed code buffer"
        else:
            fn(k, v)
    assert eager.nq.tolist() == [32, 48]
    for name in ("kc", "vc", "ks", "kz", "vs", "vz", "nq", "nr", "valid"):
        assert torch.equal(getattr(eager, name), getattr(comp, name)), name


@needs_kernel
def test_static_kernel_with_nothing_quantized_yet():
    """A context shorter than R + G: every quantized split finds nq = 0 and exits; the residual split alone gives
    the reference."""
    dev = _kernel_device()
    s = _static_from_eager(2, 32, 20, dev)
    assert int(s.nq[0]) == 0 and int(s.nr[0]) == 20
    q = torch.randn(2, 8, 1, 64, generator=torch.Generator().manual_seed(6)).to(dev, s.dtype)
    for k_fold, v_mode in ((True, "gather"), (False, "fold")):
        s.kernel_options = dict(k_fold=k_fold, v_mode=v_mode)
        _check_kernel(s, q)
