"""Chunked prefill into a compressed cache at long contexts (issue 12 item 4): what a chunk costs must not grow with
the context beyond its attention over the kept slots.

- `attention.chunk_attention` (a chunk over stored slots, all visible: two mask-free flash calls merged by
  log-sum-exp) equals masked attention, and a chunked prefill through it gives the reference path's logits and
  bytes; no tensor a late chunk builds exceeds the layer's view (the reference builds the keys repeated per query
  head: hq / hk times the view);
- an eviction over a KIVI store copies the quantized groups it leaves whole (no re-quantization of every kept
  token per chunk);
- K-norm over a quantized store ranks old slots by the scores they got as new (re-scored from dequantized 2-bit
  keys, about half the kept slots were replaced by new tokens at every chunk);
- quantize / dequantize in slices equal the whole-tensor results bit for bit;
- bench/gpu_prefill.py --quick runs end to end.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvsqueeze as kq
from kvsqueeze.quant import kivi, packing
from kvsqueeze.quant.base import QuantStore
from kvsqueeze.quant.kivi import KIVIStore
from kvsqueeze.runtime import attention
from kvsqueeze.runtime.generate import prefill

from conftest import kv, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from prefill_chunks import LargestTensor  # noqa: E402  (the bench's own probe: bytes of the largest tensor allocated)


def gqa_llama(layers=2, positions=4096, seed=0):
    """A tiny Llama whose attention is larger than its MLP (8 query / 2 kv heads, head_dim 32, hidden 64): what a
    chunk builds around its attention shows."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=positions,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def reference_switches():
    """Restore kvsqueeze's defaults after a test that switches to the reference paths."""
    yield
    attention.SPLIT_CHUNKS = True
    QuantStore.keep_whole_groups = True
    kq.CompressedCache.hold_static_scores = True


def masked_reference(q, k, v, q_len, scale):
    """sdpa over every slot with the explicit mask (old slots visible, the chunk causal) and the keys repeated."""
    n = k.shape[2]
    rep = q.shape[1] // k.shape[1]
    mask = torch.ones(q_len, n, dtype=torch.bool).tril(diagonal=n - q_len)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("rep,n_old,q_len", [(1, 5, 7), (4, 37, 13), (2, 300, 64)])
def test_chunk_attention_equals_masked_attention(rep, n_old, q_len):
    g = torch.Generator().manual_seed(rep * 1000 + n_old)
    b, hk, d = 2, 2, 16
    q = torch.randn(b, hk * rep, q_len, d, generator=g)
    k = torch.randn(b, hk, n_old + q_len, d, generator=g) * 2
    v = torch.randn(b, hk, n_old + q_len, d, generator=g)
    out = attention.chunk_attention(q, k, v, q_len, 0.3)
    assert out.shape == (b, q_len, hk * rep, d)
    torch.testing.assert_close(out, masked_reference(q, k, v, q_len, 0.3), atol=2e-6, rtol=1e-5)
    # query heads laid out head-major (b, hq, q, d) but stored transposed, as the model hands them over
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(attention.chunk_attention(qt, k, v, q_len, 0.3), out)


def test_chunk_attention_bf16_close():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 8, 32, 64, generator=g).bfloat16()
    k = torch.randn(1, 2, 160, 64, generator=g).bfloat16()
    v = torch.randn(1, 2, 160, 64, generator=g).bfloat16()
    out = attention.chunk_attention(q, k, v, 32, 0.125)
    ref = masked_reference(q.float(), k.float(), v.float(), 32, 0.125)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


CASES = [("full", None), ("knorm", None), ("snapkv", None), ("knorm", "kivi2"), ("streaming_llm", None)]


def _cache(model, name, storage, ratio=0.875):
    kw = {"window": 8} if name == "snapkv" else {}  # its window below the budget: older slots are chosen
    method = None if name == "full" else kq.get_method(name, compression_ratio=ratio, **kw)
    return kq.CompressedCache(model, method, layer_factory=kivi(2) if storage == "kivi2" else None)


