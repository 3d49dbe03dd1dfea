"""The static decode path (issue 12, item 1): a fixed-capacity copy of a compressed cache and one decoding step
that compiles whole. Its greedy tokens and logits equal the eager `CompressedCache` path's (fp32, tight tolerance)
for every kind of cache it holds, compiled (fullgraph, a CPU backend) or not; what it cannot run is refused."""

import shutil

import pytest
import torch

import kvsqueeze as kq
from kvsqueeze.methods import H2O, get_method
from kvsqueeze.quant import gear
from kvsqueeze.runtime.generate import decode_step, prefill
from kvsqueeze.runtime.static import StaticCompressedCache, StaticDecoder, static_greedy_decode
from kvsqueeze.selection import Selector

from conftest import check_compiled_static_step, kv, tiny_llama

TOL = dict(atol=1e-5, rtol=1e-5)
N = 10  # tokens generated

CASES = {  # name -> method kwargs; decode-time eviction where compression_interval is set
    "full": ("full", {}),
    "snapkv": ("snapkv", dict(compression_ratio=0.5, window=8)),
    "adakv": ("adakv:snapkv", dict(compression_ratio=0.5)),
    "pyramidkv": ("pyramidkv", dict(compression_ratio=0.5)),
    "h2o_prefill": ("h2o", dict(compression_ratio=0.5)),  # H2O / TOVA without decode compression: prefill-only
    "tova_prefill": ("tova", dict(compression_ratio=0.5)),
    "streaming_decode": ("streaming_llm", dict(budget=16, compression_interval=1)),
    "knorm_decode": ("knorm", dict(budget=16, compression_interval=1)),
    "knorm_every3": ("knorm", dict(budget=16, compression_interval=3)),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """One torch thread (conftest's `one_thread`)."""


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def _ids(b=1, t=40, seed=0):
    return torch.randint(1, 101, (b, t), generator=torch.Generator().manual_seed(seed))


def _eager(model, cache, first, n, position=None):
    """The eager reference: greedy tokens and per-step logits over the CompressedCache."""
    tok = first.argmax(-1)
    toks, logits = [tok], []
    for i in range(n - 1):
        if position is None:
            lg = decode_step(model, cache, tok)
        else:
            out = model(input_ids=tok[:, None], position_ids=(position + i)[:, None], **kv(cache), use_cache=True)
            lg = out.logits[:, -1]
        logits.append(lg)
        tok = lg.argmax(-1)
        toks.append(tok)
    return torch.stack(toks, 1).tolist(), logits


def _pair(model, name, kw, ids):
    caches = [kq.CompressedCache(model, get_method(name, **kw)) for _ in range(2)]
    firsts = [prefill(model, c, ids) for c in caches]
    return caches, firsts


@pytest.mark.parametrize("case", list(CASES))
def test_static_tokens_and_logits_equal_eager(model, case):
    name, kw = CASES[case]
    (c_eager, c_static), (f1, f2) = _pair(model, name, kw, _ids())
    ref, ref_logits = _eager(model, c_eager, f1, N)
    static = StaticCompressedCache.from_cache(c_static, N)
    logits = []
    got = static_greedy_decode(model, static, f2, N, set(), logits_out=logits)
    assert got == ref
    assert len(logits) == len(ref_logits)
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, **TOL)
    # what the eager cache kept at the end is what the static slots hold
    for i, layer in enumerate(c_eager.layers):
        held = layer.valid if layer.valid is not None else torch.ones_like(layer.positions, dtype=torch.bool)
        want = [[sorted(layer.positions[0, h][held[0, h]].tolist())] for h in range(held.shape[1])]
        s = static.slots
        have = [[sorted(s.positions[i, 0, h][s.valid[i, 0, h]].tolist())] for h in range(held.shape[1])]
        assert have == want, f"layer {i}"


