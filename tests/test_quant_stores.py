"""Quantized storage as KV stores (issue 10): quantize once, one dequantization per forward, offload keeps the
packed form, mixed precision splits (and `keep` really evicts), a method given with --quant zipcache is composed."""

import importlib

import pytest
import torch
from click.testing import CliRunner

from kvsqueeze import CompressedCache
from kvsqueeze.methods import KNorm, MiKV, PrecisionSplit, SnapKV, ZipCacheSaliency, for_storage, get_method
from kvsqueeze.quant import KIVIStore, MixedPrecisionStore, kivi, mikv, parse_quant, zipcache
from kvsqueeze.quant.packing import QTensor
from kvsqueeze.storage import CompressedLayer

from conftest import kv, save_tiny_llama_with_smollm2_tokenizer, tiny_llama_d64


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama_d64()


def _prefill(model, ids, method, factory):
    cache = CompressedCache(model, method, layer_factory=factory)
    with torch.no_grad():
        model(ids, **kv(cache))
    return cache


def test_a_quantized_layer_is_a_plain_compressed_layer_with_a_quantized_store():
    layer = kivi(2)()
    assert type(layer) is CompressedLayer and isinstance(layer.store, KIVIStore) and layer.store.bits == 2
    assert not KIVIStore.ragged_heads
    import kvsqueeze.quant as q

    assert not hasattr(q, "QuantizedLayer")  # transformers' QuantizedLayer has another contract


def test_prefill_with_eviction_quantizes_only_the_kept_tokens_once(tiny, monkeypatch):
    kivi_mod = importlib.import_module("kvsqueeze.quant.kivi")  # (the package's `kivi` is the factory)
    calls = []
    real = kivi_mod.quantize
    monkeypatch.setattr(kivi_mod, "quantize", lambda x, *a, **k: calls.append(x.shape[2]) or real(x, *a, **k))
    ids = torch.randint(0, 128, (1, 300))
    cache = _prefill(tiny, ids, KNorm(compression_ratio=0.5), kivi(4, residual=0))
    # 150 kept per layer: 128 quantized (4 groups of 32), keys and values, one call each; nothing quantized twice
    assert calls == [128, 128] * len(cache.layers)
    assert all(layer.store.n_compressed == 128 for layer in cache.layers)