@pytest.mark.parametrize("name,storage", CASES)
def test_split_chunks_give_the_reference_logits_and_bytes(name, storage, reference_switches):
    """The split attention of a chunk is exact: logits and bytes held as through the model's masked kernel."""
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 101, (1, 400), generator=torch.Generator().manual_seed(1))
    out = {}
    for split in (False, True):
        attention.SPLIT_CHUNKS = split
        calls = []
        inner = attention.chunk_attention
        attention.chunk_attention = lambda *a, **k: calls.append(1) or inner(*a, **k)
        try:
            cache = _cache(model, name, storage)
            out[split] = (prefill(model, cache, ids, 48), cache.stats().kv_bytes, cache.layers[0].positions)
        finally:
            attention.chunk_attention = inner
        # the split path runs when switched on, once an eviction ran (a full cache keeps transformers' own path)
        assert bool(calls) == (split and name != "full")
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=1e-5)
    assert out[True][1] == out[False][1]
    assert torch.equal(out[True][2], out[False][2])


def test_split_chunks_leave_padded_batches_to_the_masked_path():
    """Left padding in a chunk: the masked path runs (the split needs every slot visible); decoding after it."""
    model = tiny_llama(layers=2)
    calls = []
    inner = attention.chunk_attention
    attention.chunk_attention = lambda *a, **k: calls.append(1) or inner(*a, **k)
    try:
        ids = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(2))
        mask = torch.ones(2, 40, dtype=torch.long)
        mask[1, :7] = 0
        cache = _cache(model, "knorm", None, 0.5)
        with torch.no_grad():
            model(input_ids=ids[:, :20], attention_mask=mask[:, :20], **kv(cache))
            model(input_ids=ids[:, 20:], attention_mask=mask, **kv(cache))
    finally:
        attention.chunk_attention = inner
    assert not calls


@pytest.mark.parametrize("storage", [None, "kivi2"])
def test_a_late_chunk_builds_nothing_larger_than_the_layer_view(storage, reference_switches):
    """The largest tensor of a late chunk is at most a layer's view (keys of every stored slot and the chunk): the
    attention reads that much anyway. The reference builds the keys repeated per query head (4x the view here)."""
    model = gqa_llama()
    chunk, length = 32, 2048
    ids = torch.randint(0, 101, (1, length), generator=torch.Generator().manual_seed(4))
    largest = {}
    for split in (False, True):
        attention.SPLIT_CHUNKS = split
        QuantStore.keep_whole_groups = split
        cache = _cache(model, "knorm", storage)
        with torch.no_grad(), cache.prefill():
            for s in range(0, length - chunk, chunk):
                model(input_ids=ids[:, s:s + chunk], **kv(cache), use_cache=True, logits_to_keep=1)
            n_view = cache.layers[0].n_stored + chunk
            with LargestTensor() as watch:
                model(input_ids=ids[:, length - chunk:], **kv(cache), use_cache=True, logits_to_keep=1)
        largest[split] = watch.bytes
        view_bytes = n_view * 2 * 32 * 4  # slots x kv heads x head_dim x float32
    assert largest[True] <= view_bytes
    assert largest[False] >= 4 * n_view * 32 * 4 * 2 > view_bytes  # the reference: keys for 8 query heads


def _kivi_layer(n, seed=0, residual=32):
    layer = kivi(2, residual=residual)()
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(1, 2, n, 16, generator=g), torch.randn(1, 2, n, 16, generator=g)
    layer.update(k, v)
    layer.commit()
    return layer


def _count_quantized(monkeypatch):
    counts = []
    compress = KIVIStore._compress

    def counting(self, k, v):
        counts.append(k.shape[-2])
        return compress(self, k, v)

    monkeypatch.setattr(KIVIStore, "_compress", counting)
    return counts


def test_an_eviction_copies_the_quantized_groups_it_leaves_whole(monkeypatch):
    """256 slots (7 groups of 32 quantized, 32 residual). Head 0 drops slots of groups 2 and 6, head 1 of groups 0
    and 5: each keeps 5 groups whole, which lead its slots in order and are copied (codes and scales: they read
    back bit for bit); only the broken groups' survivors and the residual (92 slots) wait to be re-quantized, of
    which commit() quantizes one group (the residual window keeps 32..63)."""
    layer = _kivi_layer(256)
    store = layer.store
    assert store.n_compressed == 224
    before_k, before_v = (t.clone() for t in layer.store.view())
    scores = torch.ones(1, 2, 256)
    scores[0, 0, [70, 71, 90, 200]] = 0
    scores[0, 1, [3, 4, 5, 170]] = 0
    counts = _count_quantized(monkeypatch)
    layer.evict(scores, 252, reorder=True)
    assert layer.n_stored == 252
    pos = layer.positions.long()[0]
    whole = {0: [0, 1, 3, 4, 5], 1: [1, 2, 3, 4, 6]}  # the quantized groups each head keeps whole
    for h in range(2):
        assert torch.equal(pos[h, :160], torch.cat([torch.arange(32 * g, 32 * g + 32) for g in whole[h]]))
        rest = pos[h, 160:]
        assert torch.equal(rest, rest.sort().values)  # the others follow in position order
    assert store.n_compressed == 160
    k, v = store.view()
    for h in range(2):  # nothing re-quantized: every kept slot reads as before
        assert torch.equal(k[0, h], before_k[0, h, pos[h]])
        assert torch.equal(v[0, h], before_v[0, h, pos[h]])
    assert counts == []
    layer.commit()
    assert counts == [32] and store.n_compressed == 192
    k2, v2 = store.view()
    assert torch.equal(k2[:, :, :160], k[:, :, :160]) and torch.equal(v2[:, :, :160], v[:, :, :160])