def test_capacity_is_budget_plus_room(model):
    (_, c), _ = _pair(model, "snapkv", dict(compression_ratio=0.5, window=8), _ids())
    up = lambda n: -(-n // 16) * 16  # noqa: E731  capacities are rounded up to 16 slots
    assert StaticCompressedCache.from_cache(c, 7).slots.capacity == up(20 + 7)
    assert StaticCompressedCache.from_cache(c, 30).slots.capacity == up(20 + 30)
    (_, c), _ = _pair(model, "knorm", dict(budget=16, compression_interval=1), _ids())
    assert StaticCompressedCache.from_cache(c, 100).slots.capacity == up(16 + 1)  # evicts: budget + interval
    (_, c), _ = _pair(model, "adakv:snapkv", dict(compression_ratio=0.5), _ids())
    widest = max(int(layer.held_counts().max()) for layer in c.layers)
    st = StaticCompressedCache.from_cache(c, 5)
    assert st.slots.capacity == up(widest + 5)
    assert st.stats().kv_bytes == sum(t.numel() * t.element_size() for t in (*st.slots.keys, *st.slots.values))


@pytest.mark.parametrize("case", ["snapkv", "streaming_decode", "knorm_decode"])
def test_left_padded_batch(model, case):
    """A left-padded batch of 2 prefilled as `generate()` does (2D mask, row-relative position ids), decoded by
    the eager cache with the same position ids and by the static one (default positions: tokens seen per row)."""
    name, kw = CASES[case]
    ids = _ids(2, 40, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    ids[1, :9] = 0
    pos_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    caches, firsts = [], []
    for _ in range(2):
        c = kq.CompressedCache(model, get_method(name, **kw))
        with torch.no_grad(), c.prefill():
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos_ids, **kv(c), use_cache=True)
        caches.append(c)
        firsts.append(out.logits[:, -1])
    seen = mask.sum(-1)
    ref, ref_logits = _eager(model, caches[0], firsts[0], N, position=seen)
    static = StaticCompressedCache.from_cache(caches[1], N)
    assert static.position.tolist() == seen.tolist()
    logits = []
    got = static_greedy_decode(model, static, firsts[1], N, set(), logits_out=logits)
    assert got == ref
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, **TOL)


def test_eager_attention_implementation():
    m = tiny_llama("eager")
    (c1, c2), (f1, f2) = _pair(m, "knorm", dict(budget=16, compression_interval=1), _ids())
    ref, ref_logits = _eager(m, c1, f1, N)
    logits = []
    assert static_greedy_decode(m, StaticCompressedCache.from_cache(c2, N), f2, N, set(), logits_out=logits) == ref
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("case", ["adakv", "knorm_decode"])
def test_compiled_fullgraph_same_tokens_one_graph(model, case):
    """torch.compile(step, fullgraph=True, backend="aot_eager"): compiles with no graph break (fullgraph raises on
    one), once (no recompilation per step: nothing in the step is a Python number that changes), same tokens."""
    name, kw = CASES[case]
    (c1, c2), (f1, f2) = _pair(model, name, kw, _ids())
    check_compiled_static_step(model, iter([(c1, f1), (c2, f2)]).__next__, N, TOL, graphs=1)


def test_eos_stops_each_row_like_the_eager_loop(model):
    from kvsqueeze.runtime.generate import greedy_decode_batch

    ids = _ids(2, 30, seed=5)
    (c1, c2), (f1, f2) = _pair(model, "snapkv", dict(compression_ratio=0.5, window=8), ids)
    free = greedy_decode_batch(model, c1, f1, N, set())
    eos = {free[0][3]}  # row 0 stops before its 4th token; row 1 wherever that token appears, if it does
    c1 = kq.CompressedCache(model, get_method("snapkv", compression_ratio=0.5, window=8))
    f1 = prefill(model, c1, ids)
    ref = greedy_decode_batch(model, c1, f1, N, eos)
    got = static_greedy_decode(model, StaticCompressedCache.from_cache(c2, N), f2, N, eos, eos_every=2)
    assert got == ref
    assert len(got[0]) == 3


def test_full_cache_refuses_a_step_past_its_room(model):
    (_, c), (_, f) = _pair(model, "snapkv", dict(compression_ratio=0.5, window=8), _ids())
    st = StaticCompressedCache.from_cache(c, 2)
    dec = StaticDecoder(model, st)
    tok = f.argmax(-1)
    dec(tok)
    dec(tok)
    with pytest.raises(kq.KVSqueezeError, match="full"):
        dec(tok)


