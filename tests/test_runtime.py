"""kvsqueeze inside transformers' runtime: chunked prefill phases, the model left as loaded, the cache argument's name."""

import copy
import inspect
import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache, GenerationConfig

import kvsqueeze as kq
from kvsqueeze.runtime.routing import PREFIX
from kvsqueeze.storage import CompressedLayer
from kvsqueeze.compat import CACHE_ARG, cache_arg, cache_kwargs, output_cache
from kvsqueeze.runtime.generate import greedy_decode, prefill, record_prefill
from kvsqueeze.quant import kivi

from conftest import kv, tiny_llama


def _ids(n, seed=1, batch=1):
    return torch.randint(0, 101, (batch, n), generator=torch.Generator().manual_seed(seed))


# Methods of every kind the phase logic reaches: absolute and compression_ratio budgets, a stateful method, quantized storage.
METHODS = {
    "snapkv-budget16": lambda: (kq.get_method("snapkv", budget=16, window=4), None),
    "knorm-ratio0.5": lambda: (kq.get_method("knorm", compression_ratio=0.5), None),
    "h2o-budget20": lambda: (kq.get_method("h2o", budget=20), None),
    "snapkv-kivi4": lambda: (kq.get_method("snapkv", budget=16, window=4), kivi(4, group=8, residual=8)),
}


def _expected_stored(method, cache, n_seen):
    return [method.n_keep(n_seen, i, cache.n_layers) for i in range(cache.n_layers)]