def test_without_whole_groups_every_kept_slot_is_requantized(monkeypatch, reference_switches):
    """One slot of group 3 evicted in both heads: with whole groups kept, groups 0-2 and 4-6 are copied and nothing
    is quantized (the 63 others stay the residual); the reference (`keep_whole_groups = False`) re-quantizes six
    groups of kept slots."""
    counts = {}
    for whole in (True, False):
        QuantStore.keep_whole_groups = whole
        layer = _kivi_layer(256)
        scores = torch.ones(1, 2, 256)
        scores[0, :, 100] = 0
        counts[whole] = _count_quantized(monkeypatch)
        layer.evict(scores, 255, reorder=True)
        layer.commit()
        assert layer.store.n_compressed == 192
        monkeypatch.undo()
    assert counts[True] == [] and counts[False] == [192]


def test_knorm_over_kivi_keeps_the_slots_knorm_keeps_over_full_precision(reference_switches):
    """K-norm's rule is the key's norm as the model wrote it: over KIVI-2 storage a chunked prefill keeps the same
    positions as over full precision (old slots keep the scores they got as new). Re-scored from dequantized keys
    (the reference), the old slots' norms grow by the quantization error and many are lost to newer tokens."""
    model = gqa_llama(layers=1)
    ids = torch.randint(0, 101, (1, 1536), generator=torch.Generator().manual_seed(5))

    def kept(storage):
        cache = _cache(model, "knorm", storage)
        prefill(model, cache, ids, 128)
        return cache.layers[0].positions.sort(-1).values

    dense = kept(None)
    assert torch.equal(kept("kivi2"), dense)
    kq.CompressedCache.hold_static_scores = False
    rescored = kept("kivi2")
    same = (rescored[..., :, None] == dense[..., None, :]).any(-1).float().mean()
    assert same < 0.9  # re-scoring dequantized keys drops slots full precision keeps


def test_knorm_kivi_chunked_prefill_close_to_the_reference(reference_switches):
    """Guard: with K-norm's scores held as before (re-scored), the split attention and the whole-group copies
    change K-norm + KIVI-2's chunked prefill only by regrouping: the same bytes held, logits within a small share
    of what 2-bit storage itself changes."""
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 101, (1, 960), generator=torch.Generator().manual_seed(6))
    kq.CompressedCache.hold_static_scores = False
    runs = {}
    for new in (False, True):
        attention.SPLIT_CHUNKS = new
        QuantStore.keep_whole_groups = new
        cache = _cache(model, "knorm", "kivi2", 0.5)
        runs[new] = (prefill(model, cache, ids, 64), cache.stats().kv_bytes)
    dense = prefill(model, _cache(model, "knorm", None, 0.5), ids, 64)
    assert runs[True][1] == runs[False][1]
    change = (runs[True][0] - runs[False][0]).abs().max()
    quant_effect = (runs[False][0] - dense).abs().max()
    assert change <= 0.25 * quant_effect


@pytest.mark.parametrize("axis,along", [(packing.PER_CHANNEL, "token"), (packing.PER_TOKEN, "token"),
                                        (packing.PER_TOKEN, "channel"), (packing.PER_CHANNEL, "channel")])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_sliced_quantize_and_dequantize_equal_the_whole(axis, along, bits, monkeypatch):
    x = torch.randn(2, 3, 512, 64, generator=torch.Generator().manual_seed(bits)) * 3
    whole = packing.quantize(x, bits, axis, 32, along)
    ref = whole.dequantize(torch.bfloat16)
    monkeypatch.setattr(packing, "SLICE_ELEMENTS", 2 * 3 * 64 * 40)  # slices of 32..128 tokens
    sliced = packing.quantize(x, bits, axis, 32, along)
    for f in ("codes", "scale", "zero"):
        assert torch.equal(getattr(sliced, f), getattr(whole, f))
    assert torch.equal(sliced.dequantize(torch.bfloat16), ref)
    assert torch.equal(whole.dequantize(torch.bfloat16), ref)