def test_unsupported_caches_are_refused_naming_the_eager_path(model):
    ids = _ids()
    c = kq.CompressedCache(model, H2O(compression_ratio=0.5, compression_interval=1))
    prefill(model, c, ids)
    with pytest.raises(kq.KVSqueezeError, match="eager loop"):
        StaticCompressedCache.from_cache(c, 4)
    c = kq.CompressedCache(model, get_method("adakv", compression_ratio=0.5, compression_interval=1))
    prefill(model, c, ids)
    with pytest.raises(kq.KVSqueezeError, match="eager"):
        StaticCompressedCache.from_cache(c, 4)
    c = kq.CompressedCache(model, get_method("snapkv", compression_ratio=0.5), layer_factory=gear(4))
    prefill(model, c, ids)  # KIVI is held (tests/test_static_kivi.py); other quantized storage is not
    with pytest.raises(kq.KVSqueezeError, match="quantized"):
        StaticCompressedCache.from_cache(c, 4)
    c = kq.CompressedCache(model, None, selector=Selector(48))  # a selector with no static counterpart
    prefill(model, c, ids)
    with pytest.raises(kq.KVSqueezeError, match="selection"):  # Quest and AttentionPredictor run (their tests)
        StaticCompressedCache.from_cache(c, 4)
    with pytest.raises(kq.KVSqueezeError, match="empty"):
        StaticCompressedCache.from_cache(kq.CompressedCache(model, None), 4)


def test_the_model_is_left_as_loaded(model):
    """The static attention is switched on only while a step runs; a plain forward afterwards is unchanged."""
    (_, c), (_, f) = _pair(model, "snapkv", dict(compression_ratio=0.5, window=8), _ids())
    static_greedy_decode(model, StaticCompressedCache.from_cache(c, 3), f, 3, set())
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("kernel", ["matmul", "eager"])
def test_other_static_kernels(model, kernel):
    (c1, c2), (f1, f2) = _pair(model, "adakv:snapkv", dict(compression_ratio=0.5), _ids())
    ref, ref_logits = _eager(model, c1, f1, N)
    logits = []
    got = static_greedy_decode(model, StaticCompressedCache.from_cache(c2, N), f2, N, set(), logits_out=logits,
                               kernel=kernel)
    assert got == ref
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, **TOL)
    with pytest.raises(kq.KVSqueezeError, match="kernel"):
        StaticDecoder(model, StaticCompressedCache.from_cache(c2, N), kernel="flash")


@pytest.mark.parametrize("case", ["snapkv", "knorm_decode"])
def test_model_generate_drives_the_static_cache(model, case):
    """model.generate(ids, cache=<static copy of a cache prefilled with all but the last token>) gives the tokens
    generate() gives over the eager CompressedCache prefilled the same way; the model is left as loaded; a forward
    of several new tokens is refused."""
    name, kw = CASES[case]
    ids = _ids()
    eager = kq.CompressedCache(model, get_method(name, **kw))
    prefill(model, eager, ids[:, :-1])
    ref = model.generate(ids, **kv(eager), max_new_tokens=N, do_sample=False, pad_token_id=0)
    cache = kq.CompressedCache(model, get_method(name, **kw))
    prefill(model, cache, ids[:, :-1])
    static = StaticCompressedCache.from_cache(cache, N)
    assert not static.is_compileable  # generate() must not compile a forward the hooks switch
    got = model.generate(ids, **kv(static), max_new_tokens=N, do_sample=False, pad_token_id=0)
    assert got.tolist() == ref.tolist()
    assert model.config._attn_implementation == "sdpa"
    cache = kq.CompressedCache(model, get_method(name, **kw))
    prefill(model, cache, ids[:, :-3])
    with pytest.raises(kq.KVSqueezeError, match="one new token"):
        model.generate(ids, **kv(StaticCompressedCache.from_cache(cache, N)), max_new_tokens=2, do_sample=False,
                       pad_token_id=0)
    assert model.config._attn_implementation == "sdpa"