# --- item 8: transformers' own chunked prefill is prefill ------------------------------------------------------
@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("n_prompt", [48, 49])  # 49: generate()'s last prefill chunk is a single token
def test_generate_chunked_prefill_compresses_every_chunk(name, n_prompt):
    model = tiny_llama(layers=2)
    ids = _ids(n_prompt)
    method, factory = METHODS[name]()
    cache = kq.CompressedCache(model, method, layer_factory=factory)
    with torch.no_grad():
        out = model.generate(ids, **kv(cache), prefill_chunk_size=16, max_new_tokens=1, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    stored = [layer.n_stored for layer in cache.layers]
    assert stored == _expected_stored(method, cache, n_prompt)
    assert all(n < n_prompt for n in stored)
    assert cache.get_seq_length() == n_prompt and cache.decode_step == 0

    # the same chunked prefill through kvsqueeze's own pipeline: same slots kept, same logits
    method2, factory2 = METHODS[name]()
    ref = kq.CompressedCache(model, method2, layer_factory=factory2)
    ref_logits = prefill(model, ref, ids, chunk_size=16)
    for a, b in zip(cache.layers, ref.layers):
        assert torch.equal(a.positions, b.positions)
    torch.testing.assert_close(out.logits[0], ref_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["snapkv-budget16", "h2o-budget20", "snapkv-kivi4"])
def test_generate_chunked_prefill_then_decode_equals_pipeline(name):
    """Decoding after a chunked generate() prefill gives the logits of pipeline.prefill(chunk_size=16) + decode."""
    model = tiny_llama(layers=2)
    ids = _ids(40, seed=3)
    method, factory = METHODS[name]()
    cache = kq.CompressedCache(model, method, layer_factory=factory)
    with torch.no_grad():
        out = model.generate(ids, **kv(cache), prefill_chunk_size=16, max_new_tokens=5, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    method2, factory2 = METHODS[name]()
    ref = kq.CompressedCache(model, method2, layer_factory=factory2)
    logits = [prefill(model, ref, ids, chunk_size=16)]
    with torch.no_grad():
        for t in out.sequences[0, 40:-1].tolist():
            logits.append(model(torch.tensor([[t]]), **kv(ref)).logits[:, -1])
    assert cache.decode_step == ref.decode_step == 4
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(logits), atol=1e-5, rtol=1e-5)
    assert [layer.n_stored for layer in cache.layers] == [layer.n_stored for layer in ref.layers]


def test_forwards_before_the_first_decoding_step_are_prefill():
    """Without prefill() blocks: chunks are compressed (a compression_ratio budget follows the tokens seen), a 1-token
    forward is a decoding step, and forwards after it are appended."""
    model = tiny_llama(layers=2)
    ids = _ids(60)
    method = kq.get_method("knorm", compression_ratio=0.5)
    cache = kq.CompressedCache(model, method)
    with torch.no_grad():
        for s, e in [(0, 16), (16, 32), (32, 48)]:
            model(ids[:, s:e], **kv(cache))
            assert cache.phase == "prefill"
            assert [layer.n_stored for layer in cache.layers] == _expected_stored(method, cache, e)
        budget = _expected_stored(method, cache, 48)
        model(ids[:, 48:49], **kv(cache))
        assert cache.phase == "decode" and cache.decode_step == 1
        model(ids[:, 49:55], **kv(cache))
        assert cache.phase == "append"
    assert [layer.n_stored for layer in cache.layers] == [n + 7 for n in budget]


@pytest.mark.parametrize("name", ["snapkv-budget16", "snapkv-kivi4"])
def test_after_a_prefill_block_forwards_are_appended(name):
    """The question-agnostic protocol: compress the context in prefill() blocks, append the question as is."""
    model = tiny_llama(layers=2)
    ids = _ids(48)
    method, factory = METHODS[name]()
    cache = kq.CompressedCache(model, method, layer_factory=factory)
    prefill(model, cache, ids[:, :32], chunk_size=16)
    with torch.no_grad():
        model(ids[:, 32:], **kv(cache))
    assert cache.phase == "append"
    assert [layer.n_stored for layer in cache.layers] == [16 + 16] * 2
    rec = record_prefill(model, ids[:, :32])  # the sweep's copies keep the same rule
    copy_ = rec.compress(model, METHODS[name]()[0], factory)
    with torch.no_grad():
        model(ids[:, 32:], **kv(copy_))
    assert [layer.n_stored for layer in copy_.layers] == [16 + 16] * 2


# --- item 9: the model stays as loaded ---------------------------------------------------------------------------
def _impls(model):
    cfgs = [model.config, model.config.get_text_config()] + [m.config for m in model.modules() if hasattr(m, "config")]
    return {id(c): c._attn_implementation for c in cfgs}


class _CharTokenizer:
    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        return SimpleNamespace(input_ids=torch.tensor([[ord(c) % 101 for c in text]]))


def _batch_tokens(model, prompts):
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gc = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1)
    res = model.generate_batch(prompts, generation_config=gc, warmup=False,
                               continuous_batching_config=ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=64))
    return [res[k].generated_tokens for k in sorted(res)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_model_is_left_as_loaded(attn):
    model = tiny_llama(attn, layers=2)
    untouched = copy.deepcopy(model)
    loaded = _impls(model)
    ids = _ids(40)
    with torch.no_grad():
        # every kvsqueeze entry point: generate with a compressed cache, the pipeline, the sweep's record, Q-Filters
        cache = kq.CompressedCache(model, kq.get_method("snapkv", budget=16))
        model.generate(ids, **kv(cache), prefill_chunk_size=16, max_new_tokens=3, do_sample=False)
        assert _impls(model) == loaded
        c2 = kq.CompressedCache(model, kq.get_method("h2o", budget=16))
        greedy_decode(model, c2, prefill(model, c2, ids, chunk_size=16), 3, set())
        rec = record_prefill(model, ids)
        model(ids[:, :4], **kv(rec.compress(model, kq.get_method("knorm", compression_ratio=0.5))))
        kq.runtime.calibration.calibrate_qfilters(model, _CharTokenizer(), n_seq=2, seq_len=64, n_vectors=16, progress=False)
    assert _impls(model) == loaded and model.config._attn_implementation == attn

    # a plain DynamicCache run is the never-touched model's, bit for bit
    gen = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        a = model.generate(ids, **kv(DynamicCache()), **gen)
        b = untouched.generate(ids, **kv(DynamicCache()), **gen)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))

    # transformers' continuous batching runs, and gives what the never-touched model gives
    prompts = [ids[0, :9].tolist(), ids[0, 20:25].tolist()]
    assert _batch_tokens(model, prompts) == _batch_tokens(untouched, prompts)
    assert _impls(model) == loaded


