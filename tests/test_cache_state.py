"""Per-sequence state of the compressed cache (issue 9, items 2, 3 and 6): `reset()`, growth up to an absolute
budget while decoding, and selector state under the batch operations (beam search)."""

import functools

import pytest
import torch

import kvsqueeze as kq
from kvsqueeze.storage import CompressedLayer
from kvsqueeze.methods import METHODS, MiKV, PyramidKV, QFilters, SnapKV, ZipCacheSaliency
from kvsqueeze.quant import gear, kivi, mikv, zipcache
from kvsqueeze.selection import AttentionPredictor, PredictorNet, Quest

from conftest import kv, prefixkv_profiles, tiny_gemma3, tiny_llama


def _ids(n, rows=1, seed=1):
    return torch.randint(0, 101, (rows, n), generator=torch.Generator().manual_seed(seed))


def _method(name, layers, **kw):
    if name == "qfilters":  # filters made here: no calibration run, no file
        g = torch.Generator().manual_seed(3)
        return QFilters(filters=torch.randn(layers, 2, 16, generator=g), **kw)
    if name == "pyramidkv":  # a window smaller than the budget, so that the layers' budgets really differ
        return PyramidKV(scorer=SnapKV(window=4), **kw)
    if name == "snapkv":
        return SnapKV(window=4, **kw)
    if name == "prefixkv":  # profiles made here: no calibration run, no file
        return kq.get_method(name, profiles=prefixkv_profiles(layers), **kw)
    if name == "windowkv":  # windows and an observation window smaller than the budgets
        return kq.get_method(name, window=4, review_window=4, shared_layers=2, **kw)
    return kq.get_method(name, **kw)


CROSS_LAYER = {n for n, c in METHODS.items() if hasattr(c, "cross_layer_plan")}

# schemes: name -> (layer factory, method wrapper); small groups so that a few dozen tokens get quantized
SCHEMES = {
    "fp": (None, lambda m: m),
    "kivi": (kivi(2, group=8, residual=8), lambda m: m),
    "gear": (gear(4, group=8, residual=8), lambda m: m),
    "mikv": (mikv(8, 2, residual=8, group=8), lambda m: MiKV(inner=m)),
    "zipcache": (zipcache(4, 2, residual=8, group=8),
                 lambda m: ZipCacheSaliency(compression_ratio=m.compression_ratio, budget=m.budget, compression_interval=m.compression_interval)),
}


@torch.no_grad()
def _run(model, cache, prompt, steps):
    """A plain forward of the prompt (what generate() does), then `steps` greedy decoding steps."""
    out = [model(prompt, **kv(cache)).logits[:, -1]]
    for _ in range(steps):
        out.append(model(out[-1].argmax(-1, keepdim=True), **kv(cache)).logits[:, -1])
    return torch.stack(out)