def _count_dequantize(monkeypatch):
    calls = []
    real = QTensor.dequantize
    monkeypatch.setattr(QTensor, "dequantize", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    return calls


@pytest.mark.parametrize("method", [None, "h2o"])
def test_one_dequantization_per_layer_and_forward_none_for_stats(tiny, monkeypatch, method):
    ids = torch.randint(0, 128, (1, 200))
    m = get_method(method, compression_ratio=0.5, compression_interval=1) if method else None  # h2o: scores and evicts every step
    cache = _prefill(tiny, ids, m, kivi(2))
    calls = _count_dequantize(monkeypatch)
    cache.stats()
    assert calls == []  # bytes and shapes come from the store and the slot table, not a dequantized view
    with torch.no_grad():
        tiny(ids[:, :1], **kv(cache))
    segments = [len(layer.store.segments) for layer in cache.layers]
    assert segments == [1] * len(cache.layers)
    assert len(calls) == 2 * len(cache.layers)  # keys + values of the one segment, once per layer


def test_offload_moves_the_packed_tensors_and_prefetch_gives_the_same_logits(tiny):
    ids = torch.randint(0, 128, (1, 200))
    a = _prefill(tiny, ids, SnapKV(compression_ratio=0.5), kivi(2))
    b = _prefill(tiny, ids, SnapKV(compression_ratio=0.5), kivi(2))
    before = a.stats().kv_bytes
    for i in range(len(a.layers)):
        a.offload(i)  # transformers' Cache.offload: the layer's own offload
        layer = a.layers[i]
        assert layer.store.segments[0].k.codes.dtype == torch.uint8  # still packed, nothing dequantized
        assert all(t.device.type == "cpu" for t in layer.kv_tensors().values())
    assert a.stats().kv_bytes == before
    for i in range(len(a.layers)):
        a.layers[i].prefetch()  # (Cache.prefetch needs a cache built with offloading: its stream)
    nxt = torch.randint(0, 128, (1, 3))
    with torch.no_grad():
        assert torch.equal(tiny(nxt, **kv(a)).logits, tiny(nxt, **kv(b)).logits)


def test_mixed_precision_split_keeps_every_slot_and_keep_really_evicts():
    torch.manual_seed(0)
    layer = mikv(8, 2, residual=8, group=8)()
    k, v = torch.randn(1, 2, 40, 64), torch.randn(1, 2, 40, 64)
    held = layer.update(k, v)
    scores = torch.rand(1, 2, 40)
    layer.split(scores, 20)
    layer.commit()
    assert isinstance(layer.store, MixedPrecisionStore)
    assert layer.n_stored == 40 and layer.n_evicted == 0 and layer.store.n_low == 20
    assert [b.bits for b in layer.store.segments] == [2, 8]
    # the high-precision slots are the top 12 of the body (the 8 residual slots count in the 20)
    body = scores[..., :32]
    top = set(body[0, 0].topk(12).indices.tolist())
    assert set(layer.positions[0, 0, 20:32].tolist()) == top
    del held
    layer.evict(torch.rand(1, 2, 40), 10)  # a real eviction (e.g. a sliding window): slots are freed
    layer.commit()
    assert layer.n_stored == 10 and layer.n_evicted == 30 and layer.store.n == 10
    assert layer.keys.shape == (1, 2, 10, 64)


def test_zipcache_storage_composes_with_the_method_given(tiny):
    ids = torch.randint(0, 128, (1, 300))
    z = parse_quant("zipcache-4-2")
    composed = for_storage(SnapKV(compression_ratio=0.5), z)
    assert isinstance(composed, PrecisionSplit)
    cache = _prefill(tiny, ids, composed, z.layer_factory)
    plain = _prefill(tiny, ids, SnapKV(compression_ratio=0.5), None)
    for layer, ev in zip(cache.layers, plain.layers):
        assert layer.n_stored == 300  # every token kept, SnapKV's 150 at 4 bits (118) + the 32 residual
        hi = set(layer.positions[0, 0, layer.store.n_low:].tolist())
        assert hi == set(ev.positions[0, 0].tolist())
    own = _prefill(tiny, ids, for_storage(None, z), z.layer_factory)
    assert any(not torch.equal(a.positions, b.positions) for a, b in zip(own.layers, cache.layers))


def test_mikv_and_zipcache_are_registered_methods():
    assert isinstance(get_method("mikv", compression_ratio=0.5), MiKV) and get_method("mikv", compression_ratio=0.5).inner.name == "h2o"
    assert isinstance(get_method("zipcache", compression_ratio=0.5), ZipCacheSaliency)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama_with_smollm2_tokenizer(tmp_path_factory.mktemp("tiny-llama-stores"))


def test_cli_generate_composes_zipcache_with_the_method_given(model_dir, tmp_path):
    from kvsqueeze.cli.main import main

    ctx = tmp_path / "ctx.txt"
    ctx.write_text("The passkey is 4812. " * 40)
    base = ["generate", "--model", str(model_dir), "--context-file", str(ctx), "--question", "Passkey?",
            "--max-new-tokens", "2", "--quant", "zipcache-4-2", "--compression-ratio", "0.5"]
    given = CliRunner().invoke(main, base + ["--method", "snapkv"])
    assert given.exit_code == 0, given.output
    assert "method: snapkv(compression_ratio=0.5) picks the high-precision tokens of zipcache-4-2" in given.output
    default = CliRunner().invoke(main, base)
    assert default.exit_code == 0, default.output
    assert "method: zipcache(compression_ratio=0.5)" in default.output  # no --method: ZipCache's own saliency, as before
    named = CliRunner().invoke(main, base + ["--method", "zipcache"])
    assert "method: zipcache(compression_ratio=0.5)" in named.output
