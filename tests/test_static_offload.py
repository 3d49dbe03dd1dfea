"""Offloading in the static decode step (issue 13 over issue 12's step): the layers Quest makes sparse keep their
slot buffers in mapped host memory (`storage/mapped.py`) that the step's kernels read in place.

The step is the same code over other memory, so its logits and chosen pages must equal the on-device static step's
exactly (same kernels, same values), uncompiled and compiled, and the compiled step must never synchronise with the
host. On the CPU host memory is the device's memory: the tests there check the plumbing (which layers go to the
host, the byte accounting, the refusals) and the equality; on CUDA (or KVSQUEEZE_TEST_DEVICE=cuda) they also check
that the buffers really are host memory (no device memory allocated for them, writes through the CUDA alias seen
in the pinned tensor).

    PYTHONPATH=$PWD/src python -m pytest -q -p no:cacheprovider tests/test_static_offload.py
"""

import contextlib
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvsqueeze as kq
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.runtime.generate import prefill
from kvsqueeze.runtime.static import StaticCompressedCache, StaticDecoder
from kvsqueeze.selection import AttentionPredictor, PredictorNet, Quest
from kvsqueeze.storage.mapped import map_host, mapped_zeros

from conftest import no_host_sync

DEVICE = os.environ.get("KVSQUEEZE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
CUDA = torch.device(DEVICE).type == "cuda"
cuda_only = pytest.mark.skipif(not CUDA, reason="mapped host memory needs CUDA")
STEPS = 10


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, max_position_embeddings=1024, hidden_size=256, intermediate_size=256,
                      num_hidden_layers=3, num_attention_heads=16, num_key_value_heads=4, head_dim=64)
    dtype = torch.bfloat16 if CUDA else torch.float32
    return LlamaForCausalLM(cfg).eval().to(DEVICE, dtype)


def _feed(prompt=200):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 101, (1, prompt), generator=g).to(DEVICE), \
        torch.randint(0, 101, (STEPS, 1), generator=g).to(DEVICE)


@torch.no_grad()
def _run(model, offload, eager_offload, kernel=None, compiled=False, selector="quest", frames=True, prefetch=False):
    """Teacher-forced logits and layer-2 pages of the static Quest (or AttentionPredictor) step (layer 0 dense;
    budget 64 of ~200 slots)."""
    import torch._dynamo

    ids, feed = _feed()
    sel = Quest(64, dense_layers=(0,)) if selector == "quest" else AttentionPredictor(64, predictor=PredictorNet().init_blend(noise=0.3),
                                                                          dense_layers=(0,))
    cache = kq.CompressedCache(model, None, selector=sel, offload=eager_offload)
    prefill(model, cache, ids)
    static = StaticCompressedCache.from_cache(cache, STEPS, offload=offload, page_frames=frames, prefetch=prefetch)
    torch._dynamo.reset()
    kw = {}
    if compiled:
        kw = dict(compile=True) if CUDA else dict(compile=True, backend="aot_eager")
    dec = StaticDecoder(model, static, kernel=kernel, **kw)
    logits, pages = [], []
    for i, t in enumerate(feed):  # AttentionPredictor's calibration steps (eager, after the step) sync nothing either
        with contextlib.nullcontext() if i < 3 else no_host_sync(DEVICE):  # warm-up: compilation, capture
            logits.append(dec(t)[0].clone())
        pages.append(static.pages.chosen[2].tolist())
    return static, torch.stack(logits), pages


@pytest.mark.parametrize("compiled", [False, True])
def test_prefetch_decodes_the_same_and_fetches_only_the_written_page(compiled):
    """AttentionPredictor's cross-token prefetch in the static step (`from_cache(prefetch=True)`): the next step's
    pages copied during this one. The logits and pages equal the on-device step's exactly; the fetches then find
    the predicted pages resident, so on a step after a non-calibration step each (offloaded layer, row, kv head)
    copies on demand at most the page it writes into; the prefetched pages are counted in the bytes moved."""
    model = _model()
    _, ref, ref_pages = _run(model, None, None, None, compiled, "attention_predictor")
    _, plain, _ = _run(model, "auto", "cpu", None, compiled, "attention_predictor")
    static, got, pages = _run(model, "auto", "cpu", None, compiled, "attention_predictor", prefetch=True)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert pages == ref_pages
    f = static.frames
    assert f.prefetching and static.pages.pred is not None
    pred_bytes = sum(t.numel() * t.element_size() for t in static.pages.pred if t is not None)
    assert pred_bytes > 0 and static.pages.nbytes() == pred_bytes + sum(
        t.numel() * t.element_size() for t in (*static.pages.hist, *static.pages.z) if t is not None)
    o = static.offload_stats()
    n_host, k = 2, static.pages.chosen.shape[-1]  # layers 1 and 2 offloaded; 1 row, 4 kv heads
    assert o["prefetched"] > 0 and o["hits"] > 0
    misses = o["needed"] - o["hits"]
    # on demand: the first step's pages, then at most the written page per (layer, kv head) and step, but after a
    # calibration step (every 5th: `after_step` replaced the row the prediction had used, up to K pages missed)
    calib = sum(1 for i in range(1, STEPS) if i % static.pages.calibration_every == 0)
    assert misses <= n_host * 4 * (k + (STEPS - 1) + calib * k)
    assert misses < n_host * 4 * k * STEPS / 3
    # the pages copied ahead count in the bytes: every page crossed the link once, on demand or ahead
    assert o["pages_per_token"] == pytest.approx((misses + o["prefetched"]) / STEPS)
    torch.testing.assert_close(plain, ref, rtol=0, atol=0)