def test_gpu_prefill_quick(tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_prefill.py"), "--quick", "--no-progress",
                        "--decode", "2", "--report-every", "4", "--json", str(out)], capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    names = ["kvsq:knorm", "kvsq:knorm+kivi2", "kvsq:snapkv", "kvsq:full", "hf-dynamic"]
    assert [(d["context"], d["row"]) for d in rows] == [(n, name) for n in (512, 1024) for name in names]
    for d in rows:
        assert "error" not in d, d
        if d["context"] == 1024 and d["row"] in ("kvsq:full", "hf-dynamic"):
            assert "skipped" in d  # the pretend device of --quick holds a full cache of 768 tokens
            continue
        assert d["seconds"] > 0 and d["ms_per_1k"] > 0 and d["ms_per_1k_last10"] > 0 and d["chunks"] == d["context"] // 64
        assert d["decode_ms"] > 0 and d["decode_steps"] == 2  # --decode: tokens decoded after the prefill
    by = {(d["context"], d["row"]): d for d in rows}
    assert by[(512, "kvsq:knorm+kivi2")]["kv_bytes"] < by[(512, "kvsq:knorm")]["kv_bytes"] < \
        by[(512, "kvsq:full")]["kv_bytes"] / 4
    assert "overhead_vs_full" in by[(512, "kvsq:snapkv")]
    assert "scoring overhead at 512" in r.stdout
    assert "kvsq:knorm+kivi2: 256 of 512 tokens in" in r.stdout  # --report-every 4 (chunks of 64)


def test_gpu_prefill_decode_static_decodes_the_eager_tokens(tmp_path):
    """--decode-static: the compiled static step over the prefilled cache decodes the tokens the eager step does
    (--quick: float32, aot_eager), for a compressed and a quantized row."""
    got = {}
    for mode in ("eager", "static"):
        out = tmp_path / f"{mode}.json"
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_prefill.py"), "--quick", "--no-progress",
                            "--no-warmup", "--lengths", "512", "--rows", "kvsq:knorm,kvsq:knorm+kivi2", "--decode", "4",
                            "--json", str(out)] + (["--decode-static"] if mode == "static" else []),
                           capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        got[mode] = {d["row"]: d for d in json.loads(out.read_text())["rows"]}
    for row in ("kvsq:knorm", "kvsq:knorm+kivi2"):
        assert got["static"][row]["decode_static"] and not got["eager"][row]["decode_static"]
        assert len(got["eager"][row]["decode_tokens"]) == 4
        assert got["static"][row]["decode_tokens"] == got["eager"][row]["decode_tokens"], row


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_chunk_attention_cuda_bf16():
    """On the GPU (torch's flash kernel and its log-sum-exp): equal to masked attention within bf16 tolerance, at
    8B's head shapes."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, 512, 128, device="cuda", generator=g).bfloat16()
    k = torch.randn(1, 8, 4096 + 512, 128, device="cuda", generator=g).bfloat16()
    v = torch.randn(1, 8, 4096 + 512, 128, device="cuda", generator=g).bfloat16()
    assert attention._split_supported(q)
    out = attention.chunk_attention(q, k, v, 512, 128 ** -0.5)
    n = k.shape[2]
    mask = torch.ones(512, n, dtype=torch.bool, device="cuda").tril(diagonal=n - 512)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(4, 1), v.float().repeat_interleave(4, 1), attn_mask=mask,
        scale=128 ** -0.5).transpose(1, 2)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("storage", [None, "kivi2"])
def test_split_chunks_cuda_logits(storage, reference_switches):
    """On the GPU in bf16: a chunked prefill through the split attention gives the masked path's logits within
    bf16 tolerance and the same bytes."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 512, (1, 4096), device="cuda")
    out = {}
    for split in (False, True):
        attention.SPLIT_CHUNKS = split
        cache = _cache(model, "knorm", storage)
        out[split] = (prefill(model, cache, ids, 512).float(), cache.stats().kv_bytes)
    assert out[True][1] == out[False][1]
    torch.testing.assert_close(out[True][0], out[False][0], atol=5e-2, rtol=5e-2)