def _same(a, b, path="") -> None:
    """Recursive exact equality of nested state (dicts, lists, tuples, tensors, numbers)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: {sorted(a)} != {sorted(b)}"
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif type(a).__module__.startswith("kvsqueeze.") and hasattr(a, "__dict__"):  # e.g. the cache's Budgets
        assert type(a) is type(b), path
        _same({k: v for k, v in vars(a).items() if k != "method"},
              {k: v for k, v in vars(b).items() if k != "method"}, path)
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _assert_same_cache(fresh, used):
    skip = {"layers", "method", "selector", "config"}
    _same({k: v for k, v in vars(fresh).items() if k not in skip},
          {k: v for k, v in vars(used).items() if k not in skip}, "cache")
    for i, (a, b) in enumerate(zip(fresh.layers, used.layers)):
        assert a.get_seq_length() == b.get_seq_length(), f"layer {i}"
        if isinstance(a, CompressedLayer):
            _same(a.tensors(), b.tensors(), f"layer {i}")
            assert (a.n_evicted, a.n_new) == (b.n_evicted, b.n_new), f"layer {i}"
        else:
            _same({"k": a.keys, "v": a.values}, {"k": b.keys, "v": b.values}, f"layer {i}")
    if fresh.selector is not None:
        _same(fresh.selector.state, used.selector.state, "selector.state")
        assert fresh.selector.steps == used.selector.steps


# --- item 2: reset() -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("name", sorted(METHODS))
def test_reset_then_a_new_prompt_equals_a_fresh_cache(name, scheme):
    if scheme == "zipcache" and name != "h2o":  # ZipCache replaces the method's scores: one method is enough
        pytest.skip("zipcache scores its own saliency")
    cross = name in CROSS_LAYER  # MiniCache, xKV: full-precision storage, no decode-time eviction (they refuse both)
    if cross and scheme != "fp":
        pytest.skip(f"{name} does not compose with quantized storage")
    model = tiny_llama(layers=2)
    factory, wrap = SCHEMES[scheme]
    extra = {"start_layer": 0} if name == "minicache" else {}  # 2 layers: merge the pair (0, 1)

    def build():
        return kq.CompressedCache(model, wrap(_method(name, 2, compression_ratio=0.5, compression_interval=0 if cross else 2, **extra)), layer_factory=factory)

    fresh = build()
    expected = _run(model, fresh, _ids(40, seed=2), steps=5)
    used = build()
    _run(model, used, _ids(24, seed=1), steps=3)  # prompt A, odd number of steps: the decode schedule moved
    used.reset()
    got = _run(model, used, _ids(40, seed=2), steps=5)
    assert torch.equal(got, expected)
    _assert_same_cache(fresh, used)


@pytest.mark.parametrize("kind", ["quest", "attention_predictor", "gemma3"])
def test_reset_clears_selector_and_sliding_layers(kind):
    model = tiny_gemma3() if kind == "gemma3" else tiny_llama(layers=4)

    def build():
        selector = None if kind == "gemma3" else _selector(kind)
        return kq.CompressedCache(model, kq.get_method("h2o", budget=40, compression_interval=3), selector=selector)

    fresh = build()
    expected = _run(model, fresh, _ids(56, seed=2), steps=8)
    used = build()
    _run(model, used, _ids(70, seed=1), steps=5)
    used.reset()
    got = _run(model, used, _ids(56, seed=2), steps=8)
    assert torch.equal(got, expected)
    _assert_same_cache(fresh, used)


def test_reset_inside_a_prefill_block_keeps_the_block():
    model = tiny_llama(layers=2)
    fresh = kq.CompressedCache(model, kq.get_method("knorm", compression_ratio=0.5))
    used = kq.CompressedCache(model, kq.get_method("knorm", compression_ratio=0.5))
    chunks = [_ids(20, seed=5), _ids(20, seed=6)]
    with torch.no_grad():
        with fresh.prefill():
            for c in chunks:
                model(c, **kv(fresh))
        with used.prefill():
            model(_ids(30), **kv(used))
            used.reset()
            for c in chunks:
                model(c, **kv(used))
    assert used.stats().tokens_stored == fresh.stats().tokens_stored == [20, 20]
    _assert_same_cache(fresh, used)


def test_duck_typed_selector_without_reset_is_refused_clearly():
    class Bare:  # the select/observe protocol only
        def setup(self, model):
            pass

        def select(self, *a):
            return None

    cache = kq.CompressedCache(tiny_llama(layers=2), selector=Bare())
    with pytest.raises(kq.KVSqueezeError, match="has no reset"):
        cache.reset()
    with pytest.raises(kq.KVSqueezeError, match="has no index_batch"):
        cache.reorder_cache(torch.tensor([0]))


# --- item 3: growth up to an absolute budget while decoding ---------------------------------------------------
GROWING = sorted(n for n in METHODS if n != "full" and n not in CROSS_LAYER)  # MiniCache, xKV evict nothing while decoding


@pytest.mark.parametrize("name", GROWING)
def test_decode_time_compression_grows_to_the_budget_then_holds_it(name):
    layers, prompt, budget, steps = 4, 20, 30, 40
    model = tiny_llama(layers=layers)
    method = _method(name, layers, budget=budget, compression_interval=1)
    targets = [method.layer_budget(budget, i, layers) for i in range(layers)]  # PyramidKV: 55, 38, 22, 5
    cache = kq.CompressedCache(model, method)
    with torch.no_grad():
        lg = model(_ids(prompt), **kv(cache)).logits[:, -1]
        assert cache.stats().tokens_stored == [min(prompt, b) for b in targets]
        for t in range(1, steps + 1):
            lg = model(lg.argmax(-1, keepdim=True), **kv(cache)).logits[:, -1]
            seen = prompt + t
            assert cache.stats().tokens_stored == [min(seen, b) for b in targets], f"step {t}"
            assert [layer.n_evicted for layer in cache.layers] == [max(0, seen - b) for b in targets], f"step {t}"


@pytest.mark.parametrize("scheme", ["fp", "kivi"])
def test_budget_never_reached_equals_no_compression(scheme):
    """StreamingLLM(budget=30, compression_interval=1) on a 20-token prompt and 9 steps never evicts: same logits as no
    compression at all."""
    model = tiny_llama(layers=2)
    factory = SCHEMES[scheme][0]
    cache = kq.CompressedCache(model, kq.get_method("streaming_llm", budget=30, compression_interval=1), layer_factory=factory)
    ref = kq.CompressedCache(model, None, layer_factory=factory)
    got, expected = _run(model, cache, _ids(20), steps=9), _run(model, ref, _ids(20), steps=9)
    assert torch.equal(got, expected)
    assert cache.stats().tokens_stored == [29, 29]


@pytest.mark.parametrize("spec", [("full", {}), ("h2o", {"compression_ratio": 0.0}), ("pyramidkv", {"budget": 1000})])
def test_a_budget_that_keeps_everything_keeps_everything_while_decoding(spec):
    """Full (compression_ratio and budget ignored), compression_ratio 0 and a budget above every layer's tokens never
    evict: same logits as no compression at all, nothing evicted."""
    name, kw = spec
    model = tiny_llama(layers=2)
    cache = kq.CompressedCache(model, _method(name, 2, compression_interval=1, **kw))
    got, expected = _run(model, cache, _ids(20), steps=6), _run(model, kq.CompressedCache(model), _ids(20), steps=6)
    assert torch.equal(got, expected)
    assert [layer.n_evicted for layer in cache.layers] == [0, 0]


def test_every_fourth_step_grows_past_the_budget_between_evictions():
    model = tiny_llama(layers=2)
    cache = kq.CompressedCache(model, kq.get_method("tova", budget=24, compression_interval=4))
    sizes = []
    with torch.no_grad():
        model(_ids(20), **kv(cache))
        for t in range(10):
            model(torch.tensor([[t]]), **kv(cache))
            sizes.append(cache.stats().tokens_stored[0])
    # steps 1..10 see 21..30 tokens; evictions at steps 4 and 8 bring the layer down to min(budget, seen)
    assert sizes == [21, 22, 23, 24, 25, 26, 27, 24, 25, 26]


def test_ratio_budget_is_fixed_by_the_prefill():
    model = tiny_llama(layers=2)
    cache = kq.CompressedCache(model, kq.get_method("h2o", compression_ratio=0.5, compression_interval=1))
    _run(model, cache, _ids(20), steps=6)
    assert cache.stats().tokens_stored == [10, 10]


def test_check_budget_refuses_a_large_budget_only_without_decode_compression():
    from kvsqueeze.runtime.generate import check_budget

    with pytest.raises(kq.KVSqueezeError, match="not smaller than the context"):
        check_budget(kq.get_method("streaming_llm", budget=30), 20)
    check_budget(kq.get_method("streaming_llm", budget=30, compression_interval=1), 20)  # grows to 30 while decoding


# --- item 6: selector state under batch operations -------------------------------------------------------------
def _selector(kind):
    if kind == "quest":
        return Quest(32)
    return AttentionPredictor(48, predictor=PredictorNet().init_blend(0.75, noise=0.05))


@torch.no_grad()
def _teacher(model, cache, prompt, tokens):
    """Prefill `prompt` (b, T), then feed tokens (b, steps) one step at a time; logits (steps + 1, b, vocab)."""
    out = [model(prompt, **kv(cache)).logits[:, -1]]
    for s in range(tokens.shape[1]):
        out.append(model(tokens[:, s : s + 1], **kv(cache)).logits[:, -1])
    return torch.stack(out)


OPS = {
    "reorder": (lambda c: c.reorder_cache(torch.tensor([2, 0, 1])), [2, 0, 1]),
    "repeat": (lambda c: c.batch_repeat_interleave(2), [0, 0, 1, 1, 2, 2]),
    "select": (lambda c: c.batch_select_indices(torch.tensor([2, 0])), [2, 0]),
}


@functools.lru_cache(maxsize=None)
def _rows_alone(kind, before=20, after=4):
    """Three different rows (48 tokens for Quest), each decoded alone with its own selector: (model, prompts,
    tokens, logits (steps + 1, 3, vocab)). Shared by the three batch operations."""
    model = tiny_llama(layers=4)
    # AttentionPredictor picks 1 page of the middle ones: a longer prompt gives it several to choose from
    prompts = _ids(48 if kind == "quest" else 112, rows=3, seed=7)
    tokens = _ids(before + after, rows=3, seed=8)
    alone = torch.cat([_teacher(model, kq.CompressedCache(model, selector=_selector(kind)), prompts[r : r + 1],
                                tokens[r : r + 1]) for r in range(3)], dim=1)
    return model, prompts, tokens, alone


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("kind", ["quest", "attention_predictor"])
def test_selector_state_follows_batch_operations(kind, op):
    before, after = 20, 4
    model, prompts, tokens, alone = _rows_alone(kind, before, after)
    apply, rows = OPS[op]
    cache = kq.CompressedCache(model, selector=_selector(kind))
    _teacher(model, cache, prompts, tokens[:, :before])
    apply(cache)
    got = []
    with torch.no_grad():
        for s in range(before, before + after):
            got.append(model(tokens[rows, s : s + 1], **kv(cache)).logits[:, -1])
    expected = alone[before + 1 :, rows]
    assert (torch.stack(got) - expected).abs().max() < 1e-5
    sparse = [i for i, layer in enumerate(cache.layers) if layer.n_stored > cache.selector.budget]
    assert sparse == [0, 1, 2, 3] and cache.selector.dense_layers == (0, 1)  # layers 2, 3 really selected


@torch.no_grad()
def _reference_beam_search(model, make_cache, prompt, num_beams, new, eos):
    """Beam search as generate() runs it (fixed length, length_penalty=0, eos masked), each beam decoded in a cache
    of its own (batch 1, copied from its parent): no batch operation involved. -> [(score, tokens)] best first."""
    import copy

    cache = make_cache()
    logits = model(prompt, **kv(cache)).logits[0, -1]
    beams = [(0.0, [], cache, logits)]
    for t in range(new):
        cands = []
        for b, (score, toks, _, lg) in enumerate(beams):
            lp = torch.log_softmax(lg.float(), dim=-1)
            lp[eos] = float("-inf")
            top = lp.topk(2 * num_beams)
            cands += [(score + float(v), toks + [int(i)], b) for v, i in zip(top.values, top.indices)]
        cands.sort(key=lambda c: -c[0])
        nxt = []
        for score, toks, b in cands[:num_beams]:
            c = copy.deepcopy(beams[b][2])
            lg = model(torch.tensor([[toks[-1]]]), **kv(c)).logits[0, -1] if t < new - 1 else None
            nxt.append((score, toks, c, lg))
        beams = nxt
    return [(score, toks) for score, toks, _, _ in beams]


@pytest.mark.parametrize("kind", ["quest", "attention_predictor"])
def test_beam_search_with_a_selector_equals_beams_decoded_alone(kind):
    """generate(num_beams=4) reorders the cache (and so the selector's rows) at every step; it must find the beams
    and scores of a beam search whose every beam is decoded in a cache of its own."""
    model = tiny_llama(layers=4)
    prompt = _ids(48, seed=9)
    beams, new = 4, 20  # past 64 tokens: Quest completes a page during the search
    cache = kq.CompressedCache(model, selector=_selector(kind))
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kv(cache),
                             num_beams=beams, num_return_sequences=beams, do_sample=False, max_new_tokens=new,
                             min_new_tokens=new, length_penalty=0.0, pad_token_id=0, return_dict_in_generate=True,
                             output_scores=True)
    ref = _reference_beam_search(model, lambda: kq.CompressedCache(model, selector=_selector(kind)), prompt, beams,
                                 new, model.generation_config.eos_token_id)
    assert out.sequences[:, prompt.shape[1]:].tolist() == [toks for _, toks in ref]
    assert torch.allclose(out.sequences_scores, torch.tensor([score for score, _ in ref]), atol=1e-4)
