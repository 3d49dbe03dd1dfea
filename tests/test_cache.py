"""Invariants of the compressed cache: positions, masks, budgets and bytes."""

import copy

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import kvsqueeze as kq
from kvsqueeze.storage import CompressedLayer
from kvsqueeze.runtime.generate import prefill

from conftest import tiny_gemma3, tiny_llama, kv

# --- a reference: full cache, with the evicted tokens masked out, per layer and kv head ---------------------------
_REF = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Plain eager attention over the full cache, masking keys the compressed run had evicted."""
    g = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(g, dim=1)
    v = value.repeat_interleave(g, dim=1)
    logits = query @ k.transpose(-1, -2) * scaling
    if attention_mask is not None:
        logits = logits + attention_mask[..., : k.shape[-2]]
    kept = _REF["kept"][module.layer_idx]  # ((b, hkv, n_old) positions, valid) before this forward, or None
    n = k.shape[-2]
    if kept is not None:
        q = query.shape[2]
        pos, valid = kept
        allowed = torch.zeros(k.shape[0], key.shape[1], n, dtype=torch.bool)
        allowed.scatter_(2, pos.long(), torch.ones_like(pos, dtype=torch.bool) if valid is None else valid)
        allowed[:, :, n - q :] = True  # this forward's own tokens (causality comes from attention_mask)
        allowed = allowed.repeat_interleave(g, dim=1)[:, :, None, :]
        logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1).to(query.dtype)
    return (probs @ v).transpose(1, 2).contiguous(), probs


AttentionInterface.register("kvsq_test_ref", _reference_attention)
AttentionMaskInterface.register("kvsq_test_ref", eager_mask)


def _run(model, cache, chunks, prefill_chunks):
    """Feed `chunks` (list of (1, q) id tensors); the first `prefill_chunks` inside cache.prefill()."""
    outs, snapshots = [], []
    for i, ids in enumerate(chunks):
        snapshots.append(None if not isinstance(cache, kq.CompressedCache) else {
            li: ((layer.positions.clone(), None if layer.valid is None else layer.valid.clone())
                 if isinstance(layer, CompressedLayer) and layer.is_initialized else None)
            for li, layer in enumerate(cache.layers)})
        with torch.no_grad():
            if i < prefill_chunks and isinstance(cache, kq.CompressedCache):
                with cache.prefill():
                    outs.append(model(ids, **kv(cache)).logits)
            else:
                outs.append(model(ids, **kv(cache)).logits)
    return outs, snapshots


def _chunks(sizes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 101, (1, s), generator=g) for s in sizes]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_compression_is_bit_identical_to_dynamic_cache(attn):
    model = tiny_llama(attn)
    chunks = _chunks([50, 7, 1, 1, 3, 1])
    ref, _ = _run(copy.deepcopy(model), DynamicCache(config=model.config), chunks, 0)
    got, _ = _run(model, kq.CompressedCache(model, None), chunks, 1)
    assert model.config._attn_implementation == attn  # routed through kvsqueeze only during its forwards
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["snapkv", "knorm", "h2o", "pyramidkv", "streaming_llm", "tova", "adakv"])
@pytest.mark.parametrize("prefill_chunks", [1, 3])
def test_eviction_equals_full_attention_with_evicted_tokens_masked(attn, method, prefill_chunks):
    """Chunked prefill with eviction between chunks, then a multi-token chunk and 1-token decode steps."""
    model = tiny_llama(attn)
    sizes = [48, 40, 30][:prefill_chunks] + [6, 1, 1, 1]
    chunks = _chunks(sizes)
    kwargs = {"window": 8} if method in ("snapkv",) else {}
    m = kq.get_method(method, compression_ratio=0.6, **kwargs) if method not in ("pyramidkv", "adakv") else kq.methods.PyramidKV(
        scorer=kq.methods.SnapKV(window=8), compression_ratio=0.6, beta=4) if method == "pyramidkv" else kq.methods.AdaKV(
        scorer=kq.methods.SnapKV(window=8), compression_ratio=0.6)
    cache = kq.CompressedCache(model, m)
    got, snaps = _run(model, cache, chunks, prefill_chunks)
    stored = cache.stats().tokens_stored
    assert all(n < cache.get_seq_length() for n in stored)
    ref_model = copy.deepcopy(model)
    ref_model.set_attn_implementation("kvsq_test_ref")
    dyn = DynamicCache(config=ref_model.config)
    for i, ids in enumerate(chunks):
        _REF["kept"] = snaps[i]
        with torch.no_grad():
            ref = ref_model(ids, **kv(dyn)).logits
        torch.testing.assert_close(got[i], ref, atol=2e-5, rtol=1e-4)


def test_per_layer_budgets_really_differ_and_are_freed():
    model = tiny_llama(layers=4)
    m = kq.methods.PyramidKV(scorer=kq.methods.SnapKV(window=4), compression_ratio=0.5, beta=4)
    cache = kq.CompressedCache(model, m)
    prefill(model, cache, _chunks([200])[0])
    stored = cache.stats().tokens_stored
    assert stored[0] > stored[1] > stored[2] > stored[3]
    assert abs(sum(stored) / len(stored) - 100) <= 2  # mean budget = int(200 * 0.5)
    for n, layer in zip(stored, cache.layers):
        assert layer.keys.shape[-2] == n and layer.values.shape[-2] == n and layer.positions.shape[-1] == n


@pytest.mark.parametrize("kwargs,expected", [({"compression_ratio": 0.75}, 30), ({"budget": 17}, 17)])
def test_tokens_stored_equal_budget_and_bytes_equal_tensors(kwargs, expected):
    model = tiny_llama()
    cache = kq.CompressedCache(model, kq.get_method("snapkv", window=4, **kwargs))
    prefill(model, cache, _chunks([121])[0])
    st = cache.stats()
    assert st.tokens_stored == [expected] * 4
    assert st.tokens_seen == cache.get_seq_length() == 121
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.tensors().values())
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert st.total_bytes == held and st.kv_bytes == kv
    assert st.kv_bytes == 4 * 2 * 1 * 2 * expected * 16 * 4  # layers x (k, v) x batch x heads x n x d x fp32
    assert st.full_kv_bytes == 4 * 2 * 2 * 121 * 16 * 4
    assert st.kept_fraction == pytest.approx(expected / 121)


def test_generate_with_compressed_cache():
    model = tiny_llama()
    ids = _chunks([60])[0]
    ref = copy.deepcopy(model).generate(ids, **kv(DynamicCache()), max_new_tokens=8, do_sample=False)
    full = model.generate(ids, **kv(kq.CompressedCache(model, None)), max_new_tokens=8, do_sample=False)
    assert torch.equal(ref, full)
    # with eviction: generate() equals a hand-written prefill + greedy decode on the same compressed cache
    cache = kq.CompressedCache(model, kq.get_method("knorm", compression_ratio=0.5))
    out = model.generate(ids, **kv(cache), max_new_tokens=8, do_sample=False)
    assert cache.stats().tokens_stored[0] == 30 + 7  # prefill budget, then 7 decoded tokens appended
    cache2 = kq.CompressedCache(model, kq.get_method("knorm", compression_ratio=0.5))
    with torch.no_grad():
        logits = prefill(model, cache2, ids)
        toks = [int(logits.argmax(-1))]
        for _ in range(7):
            toks.append(int(model(torch.tensor([[toks[-1]]]), **kv(cache2)).logits[0, -1].argmax()))
    assert out[0, 60:].tolist() == toks


def test_decode_time_compression_holds_the_budget():
    model = tiny_llama()
    cache = kq.CompressedCache(model, kq.get_method("h2o", budget=20, compression_interval=1))
    prefill(model, cache, _chunks([50])[0])
    with torch.no_grad():
        for t in range(10):
            model(torch.tensor([[t]]), **kv(cache))
            assert cache.stats().tokens_stored == [20] * 4
    assert cache.get_seq_length() == 60
    # every 4 steps: grows between evictions
    cache = kq.CompressedCache(model, kq.get_method("tova", budget=20, compression_interval=4))
    prefill(model, cache, _chunks([50])[0])
    sizes = []
    with torch.no_grad():
        for t in range(8):
            model(torch.tensor([[t]]), **kv(cache))
            sizes.append(cache.stats().tokens_stored[0])
    assert sizes == [21, 22, 23, 20, 21, 22, 23, 20]


def test_gemma3_sliding_layers_are_compressed_inside_their_window():
    model = tiny_gemma3()
    ids = _chunks([40, 5, 1, 1])
    ref, _ = _run(copy.deepcopy(model), DynamicCache(config=model.config), ids, 0)
    got, _ = _run(model, kq.CompressedCache(model, None), ids, 1)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    cache = kq.CompressedCache(model, kq.get_method("knorm", compression_ratio=0.5))
    assert [type(layer) for layer in cache.layers] == [CompressedLayer] * 4
    assert cache.is_sliding == [True, False] * 2
    with torch.no_grad():
        model.generate(ids[0], **kv(cache), max_new_tokens=4, do_sample=False)
    stored = cache.stats().tokens_stored
    assert stored[1] == stored[3] == 20 + 3
    for layer in cache.layers[::2]:  # only what the next query can see (window 8: the last 7 tokens), as many
        inside = (layer.positions >= cache.get_seq_length() - 7).sum(-1)  # slots per head as the fullest head
        assert layer.n_stored <= 7 and layer.n_stored == int(inside.max())


def test_left_padded_batch_matches_single_rows():
    model = tiny_llama()
    a, b = _chunks([40])[0], _chunks([30], seed=5)[0]
    pad = torch.zeros(1, 10, dtype=torch.long)
    ids = torch.cat([a, torch.cat([pad, b], 1)])
    mask = torch.cat([torch.ones(1, 40, dtype=torch.long), torch.cat([pad, torch.ones(1, 30, dtype=torch.long)], 1)])
    with torch.no_grad():
        batch_full = model.generate(ids, attention_mask=mask, **kv(kq.CompressedCache(model, None)),
                                    max_new_tokens=5, do_sample=False)
        row_b = model.generate(b, **kv(kq.CompressedCache(model, None)), max_new_tokens=5, do_sample=False)
        assert batch_full[1, 40:].tolist() == row_b[0, 30:].tolist()
        # compressed: the unpadded row behaves as alone; padding is evicted first in the padded row
        cache = kq.CompressedCache(model, kq.get_method("knorm", budget=25))
        batch = model.generate(ids, attention_mask=mask, **kv(cache), max_new_tokens=5, do_sample=False)
        row_a = model.generate(a, **kv(kq.CompressedCache(model, kq.get_method("knorm", budget=25))),
                               max_new_tokens=5, do_sample=False)
    assert batch[0, 40:].tolist() == row_a[0, 40:].tolist()
    layer = cache.layers[0]
    assert layer.valid is not None and bool(layer.valid[1].all())  # the 10 padding slots were evicted first
    assert int(layer.positions[1].min()) >= 10


def test_unpatched_model_is_refused():
    model = tiny_llama()
    cache = kq.CompressedCache(model, kq.get_method("knorm", compression_ratio=0.5))
    kq.unpatch(model)
    with pytest.raises(kq.KVSqueezeError, match="not routed through kvsqueeze"):
        with torch.no_grad():
            model(_chunks([20])[0], **kv(cache))
            model(_chunks([1])[0], **kv(cache))


def test_prefill_record_serves_every_method():
    from kvsqueeze.runtime.generate import record_prefill

    model = tiny_llama()
    ids, q = _chunks([90, 6])
    with torch.no_grad():
        rec = record_prefill(model, ids)
        for name in ["snapkv", "h2o", "tova", "pyramidkv", "streaming_llm"]:
            c1 = kq.CompressedCache(model, kq.get_method(name, compression_ratio=0.7))
            prefill(model, c1, ids)
            c2 = rec.compress(model, kq.get_method(name, compression_ratio=0.7))
            assert torch.equal(model(q, **kv(c1)).logits, model(q, **kv(c2)).logits)


def test_stats_line_says_larger_when_more_than_the_full_cache_is_held():
    """An offloaded cache holds its host copy plus device frames: more than the full cache, reported as "x larger",
    not as a factor below 1 "smaller"; a compressed one as "x smaller"."""
    from kvsqueeze.storage.stats import CacheStats

    assert "(101.0%, 1.01x larger)" in CacheStats(1010, 1100, 1000, 10).line()
    assert "(25.0%, 4.00x smaller)" in CacheStats(250, 300, 1000, 10).line()
    assert "(100.0%, the full cache's size)" in CacheStats(1000, 1000, 1000, 10).line()
    assert "(99.6%, the full cache's size)" in CacheStats(996, 1000, 1000, 10).line()
    # an offloaded cache says how much of its device part is page frames, whether or not it holds more than the
    # full cache (fresh-user reports, twelfth and thirteenth sessions: KIVI on the host, frames in the model's dtype)
    mib = 1024**2
    larger = CacheStats(1010 * mib, 1100 * mib, 1000 * mib, 10, host_kv_bytes=1000 * mib,
                        frame_kv_bytes=10 * mib).line()
    assert "10.00 MiB of KV on the device (10.00 MiB of it page frames: copies of pages the host tier" in larger
    smaller = CacheStats(300 * mib, 330 * mib, 1000 * mib, 10, host_kv_bytes=100 * mib, frame_kv_bytes=150 * mib)
    assert "200.00 MiB of KV on the device (150.00 MiB of it page frames" in smaller.line()
    assert "page frames not allocated yet" in CacheStats(990, 1100, 1000, 10, host_kv_bytes=900,
                                                         frame_kv_bytes=0).line()
    assert "page frames" not in CacheStats(990, 1100, 1000, 10, host_kv_bytes=900).line()  # a cache without any
    assert "page frames" not in CacheStats(990, 1100, 1000, 10).line()