def test_prefetch_refusals():
    model = _model()
    ids, _ = _feed()
    quest = kq.CompressedCache(model, None, selector=Quest(64, dense_layers=(0,)), offload="cpu")
    prefill(model, quest, ids)
    with pytest.raises(KVSqueezeError, match="prefetch needs AttentionPredictor"):
        StaticCompressedCache.from_cache(quest, STEPS, prefetch=True)  # Quest needs the next query
    ap = kq.CompressedCache(model, None, selector=AttentionPredictor(64, predictor=PredictorNet().init_blend(),
                                                                       dense_layers=(0,)), offload="cpu")
    prefill(model, ap, ids)
    with pytest.raises(KVSqueezeError, match="page frames"):
        StaticCompressedCache.from_cache(ap, STEPS, prefetch=True, page_frames=False)
    with pytest.raises(KVSqueezeError, match="offload"):
        StaticCompressedCache.from_cache(ap, STEPS, prefetch=True, offload=None)


def _kernels():
    out = [None, "matmul"]
    if CUDA:
        out.append("triton")
    return out


@pytest.mark.parametrize("frames", [True, False])
@pytest.mark.parametrize("selector", ["quest", "attention_predictor"])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("kernel", _kernels())
def test_offloaded_static_step_equals_on_device_step(kernel, compiled, selector, frames):
    """Offloaded (device page frames, or every page read in place) equals the on-device step exactly."""
    model = _model()
    ref_static, ref, ref_pages = _run(model, None, None, kernel, compiled, selector)
    static, got, pages = _run(model, "auto", "cpu", kernel, compiled, selector, frames)  # an offloaded eager cache
    o = static.offload_stats()
    per_step = 2 * 1 * 4 * ref_static.pages.chosen.shape[-1]  # host layers x rows x kv heads x pages per step
    assert o["decode_steps"] == STEPS and o["needed"] == per_step * STEPS
    if frames:  # consecutive steps share pages: fewer cross the link than are read
        assert (static.frames is not None) and 0 < o["hits"] < o["needed"] and o["hit_rate"] > 0.3
        # the first step finds the frames empty: after it, the same hits over one step's pages fewer
        assert o["hit_rate_after_first"] == pytest.approx(o["hits"] / (o["needed"] - per_step))
    else:
        assert static.frames is None and o["hits"] == 0 and o["hit_rate"] is None
    # the stats line names the frames' bytes, and says nothing of frames where pages are read in place
    line = static.stats().line()
    assert (f"({static.frames.nbytes() / 2**20:.2f} MiB of it page frames" in line) if frames else \
        ("page frames" not in line)
    assert static.slots.host_layers == {1, 2} and ref_static.slots.host_layers == frozenset()
    assert pages == ref_pages
    assert torch.equal(got, ref)
    if selector != "quest":  # the history rows (from the frames' keys when offloaded) equal the on-device ones
        for a, b in zip(static.pages.hist[1:], ref_static.pages.hist[1:]):
            if CUDA and compiled:  # inductor fuses the gather through the frame ids differently: fp32 rounding
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
            else:
                assert torch.equal(a, b), f"history differs by up to {(a - b).abs().max().item():.3g}"
    if CUDA:  # the sparse layers' buffers are host memory aliased as CUDA tensors, the dense layer's are not
        segments = _device_segments()
        inside = lambda t: any(a <= t.data_ptr() < a + n for a, n in segments)  # noqa: E731
        assert inside(static.slots.keys[0]) and inside(static.slots.values[0])
        assert not any(inside(t) for i in (1, 2) for t in (static.slots.keys[i], static.slots.values[i]))
    # and the selection matters: the same cache without Quest decodes differently
    ids, feed = _feed()
    full = kq.CompressedCache(model, None)
    with torch.no_grad():
        prefill(model, full, ids)
        dense = StaticDecoder(model, StaticCompressedCache.from_cache(full, STEPS), kernel=kernel)
        logits = torch.stack([dense(t)[0].clone() for t in feed])
    assert not torch.allclose(logits.float(), ref.float(), atol=1e-3)


def _device_segments() -> list[tuple[int, int]]:
    """(address, bytes) of the CUDA caching allocator's segments: the device memory torch allocated."""
    return [(seg["address"], seg["total_size"]) for seg in torch.cuda.memory_snapshot()]


