"""Quantized KV storage (kvsqueeze.quant): packing, error bounds, bytes held, schemes, composition with eviction."""

import math

import pytest
import torch

from kvsqueeze import CompressedCache
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.methods import H2O, KNorm, MiKV, PrecisionSplit, SnapKV, ZipCacheSaliency, for_storage
from kvsqueeze.runtime.generate import record_prefill
from kvsqueeze.quant import (MixedPrecisionStore, gear, kivi, kivi_bytes_per_token, mikv, parse_quant,
                             zipcache)
from kvsqueeze.quant.gear import compress_part
from kvsqueeze.quant.packing import pack, quantize, unpack
from kvsqueeze.methods.zipcache import probe_indices

from conftest import kv, tiny_llama_d64

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama_d64()


def _nbytes(t):
    return t.numel() * t.element_size()


# --- packing and quantization ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_round_trip_and_size(bits):
    codes = torch.randint(0, 2**bits, (2, 3, 5, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (2, 3, 5, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_along_tokens_round_trip(bits):
    codes = torch.randint(0, 2**bits, (2, 3, 64, 16), dtype=torch.uint8)
    packed = pack(codes, bits, "token")
    assert packed.shape == (2, 3, 64 * bits // 8, 16)
    assert torch.equal(unpack(packed, bits, "token"), codes)


def test_pack_layout_is_little_endian_within_byte():
    codes = torch.tensor([[[[1, 2, 3, 0]]]], dtype=torch.uint8)  # four 2-bit codes -> 0b00_11_10_01
    assert int(pack(codes, 2)[0, 0, 0, 0]) == 0b00111001
    assert int(pack(codes.transpose(-1, -2), 2, "token")[0, 0, 0, 0]) == 0b00111001  # tokens 0..3 of channel 0


@pytest.mark.parametrize("axis,group", [("per_channel", 32), ("per_token", 32), ("per_token", 64)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantization_error_within_half_a_step(axis, group, bits):
    torch.manual_seed(bits)
    x = torch.randn(1, 2, 64, 64) * torch.linspace(0.1, 10, 64)  # very different channel ranges
    q = quantize(x, bits, axis, group)
    err = (q.dequantize() - x).abs()
    # half a step of the stored scale: bf16 zero rounded down (a 2^-7 |min| share), scale rounded up (1 + 2^-7)
    if axis == "per_channel":  # groups: G tokens of one channel
        g = x.view(1, 2, 64 // group, group, 64)
        lo = g.amin(3)
        step = (g.amax(3) - lo + lo.abs() * 2**-7) * (1 + 2**-7) / (2**bits - 1)
        bound = step[:, :, :, None, :].expand_as(g).reshape_as(x)
    else:
        g = x.view(1, 2, 64, 64 // group, group)
        lo = g.amin(-1)
        step = (g.amax(-1) - lo + lo.abs() * 2**-7) * (1 + 2**-7) / (2**bits - 1)
        bound = step[..., None].expand_as(g).reshape_as(x)
    assert bool((err <= bound / 2 + 1e-6).all())


def test_more_bits_less_error_and_per_channel_keys_beat_per_token_on_outlier_channels():
    torch.manual_seed(0)
    k = torch.randn(1, 2, 128, 64)
    k[..., 5] += 40.0  # an outlier channel, as real keys have
    errs = {b: (quantize(k, b, "per_channel", 32).dequantize() - k).pow(2).mean() for b in (2, 4, 8)}
    assert errs[8] < errs[4] < errs[2]
    per_token = (quantize(k, 2, "per_token", 64).dequantize() - k).pow(2).mean()
    assert errs[2] < per_token / 4  # KIVI's point: keys per channel


# --- KIVI layer: residual window, bytes, reference attention -------------------------------------------------------
def test_kivi_residual_window_and_groups():
    layer = kivi(bits=2, group=32, residual=32)()
    k = torch.randn(1, 2, 200, 64)
    layer.update(k, k)
    assert layer.store.n_compressed == 0  # update never quantizes: commit does (after the eviction)
    layer.commit()
    assert layer.store.n_compressed == 160 and layer.store.residual_keys.shape[2] == 40  # 32 <= residual < 64
    for step in range(24):  # decode: the next flush happens when 32 more tokens fell out of the window
        layer.update(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64))
        layer.commit()
        assert 32 <= layer.store.residual_keys.shape[2] < 64
        assert layer.store.n_compressed % 32 == 0
    assert layer.store.n_compressed == 192 and layer.n_stored == 224
    assert layer.positions[0, 0].tolist() == list(range(224))


def test_kivi_bytes_held_equal_formula_and_tensor_sizes():
    b, h, d, n = 1, 2, 64, 1000
    for bits in (2, 4):
        layer = kivi(bits=bits)()
        layer.update(torch.randn(b, h, n, d), torch.randn(b, h, n, d))
        layer.commit()
        nq, nr = layer.store.n_compressed, layer.store.residual_keys.shape[2]
        store = layer.store.segments[0]
        assert _nbytes(store.k.codes) == b * h * nq * d * bits // 8  # really packed (along tokens)
        assert store.k.codes.shape == (b, h, nq * bits // 8, d) and store.v.codes.shape == store.k.codes.shape
        expected = b * h * nq * kivi_bytes_per_token(d, bits) + 2 * b * h * nr * d * 4
        assert layer.kv_nbytes() == expected == sum(_nbytes(t) for t in layer.kv_tensors().values())
    # 2-bit, d = 128, G = 32, fp16 scales: 96 bytes per token and head instead of 512 in fp16
    assert kivi_bytes_per_token(128, 2) == 96 and kivi_bytes_per_token(128, 4) == 160


def test_cache_stats_report_packed_bytes(tiny):
    ids = torch.randint(0, 128, (1, 300))
    cache = CompressedCache(tiny, None, layer_factory=kivi(2))
    with torch.no_grad():
        tiny(ids, **kv(cache))
    st = cache.stats()
    assert st.kv_bytes == sum(layer.kv_nbytes() for layer in cache.layers)
    assert st.total_bytes == sum(_nbytes(t) for layer in cache.layers for t in layer.tensors().values())
    assert st.full_kv_bytes == 2 * 2 * 2 * 300 * 64 * 4  # layers * (k, v) * heads * tokens * d * fp32
    assert st.kv_bytes < st.full_kv_bytes / 4
    assert st.tokens_stored == [300, 300]


@pytest.mark.parametrize("device", DEVICES)
def test_logits_close_to_full_precision_and_ordered_by_bits(tiny, device):
    model = tiny.to(device)
    ids = torch.randint(0, 128, (1, 260), device=device)
    with torch.no_grad():
        ref = model(ids).logits[:, 200:]
        errs = {}
        for name, fac in (("kivi-8", kivi(8)), ("kivi-4", kivi(4)), ("kivi-2", kivi(2)), ("gear-4", gear(4))):
            cache = CompressedCache(model, None, layer_factory=fac)
            model(ids[:, :200], **kv(cache))  # prefill: 160 tokens quantized, 40 residual
            out = model(ids[:, 200:], **kv(cache)).logits
            errs[name] = float((out - ref).abs().max())
    model.to("cpu")
    scale = float(ref.abs().max())
    assert errs["kivi-8"] < 0.01 * scale
    assert errs["kivi-8"] < errs["kivi-4"] < errs["kivi-2"]
    assert errs["gear-4"] < errs["kivi-2"]


def test_greedy_generation_with_8bit_kivi_matches_full(tiny):
    ids = torch.randint(0, 128, (1, 120))
    with torch.no_grad():
        full = tiny.generate(ids, max_new_tokens=12, do_sample=False,
                             **kv(CompressedCache(tiny, None)))
        q8 = tiny.generate(ids, max_new_tokens=12, do_sample=False,
                           **kv(CompressedCache(tiny, None, layer_factory=kivi(8, group=16, residual=16))))
    assert torch.equal(full, q8)


# --- composition with eviction ---------------------------------------------------------------------------------
def _prefill(model, ids, method, fac):
    cache = CompressedCache(model, method, layer_factory=fac)
    with torch.no_grad():
        model(ids, **kv(cache))
    return cache


def test_composition_reduces_bytes_multiplicatively(tiny):
    ids = torch.randint(0, 128, (1, 512))
    fac = kivi(2, group=32, residual=0)  # no residual: every kept token is quantized, the byte shares are exact
    full = _prefill(tiny, ids, None, None).stats().kv_bytes
    evict = _prefill(tiny, ids, SnapKV(compression_ratio=0.75), None).stats().kv_bytes
    quant = _prefill(tiny, ids, None, fac).stats().kv_bytes
    both = _prefill(tiny, ids, SnapKV(compression_ratio=0.75), fac).stats().kv_bytes
    assert evict == full // 4
    assert both == pytest.approx(full * (evict / full) * (quant / full), rel=1e-9)


def test_eviction_picks_in_full_precision_then_quantizes_once(tiny):
    ids = torch.randint(0, 128, (1, 300))
    plain = _prefill(tiny, ids, KNorm(compression_ratio=0.5), None)
    both = _prefill(tiny, ids, KNorm(compression_ratio=0.5), kivi(4, residual=0))
    for lp, lq in zip(plain.layers, both.layers):
        assert torch.equal(lp.positions, lq.positions)  # the same tokens were kept
        assert lq.store.n_compressed == 128  # 150 kept: four groups of 32 quantized, 22 in full precision
        expect = quantize(lp.keys[:, :, :128], 4, "per_channel", 32).dequantize()  # quantized once, from full precision
        assert torch.allclose(lq.keys[:, :, :128], expect, atol=1e-6)
        assert torch.equal(lq.keys[:, :, 128:], lp.keys[:, :, 128:])
        assert lq.n_evicted == lp.n_evicted == 150


def test_record_compress_equals_prefilling_with_the_scheme(tiny):
    ids = torch.randint(0, 128, (1, 300))
    rec = record_prefill(tiny, ids)
    for method, fac in ((SnapKV(compression_ratio=0.5), kivi(2)), (None, gear(4)), (MiKV(inner=SnapKV(compression_ratio=0.5)), mikv(8, 2)),
                        (ZipCacheSaliency(compression_ratio=0.5), zipcache(4, 2))):
        a = rec.compress(tiny, method, fac)
        b = _prefill(tiny, ids, method, fac)
        for la, lb in zip(a.layers, b.layers):
            assert torch.equal(la.positions, lb.positions)
            assert torch.allclose(la.keys, lb.keys, atol=1e-5) and torch.allclose(la.values, lb.values, atol=1e-5)
        assert a.stats().kv_bytes == b.stats().kv_bytes


def test_decode_time_eviction_keeps_storage_consistent(tiny):
    ids = torch.randint(0, 128, (1, 200))
    cache = CompressedCache(tiny, H2O(compression_ratio=0.5, compression_interval=1), layer_factory=kivi(4, group=16, residual=16))
    with torch.no_grad():
        out = tiny.generate(ids, max_new_tokens=20, do_sample=False, **kv(cache))
    assert out.shape[1] == 220
    for layer in cache.layers:
        assert layer.n_stored == 100 and layer.keys.shape[2] == 100
        assert layer.state["h2o_acc"].shape[-1] == 100
        assert layer.store.n_compressed + layer.store.residual_keys.shape[2] == 100


def test_batch_reorder_applies_to_packed_storage():
    layer = kivi(bits=4)()
    layer.update(torch.randn(3, 2, 100, 64), torch.randn(3, 2, 100, 64))
    layer.commit()
    assert layer.store.n_compressed == 64
    before = layer.keys.clone()
    layer.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(layer.keys, before[[2, 0]])


# --- MiKV ----------------------------------------------------------------------------------------------------------
def test_mikv_keeps_evicted_tokens_in_low_precision(tiny):
    ids = torch.randint(0, 128, (1, 300))
    cache = _prefill(tiny, ids, MiKV(inner=H2O(compression_ratio=0.75)), mikv(8, 2))
    evict = _prefill(tiny, ids, H2O(compression_ratio=0.75), None)
    for layer, ev in zip(cache.layers, evict.layers):
        assert isinstance(layer.store, MixedPrecisionStore) and layer.store.balanced_by_queries
        assert layer.n_stored == 300 and layer.n_evicted == 0  # nothing dropped
        n_keep = ev.n_stored  # 75 tokens: the 32 most recent stay full precision, 43 at 8 bits
        assert [s.bits for s in layer.store.segments] == [2, 8]
        assert layer.store.segments[1].n == n_keep - 32 and layer.store.n_low == 300 - n_keep
        # the high-precision slots are exactly the tokens the policy would have kept
        hi = set(layer.positions[0, 0, layer.store.n_low:].tolist())
        assert hi == set(ev.positions[0, 0].tolist())
    with torch.no_grad():  # keeping the rest at 2 bits beats dropping it
        nxt = torch.randint(0, 128, (1, 20))
        ref = tiny(torch.cat([ids, nxt], 1)).logits[:, 300:]
        e_mikv = (tiny(nxt, **kv(cache)).logits - ref).abs().max()
        e_evict = (tiny(nxt, **kv(evict)).logits - ref).abs().max()
    assert e_mikv < e_evict


def test_mikv_balancer_is_sqrt_of_query_over_key_channel_max(tiny):
    ids = torch.randint(0, 128, (1, 100))
    rec = record_prefill(tiny, ids)
    cache = rec.compress(tiny, MiKV(inner=SnapKV(compression_ratio=0.5)), mikv(4, 2))
    layer = cache.layers[1]
    q = rec.queries[1].abs().amax(2).view(1, 2, 2, 64).amax(2)  # per kv head: max over its GQA group
    kmax = rec.cache.layers[1].keys.abs().amax(2)
    beta = (q / kmax).sqrt()
    assert torch.allclose(layer.store.key_scale[:, :, 0].float(), beta, rtol=2e-3)


# --- ZipCache --------------------------------------------------------------------------------------------------------
def test_probe_indices():
    idx = probe_indices(200, 0.05, 0.05, 0, "cpu")
    assert len(idx) == 20 and idx[-10:].tolist() == list(range(190, 200)) and len(set(idx.tolist())) == 20


def test_zipcache_saliency_is_attention_over_number_of_attending_queries(tiny):
    ids = torch.randint(0, 128, (1, 64))
    rec = record_prefill(tiny, ids)
    seen = {}

    class Spy(ZipCacheSaliency):
        def score(self, x):
            s = super().score(x)
            seen[x.layer_idx] = (s, x.queries, x.keys)
            return s

    rec.compress(tiny, Spy(compression_ratio=0.5, probe_recent=1.0, probe_random=0.0), zipcache(4, 2))
    s, q, k = seen[0]
    logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 64**-0.5
    causal = torch.ones(64, 64, dtype=torch.bool).tril()
    a = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)  # (1, 4, 64, 64)
    expected = a.view(1, 2, 2, 64, 64).sum(dim=(2, 3)) / (2 * torch.arange(64, 0, -1))
    assert torch.allclose(s, expected, atol=1e-5)


def test_zipcache_two_precisions_and_channel_separable_scales(tiny):
    ids = torch.randint(0, 128, (1, 300))
    cache = _prefill(tiny, ids, ZipCacheSaliency(compression_ratio=0.5), zipcache(4, 2))
    layer = cache.layers[0]
    assert [s.bits for s in layer.store.segments] == [2, 4] and layer.store.n_low == 150
    assert layer.store.key_scale.shape == (1, 2, 1, 64) and layer.store.value_scale.shape == (1, 2, 1, 64)
    assert layer.store.segments[0].k.scale.shape == (1, 2, 150, 1)  # token-wise: one scale per token
    all_hi = _prefill(tiny, ids, ZipCacheSaliency(compression_ratio=0.0), zipcache(4, 2)).stats().kv_bytes
    all_lo = _prefill(tiny, ids, ZipCacheSaliency(compression_ratio=0.99), zipcache(4, 2)).stats().kv_bytes
    assert all_lo < cache.stats().kv_bytes < all_hi


# --- GEAR ----------------------------------------------------------------------------------------------------------
def test_gear_parts_reduce_error_and_bytes_match_formula():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 128, 64)
    x[..., 3] *= 6
    x[0, 0, 7, 9] = 40.0  # a single outlier entry
    for bits, axis in ((2, "per_channel"), (2, "per_token"), (4, "per_channel")):
        plain = (quantize(x, bits, axis, 32).dequantize() - x).pow(2).mean()
        p = compress_part(x, bits, axis, 32, rank=2, outlier_ratio=0.02)
        err = (p.decode(torch.float32) - x).pow(2).mean()
        assert err < 0.8 * plain
    p = compress_part(x, 2, "per_token", 32, rank=2, outlier_ratio=0.02)
    assert p.out_idx.shape == (1, 2, 128, 1) and p.out_idx.dtype == torch.uint8  # round(0.02 * 64) = 1 per row
    assert p.decode(torch.float32)[0, 0, 7, 9] == 40.0  # kept exactly (in x's dtype)
    expected = (2 * 128 * 64 * 2 // 8 + 2 * 128 * 2 * 2 * 2  # codes + per-token scale/zero (2 groups of 32), bf16
                + 2 * 128 * 2 * 2 + 2 * 64 * 2 * 2  # A (n x r) fp16 + B (d x r) bf16
                + 2 * 128 * 1 * (1 + 4))  # outlier index (uint8) + value (x's dtype: fp32 here)
    assert sum(_nbytes(t) for t in p.tensors().values()) == expected


def test_gear_layer_streams_segments():
    layer = gear(bits=4)()
    layer.update(torch.randn(1, 2, 100, 64), torch.randn(1, 2, 100, 64))
    layer.commit()
    for _ in range(40):
        layer.update(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64))
        layer.commit()
    # prefill: 64 compressed + 36 residual; the residual reaches 64 after 28 steps: one 32-token segment more
    assert [s.n for s in layer.store.segments] == [64, 32] and layer.store.residual_keys.shape[2] == 44
    assert layer.n_stored == 140


# --- CLI spec ----------------------------------------------------------------------------------------------------------
def test_parse_quant():
    assert parse_quant("none") is None
    spec = parse_quant("kivi-2")
    assert spec.layer_factory().store.bits == 2 and for_storage(SnapKV(compression_ratio=0.5), spec).name == "snapkv"
    m = for_storage(SnapKV(compression_ratio=0.75), parse_quant("mikv-8-2"))
    assert isinstance(m, MiKV) and m.compression_ratio == 0.75 and m.inner.name == "snapkv"
    z = parse_quant("zipcache-4-2")
    assert z.layer_factory().store.lo_bits == 2
    # a method given is composed with ZipCache's storage, never replaced by ZipCache's saliency
    composed = for_storage(SnapKV(compression_ratio=0.6), z)
    assert isinstance(composed, PrecisionSplit) and composed.inner.name == "snapkv" and composed.compression_ratio == 0.6
    assert "snapkv" in composed.describe() and "zipcache-4-2" in composed.describe()
    assert isinstance(for_storage(None, z), ZipCacheSaliency)  # no method: ZipCache's own rule
    assert isinstance(for_storage(ZipCacheSaliency(compression_ratio=0.3), z), ZipCacheSaliency)
    for bad in ("kivi-3", "foo-2", "mikv-8", "kivi-x"):
        with pytest.raises(KVSqueezeError):
            parse_quant(bad)


def test_residual_must_be_a_multiple_of_the_group():
    with pytest.raises(ValueError):
        kivi(bits=2, group=32, residual=48)


def test_bytes_per_token_formula_at_8b_shape():
    # Llama-3.1-8B: 32 layers, 8 kv heads, d = 128; fp16 KV = 131072 bytes per token
    fp16 = 32 * 8 * 2 * 128 * 2
    assert fp16 / (32 * 8 * kivi_bytes_per_token(128, 2)) == pytest.approx(512 / 96)
    assert math.isclose(32 * 8 * kivi_bytes_per_token(128, 4), 40960)