def test_transformers_static_cache_still_compiles_after_a_compressed_cache(model):
    """Building a CompressedCache attaches kvsqueeze's routing hooks to the model; a fullgraph-compiled forward
    with transformers' own StaticCache must still trace (the hooks stay out of compiled forwards that are not
    kvsqueeze's: their thread lookup cannot be traced)."""
    import torch._dynamo
    from transformers import StaticCache

    kq.CompressedCache(model, get_method("knorm", compression_ratio=0.5))  # attaches the hooks
    ids = _ids(1, 12)
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        model(input_ids=ids, **kv(cache), use_cache=True)
    torch._dynamo.reset()

    def fwd(t, p):
        return model(input_ids=t, position_ids=p, **kv(cache), use_cache=True).logits[:, -1]

    step = torch.compile(fwd, fullgraph=True, backend="eager")
    with torch.no_grad():
        out = step(ids[:, -1:], torch.tensor([[12]]))
    assert out.shape == (1, 101)


def test_models_the_static_path_cannot_run_are_refused_before_the_prefill(monkeypatch):
    """Sliding-window layers (Gemma 3): `generate_answer(static=True)` says so before any prefill (the refusal used
    to come from `from_cache`, after the whole context had been prefilled)."""
    from conftest import tiny_gemma3

    import kvsqueeze.runtime.generate as gen
    from kvsqueeze.runtime.static import check_model

    called = []
    monkeypatch.setattr(gen, "prefill", lambda *a, **k: called.append(1))
    monkeypatch.setattr(gen, "split_prompt", lambda tok, c, q, p="": (list(range(1, 41)), [2, 3]))
    with pytest.raises(kq.KVSqueezeError, match="sliding-window or chunked-attention layers.*without --compile"):
        gen.generate_answer(tiny_gemma3(), None, "some context " * 20, "q?", get_method("knorm", compression_ratio=0.5),
                            static=True)
    assert called == []
    check_model(tiny_llama())  # full attention only: accepted


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor on the CPU needs a C++ compiler")
def test_compiled_writes_stay_in_place():
    """A step's writes into the slots compile to in-place stores: inductor's code for `begin_token` + `write_kv` +
    `end_token` never loops over a whole key / value buffer (with `scatter_` writes it copied every buffer out and
    back each step: 0.8 ms of a 6.7 ms step on the H200) nor, without eviction, over the slot table; and the
    compiled writes equal the eager ones."""
    import re

    from torch._inductor.utils import run_and_get_code

    from kvsqueeze.storage.static import StaticSlots

    def build(evicts):  # 2 layers, 2 rows, 2 kv heads, 32 slots, head_dim 8: a buffer has 1024 elements, a table 256
        s = StaticSlots(2, 2, 2, 32, 8, torch.float32, "cpu", evicts=evicts)
        s.write.copy_(torch.tensor([[[3, 5], [0, 31]], [[7, 1], [2, 2]]]))
        if evicts:
            s.priority.copy_(torch.rand(s.priority.shape, generator=torch.Generator().manual_seed(1)))
            s.valid[..., :20] = True
            s.limit.fill_(16)
        return s

    k = torch.randn(2, 2, 1, 8)
    v = torch.randn(2, 2, 1, 8)
    pos = torch.tensor([40, 41])
    for evicts in (False, True):
        eager, comp = build(evicts), build(evicts)

        def step(s, k, v, pos):
            s.begin_token(pos)
            s.write_kv(1, k, v, -k[:, :, 0].norm(dim=-1) if evicts else None)
            s.end_token(torch.tensor(True), max_victims=2)
            return s.write.sum()

        step(eager, k, v, pos)
        torch._dynamo.reset()
        _, code = run_and_get_code(torch.compile(lambda k, v, pos: step(comp, k, v, pos), fullgraph=True), k, v, pos)
        bounds = [int(n) for n in re.findall(r"x0<static_cast<int64_t>\((\d+)L\)", "\n".join(code))]
        assert 1024 not in bounds, "a compiled write loops over a whole key/value buffer (scatter_, not index_put_?)"
        if not evicts:
            assert 256 not in bounds, "a compiled write loops over a whole slot table"
        for name in ("positions", "valid", "write"):
            assert torch.equal(getattr(eager, name), getattr(comp, name)), name
        if evicts:  # -||k|| computed by a fused kernel: equal up to rounding
            torch.testing.assert_close(eager.priority, comp.priority)
        assert torch.equal(eager.keys[1], comp.keys[1]) and torch.equal(eager.values[1], comp.values[1])