def test_offload_accounting_and_conversion_of_an_on_device_cache():
    """`from_cache(..., offload="cpu")` offloads a cache prefilled on the device; the stats split the bytes."""
    model = _model()
    ids, _ = _feed()
    cache = kq.CompressedCache(model, None, selector=Quest(64, dense_layers=(0,)))
    with torch.no_grad():
        prefill(model, cache, ids)
    static = StaticCompressedCache.from_cache(cache, STEPS, offload="cpu")
    s = static.slots
    per_layer = [k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in zip(s.keys, s.values)]
    st = static.stats()
    assert s.host_layers == {1, 2}
    assert st.host_kv_bytes == per_layer[1] + per_layer[2]
    assert st.device_kv_bytes == per_layer[0] + static.frames.nbytes()  # the dense layer and the page frames
    assert static.frames.nbytes() == 2 * 2 * 4 * static.pages.chosen.shape[-1] * 16 * 64 * 4  # 2 host layers, K+V
    inplace = StaticCompressedCache.from_cache(cache, STEPS, offload="cpu", page_frames=False).stats()
    assert inplace.device_kv_bytes == per_layer[0] and inplace.host_kv_bytes == st.host_kv_bytes
    assert "in host memory" in st.line()
    assert StaticCompressedCache.from_cache(cache, STEPS).stats().host_kv_bytes == 0  # "auto": the cache's tier


def test_offload_refusals():
    model = _model()
    ids, _ = _feed()
    plain = kq.CompressedCache(model, None)
    quest = kq.CompressedCache(model, None, selector=Quest(64, dense_layers=(0,)))
    with torch.no_grad():
        prefill(model, plain, ids)
        prefill(model, quest, ids)
    with pytest.raises(KVSqueezeError, match="decode-time selector"):
        StaticCompressedCache.from_cache(plain, STEPS, offload="cpu")
    with pytest.raises(KVSqueezeError, match="disk tier decodes on the eager path"):
        StaticCompressedCache.from_cache(quest, STEPS, offload="disk")
    with pytest.raises(KVSqueezeError, match="offload must be 'auto', 'cpu' or None, got 'gpu'"):
        StaticCompressedCache.from_cache(quest, STEPS, offload="gpu")
    with pytest.raises(KVSqueezeError, match="page_frames must be True, False or a ratio >= 1"):
        StaticCompressedCache.from_cache(quest, STEPS, offload="cpu", page_frames=0.5)


def test_mapped_zeros_off_cuda_is_a_plain_tensor():
    t = mapped_zeros((2, 3), torch.float32, "cpu")
    assert t.device.type == "cpu" and t.shape == (2, 3) and not t.any()


@cuda_only
def test_mapped_memory_is_host_memory_seen_by_cuda_kernels():
    host = torch.zeros(1 << 20, dtype=torch.bfloat16, pin_memory=True)
    alias = map_host(host, DEVICE)
    assert alias.device.type == "cuda" and alias.data_ptr() == host.data_ptr()
    alias[5:9].fill_(3.0)  # a CUDA kernel writing host memory
    torch.cuda.synchronize()
    assert host[5:9].tolist() == [3.0] * 4 and float(host.sum()) == 12.0
    before = torch.cuda.memory_allocated()
    big = mapped_zeros((64, 1 << 20), torch.bfloat16, DEVICE)  # 128 MiB of host memory
    assert torch.cuda.memory_allocated() - before < 1 << 20
    assert float(big[63].float().sum()) == 0.0
    with pytest.raises(ValueError, match="pinned"):
        map_host(torch.zeros(4), DEVICE)


@torch.no_grad()
def test_select_next_names_the_next_steps_pages():
    """`StaticAttentionPredictor.select_next` (called by the prefetch after each sparse layer's attention): the
    pages that layer's select returns at the next step, unless the step was a calibration step (its row is
    replaced after the step, so the next select reads other scores)."""
    model = _model()
    ids, feed = _feed()
    sel = AttentionPredictor(64, predictor=PredictorNet().init_blend(noise=0.3), dense_layers=(0,))
    cache = kq.CompressedCache(model, None, selector=sel, offload="cpu")
    prefill(model, cache, ids)
    static = StaticCompressedCache.from_cache(cache, STEPS, prefetch=True)
    made = {}
    real = static.pages.select_next

    def spy(layer):
        made[layer] = real(layer).clone()
        return made[layer]

    static.pages.select_next = spy
    dec = StaticDecoder(model, static)
    predicted, compared, calibrated = {}, 0, False
    for t in feed:
        dec(t)
        for layer, pages in predicted.items():
            if not calibrated:
                assert torch.equal(static.pages.chosen[layer], pages), layer
                compared += 1
        calibrated = any(static.pages._calib)
        predicted = dict(made)
    assert sorted(made) == [1, 2] and compared >= 2 * (STEPS - 3)