def test_routing_is_restored_when_a_forward_raises():
    from kvsqueeze.runtime.routing import patched

    model = tiny_llama(layers=2)
    cache = kq.CompressedCache(model, kq.get_method("knorm", budget=8))
    with pytest.raises(IndexError), torch.no_grad():
        model(torch.tensor([[1, 2, 500]]), **kv(cache))  # out of the vocabulary: fails inside the forward
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="boom"):
        with patched(model):
            assert model.config._attn_implementation == PREFIX + "sdpa"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    cache = kq.CompressedCache(model, kq.get_method("knorm", budget=8))  # still usable
    with torch.no_grad():
        model(_ids(20), **kv(cache))
    assert [layer.n_stored for layer in cache.layers] == [8, 8]


def test_a_copy_of_the_model_routes_itself():
    model = tiny_llama(layers=2)
    kq.CompressedCache(model, None)
    clone = copy.deepcopy(model)
    seen = []
    clone.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a: seen.append((model.config._attn_implementation, clone.config._attn_implementation)))
    cache = kq.CompressedCache(clone, kq.get_method("knorm", budget=8))
    with torch.no_grad():
        clone(_ids(20), **kv(cache))
    assert seen == [("sdpa", PREFIX + "sdpa")]
    assert [layer.n_stored for layer in cache.layers] == [8, 8]


def test_unpatch_removes_every_trace():
    from kvsqueeze.runtime.routing import _STATE

    model = tiny_llama(layers=2)
    untouched = copy.deepcopy(model)
    kq.CompressedCache(model, None)
    kq.patch(model)  # the explicit, permanent opt-in still works
    assert model.config._attn_implementation == PREFIX + "sdpa"
    cache = kq.CompressedCache(model, kq.get_method("knorm", budget=8))
    with torch.no_grad():
        model(_ids(20), **kv(cache))
    kq.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    for m, u in zip(model.modules(), untouched.modules()):
        assert _STATE not in m.__dict__
        assert len(m._forward_pre_hooks) == len(u._forward_pre_hooks)
        assert len(m._forward_hooks) == len(u._forward_hooks)


# --- item 10: the cache argument's name ----------------------------------------------------------------------------
def test_cache_arg_is_the_name_the_forward_takes():
    model = tiny_llama(layers=1)
    params = inspect.signature(type(model).forward).parameters
    assert cache_arg(model) == ("cache" if "cache" in params else "past_key_values") == CACHE_ARG
    cache = DynamicCache()
    with torch.no_grad():
        out = model(_ids(5), **cache_kwargs(model, cache), use_cache=True)
    assert output_cache(out) is cache and cache.get_seq_length() == 5


def test_kvsqueeze_calls_raise_no_rename_warning():
    from kvsqueeze.evaluation.sweep import _answer_from_cache, capped_perplexity
    from kvsqueeze.training.traces import collect_trace

    model = tiny_llama(layers=2)
    ids = _ids(48)
    tok = SimpleNamespace(decode=lambda t, skip_special_tokens=True: " ".join(map(str, t)))
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        cache = kq.CompressedCache(model, kq.get_method("snapkv", budget=16))
        greedy_decode(model, cache, prefill(model, cache, ids, chunk_size=16), 3, set())
        rec = record_prefill(model, ids)
        _answer_from_cache(model, tok, rec.compress(model, kq.get_method("knorm", compression_ratio=0.5)), [1, 2, 3], 3, set())
        capped_perplexity(model, rec.compress(model, kq.get_method("knorm", budget=20, compression_interval=1)), [4, 5], [5, 6])
        collect_trace(model, _ids(200), history=16, steps=8, dense_layers=())
    renamed = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert renamed == []


@pytest.mark.skipif(CACHE_ARG != "cache", reason="transformers < 5.24 has only past_key_values")
def test_the_old_name_is_an_error_in_the_tests():
    """pyproject's filterwarnings turns transformers' rename FutureWarning into an error (what CI runs with)."""
    model = tiny_llama(layers=1)
    with pytest.raises(FutureWarning, match="`past_key_values` is deprecated"), torch.no_grad():
        model(_ids(5), past_key_values=DynamicCache())