def _projections(model):
    return [getattr(m, n) for m in model.modules() for n in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
            if hasattr(m, n)]


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_projections_same_tokens_and_model_restored(model, compiled):
    """`fuse_projections=True` (one GEMV for q, k, v and one for gate, up): the same tokens and logits (up to
    rounding) as separate projections, compiled in one graph without a break; the model's projections are its own
    Linear layers again after every step, their weights unchanged in value and now views of the fused weights (no
    extra memory); a second decoder reuses the fused weights instead of copying again."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    name, kw = CASES["snapkv"]
    (c1, c2), (f1, f2) = _pair(model, name, kw, _ids())
    ref_logits, got_logits = [], []
    ref = static_greedy_decode(model, StaticCompressedCache.from_cache(c1, N), f1, N, set(), logits_out=ref_logits,
                               fuse_projections=False)
    linears = _projections(model)
    weights = [p.weight.detach().clone() for p in linears]
    torch._dynamo.reset()
    counters.clear()
    opts = dict(compile=True, backend="aot_eager") if compiled else {}
    got = static_greedy_decode(model, StaticCompressedCache.from_cache(c2, N), f2, N, set(), logits_out=got_logits,
                               fuse_projections=True, **opts)
    assert got == ref
    for a, b in zip(ref_logits, got_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert _projections(model) == linears
    assert all(torch.equal(p.weight, w) for p, w in zip(linears, weights))
    fused = [m.__dict__["_kvsqueeze_fused"] for m in model.modules() if "_kvsqueeze_fused" in m.__dict__]
    assert len(fused) == 2 * model.config.num_hidden_layers  # attention and MLP of every layer
    for groups in fused:
        for f in groups.values():  # the originals point into the fused weight: no second copy held
            base = f.weight.untyped_storage().data_ptr()
            assert all(v.untyped_storage().data_ptr() == base for v in f.views())
    q0 = next(m for m in model.modules() if hasattr(m, "q_proj")).q_proj
    assert q0.weight.untyped_storage().data_ptr() == fused[0][("q_proj", "k_proj", "v_proj")].weight.data_ptr()
    from kvsqueeze.runtime.fused_projections import build_fused_projections

    again = build_fused_projections(model)
    assert all(f is m.__dict__["_kvsqueeze_fused"][f.names] for m, f in again)
    if compiled:
        assert counters["stats"]["unique_graphs"] == 1
        assert not counters["graph_break"]


def test_fused_projections_refuse_another_projection_order():
    """A stand-in called before the group's first projection (a model projecting k first) raises instead of
    returning a stale part; the parts equal the separate products."""
    from kvsqueeze.errors import KVSqueezeError
    from kvsqueeze.runtime.fused_projections import FusedProjection

    lin = [torch.nn.Linear(8, n, bias=True) for n in (8, 4, 4)]
    want = [torch.nn.functional.linear(x, p.weight.detach().clone(), p.bias.detach().clone()) for p in lin
            for x in [torch.ones(2, 8)]]
    f = FusedProjection(("q_proj", "k_proj", "v_proj"), lin)
    k_part, v_part = f.others
    x = torch.randn(2, 8)
    with pytest.raises(KVSqueezeError, match="before q_proj"):
        k_part(x)
    q = f(x)
    torch.testing.assert_close(q, lin[0](x))
    torch.testing.assert_close(k_part(x), lin[1](x))
    with pytest.raises(KVSqueezeError):
        v_part(torch.randn(2, 8))  # another input
    for p, w in zip(lin, want):  # the weights are views of the fused matrix, values unchanged
        torch.testing.assert_close(p(torch.ones(2, 8)), w)
