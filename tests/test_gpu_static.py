"""The static decode path on the GPU (issue 12, item 1): bf16 logits of the static step (uncompiled, and compiled with
CUDA graphs, `mode="reduce-overhead"`) equal the eager `CompressedCache` path's within bf16 tolerance, for a full
cache, SnapKV, AdaKV (ragged heads), PyramidKV, StreamingLLM and K-norm with decode-time eviction, Quest and
AttentionPredictor selection (item 2: the selected pages read in place by the Triton kernel, gathered by the torch
ones), and KIVI-2 / KIVI-4
storage (full cache, K-norm prefill eviction; item 2: the fused kernel over the packed buffers); the compiled
step synchronises with the host nowhere (`torch.cuda.set_sync_debug_mode("error")` around the timed steps).

They skip without CUDA; KVSQUEEZE_TEST_DEVICE=cpu runs them on the CPU (the compiled case then uses the aot_eager
backend and no sync check). On the GPU machine:

    PYTHONPATH=$PWD/src python -m pytest -q -p no:cacheprovider tests/test_gpu_static.py

The same logic is tested on the CPU in fp32 by tests/test_static.py and tests/test_static_kivi.py.
"""

import contextlib
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvsqueeze as kq
from kvsqueeze.quant import kivi
from kvsqueeze.runtime.generate import decode_step, prefill
from kvsqueeze.runtime.static import StaticCompressedCache, StaticDecoder

from conftest import no_host_sync

DEVICE = os.environ.get("KVSQUEEZE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
on_device = pytest.mark.skipif(DEVICE is None, reason="no GPU (KVSQUEEZE_TEST_DEVICE=cpu runs it on the CPU)")
DTYPE = torch.bfloat16
STEPS = 12

CASES = {
    "full": ("full", {}),
    "snapkv": ("snapkv", dict(compression_ratio=0.5, window=16)),
    "adakv": ("adakv:snapkv", dict(compression_ratio=0.5)),
    "pyramidkv": ("pyramidkv", dict(compression_ratio=0.5)),
    "streaming_decode": ("streaming_llm", dict(budget=64, compression_interval=1)),
    "knorm_decode": ("knorm", dict(budget=64, compression_interval=1)),
}


def _model(attn="sdpa"):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, max_position_embeddings=1024, attn_implementation=attn, hidden_size=256,
                      intermediate_size=256, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128)
    return LlamaForCausalLM(cfg).eval().to(DEVICE, DTYPE)


def _feed(prompt=160):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 101, (1, prompt), generator=g), torch.randint(0, 101, (STEPS, 1), generator=g)


def _no_sync():
    return no_host_sync(DEVICE)


def _compile_kw(kernel, compiled):
    """Skip what this machine cannot run (the Triton kernel without triton; compiled Triton off CUDA), reset dynamo,
    and return the StaticDecoder compile arguments: None, inductor on CUDA, aot_eager on the CPU."""
    import torch._dynamo

    cuda = torch.device(DEVICE).type == "cuda"
    if kernel == "triton" and not _triton_runs():
        pytest.skip("triton on CUDA (or TRITON_INTERPRET=1 on the CPU) needed")
    if compiled and kernel == "triton" and not cuda:
        pytest.skip("a compiled Triton kernel needs CUDA")
    torch._dynamo.reset()
    if not compiled:
        return None
    return dict(compile=True) if cuda else dict(compile=True, backend="aot_eager")


@torch.no_grad()
def _both(model, name, kw, compile_kw=None, kernel=None, bits=None):
    """Teacher-forced logits (the same tokens fed to both): eager decode steps vs the static decoder. `bits`: KIVI
    storage (group = residual = 32) at that many bits; the prompt of 185 tokens then leaves 57 residual tokens, so
    the residual is flushed into a packed group at the 7th decoded step."""
    ids, feed = _feed(160 if bits is None else 185)
    lf = {} if bits is None else dict(layer_factory=kivi(bits))
    eager = kq.CompressedCache(model, kq.get_method(name, **kw), **lf)
    prefill(model, eager, ids.to(DEVICE))
    ref = [decode_step(model, eager, t.to(DEVICE)) for t in feed]
    cache = kq.CompressedCache(model, kq.get_method(name, **kw), **lf)
    prefill(model, cache, ids.to(DEVICE))
    static = StaticCompressedCache.from_cache(cache, STEPS)
    dec = StaticDecoder(model, static, kernel=kernel, **(compile_kw or {}))
    got = []
    for i, t in enumerate(feed):
        t = t.to(DEVICE)
        if i < 3:  # warm-up (compilation, graph capture)
            got.append(dec(t)[0].clone())
            continue
        with _no_sync():
            got.append(dec(t)[0].clone())
    return ref, got


def _triton_runs() -> bool:
    """The Triton kernel runs on CUDA, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.device(DEVICE).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@on_device
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kernel", [None, "sdpa", "matmul", "triton"])
def test_static_logits_equal_eager_in_bf16(case, kernel):
    if kernel == "triton" and not _triton_runs():
        pytest.skip("triton on CUDA (or TRITON_INTERPRET=1 on the CPU) needed")
    name, kw = CASES[case]
    ref, got = _both(_model(), name, kw, kernel=kernel)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g.float(), r.float(), atol=3e-2, rtol=3e-2)  # bf16 logits of ~N(0, 0.1)


@on_device
@pytest.mark.parametrize("case,kernel", [("full", None), ("adakv", None), ("knorm_decode", None),
                                         ("streaming_decode", None), ("adakv", "triton"), ("knorm_decode", "triton")])
def test_compiled_step_equals_eager_and_never_syncs(case, kernel):
    import torch._dynamo

    cuda = torch.device(DEVICE).type == "cuda"
    if kernel == "triton" and not (cuda and _triton_runs()):
        pytest.skip("a compiled Triton kernel needs CUDA")
    torch._dynamo.reset()
    name, kw = CASES[case]
    compile_kw = dict(compile=True) if cuda else dict(compile=True, backend="aot_eager")
    ref, got = _both(_model(), name, kw, compile_kw=compile_kw, kernel=kernel)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g.float(), r.float(), atol=3e-2, rtol=3e-2)


@torch.no_grad()
def _quest_both(model, kernel, compile_kw=None, budget=64):
    """Teacher-forced logits of the eager Quest cache vs the static Quest step (layer 0 dense, layer 1 selects
    budget // 16 pages of the 160-token prompt plus the decoded tokens), with the pages each chose at layer 1 per
    step and kv head: ([eager logits], [static logits], [eager pages], [static pages])."""
    from kvsqueeze.selection import Quest

    import kvsqueeze.selection.quest as quest_mod

    ids, feed = _feed()
    eager = kq.CompressedCache(model, None, selector=Quest(budget, dense_layers=(0,)))
    prefill(model, eager, ids.to(DEVICE))
    ref, ref_pages, ref_agg, scores = [], [], [], []
    select, page_scores = eager.selector._select, quest_mod.page_scores

    def record(i, layer, q):  # the eager pages, and the aggregated page scores they were chosen by (b, hk, P)
        n = len(scores)
        idx = select(i, layer, q)
        agg = None
        if len(scores) > n:
            b, hq, P = scores[-1].shape
            hk = layer.keys.shape[1]
            agg = torch.softmax(scores[-1] * eager.selector.scale(i, q), -1).view(b, hk, hq // hk, P).amax(2)
        ref_pages.append(idx)
        ref_agg.append(agg)
        return idx

    eager.selector._select = record
    quest_mod.page_scores = lambda *a: scores.append(page_scores(*a)) or scores[-1]
    try:
        for t in feed:
            ref.append(decode_step(model, eager, t.to(DEVICE)))
    finally:
        quest_mod.page_scores = page_scores
    ref_pages = [None if idx is None else [sorted(set(h.tolist())) for h in (idx[0] // 16)] for idx in ref_pages]
    cache = kq.CompressedCache(model, None, selector=Quest(budget, dense_layers=(0,)))
    prefill(model, cache, ids.to(DEVICE))
    static = StaticCompressedCache.from_cache(cache, STEPS)
    dec = StaticDecoder(model, static, kernel=kernel, **(compile_kw or {}))
    got, pages = [], []
    for i, t in enumerate(feed):
        t = t.to(DEVICE)
        with contextlib.nullcontext() if i < 3 else _no_sync():  # warm-up: compilation, graph capture
            got.append(dec(t)[0].clone())
        pages.append(static.pages.chosen[1, 0].tolist())  # per kv head of row 0, increasing
    return ref, got, ref_pages, pages, ref_agg


def _near_ties(ref_pages, pages, ref_agg, rtol: float) -> list[str]:
    """The steps where the static pages differ from the eager ones other than by a near tie: for each kv head, the
    pages only one side chose must score (eager aggregated score, row 0) within `rtol` of each other. Returns
    descriptions of the violations (empty: every difference is a near tie)."""
    bad = []
    for step, (a, b, agg) in enumerate(zip(ref_pages, pages, ref_agg)):
        if a == b:
            continue
        if a is None or agg is None:
            bad.append(f"step {step}: eager dense, static {b}")
            continue
        for h, (pa, pb) in enumerate(zip(a, b)):
            only_e, only_s = set(pa) - set(pb), set(pb) - set(pa)
            if not only_e and not only_s:
                continue
            ve = [float(agg[0, h, j]) for j in only_e]
            vs = [float(agg[0, h, j]) for j in only_s if j < agg.shape[-1]]
            if not ve or not vs or min(vs) < max(ve) * (1 - rtol):
                bad.append(f"step {step} kv head {h}: eager-only pages {sorted(only_e)} scores {ve}, "
                           f"static-only {sorted(only_s)} scores {vs}")
    return bad


@on_device
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("kernel", [None, "sdpa", "matmul", "triton"])
def test_static_quest_logits_equal_eager_in_bf16(kernel, compiled):
    """The two pick the same pages but for near ties (bf16 rounding of the query, which differs between the
    attention kernels of layer 0, and float32 rounding of the bound, products or the Triton pass, may swap pages
    whose scores are within 5% of each other), on most steps; where they do, the logits agree within bf16
    tolerance."""
    compile_kw = _compile_kw(kernel, compiled)
    model = _model()
    ref, got, ref_pages, pages, ref_agg = _quest_both(model, kernel, compile_kw)
    same = [a == b for a, b in zip(ref_pages, pages)]
    assert sum(same) >= len(same) // 2, (ref_pages, pages)
    assert not _near_ties(ref_pages, pages, ref_agg, rtol=0.05), _near_ties(ref_pages, pages, ref_agg, rtol=0.05)
    for r, g, ok in zip(ref, got, same):
        if ok:
            torch.testing.assert_close(g.float(), r.float(), atol=3e-2, rtol=3e-2)
    # the selection matters: the full cache's logits differ
    ids, feed = _feed()
    full = kq.CompressedCache(model, None)
    prefill(model, full, ids.to(DEVICE))
    dense = [decode_step(model, full, t.to(DEVICE)) for t in feed]
    assert max(float((a.float() - b.float()).abs().max()) for a, b in zip(dense, ref)) > 3e-2


@torch.no_grad()
def _ap_both(model, kernel, compile_kw=None, budget=64):
    """`_quest_both` for AttentionPredictor (layer 0 dense, layer 1 selects; the paper's CNN at its blend init,
    sink and local one page each, so budget 64 predicts 2 of the prompt's 10 middle pages; calibration rows at
    steps 5 and 10): ([eager logits], [static logits], [eager pages], [static pages])."""
    from kvsqueeze.selection import AttentionPredictor, PredictorNet

    def selector():
        return AttentionPredictor(budget, predictor=PredictorNet().init_blend(), sink=16, local=16, dense_layers=(0,))

    ids, feed = _feed()
    eager = kq.CompressedCache(model, None, selector=selector())
    prefill(model, eager, ids.to(DEVICE))
    ref, ref_pages = [], []
    select = eager.selector._select
    eager.selector._select = lambda i, layer, q: ref_pages.append(select(i, layer, q)) or ref_pages[-1]
    for t in feed:
        ref.append(decode_step(model, eager, t.to(DEVICE)))
    ref_pages = [None if idx is None else [sorted(set(h.tolist())) for h in (idx[0] // 16)] for idx in ref_pages]
    cache = kq.CompressedCache(model, None, selector=selector())
    prefill(model, cache, ids.to(DEVICE))
    static = StaticCompressedCache.from_cache(cache, STEPS)
    dec = StaticDecoder(model, static, kernel=kernel, **(compile_kw or {}))
    got, pages = [], []
    for i, t in enumerate(feed):
        t = t.to(DEVICE)
        # warm-up: compilation, graph capture (a calibration step, eager after the step, syncs nothing either)
        with contextlib.nullcontext() if i < 3 else _no_sync():
            got.append(dec(t)[0].clone())
        pages.append(static.pages.chosen[1, 0].tolist())
    return ref, got, ref_pages, pages


@on_device
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("kernel", [None, "sdpa", "matmul", "triton"])
def test_static_attention_predictor_logits_equal_eager_in_bf16(kernel, compiled):
    """While the two have picked the same pages at every step so far (their histories are then the same rows;
    bf16 rounding of the query, which differs between the attention kernels of layer 0, may swap two pages of
    close scores, and from there each history holds its own rows), the logits agree within bf16 tolerance; at
    least the first 8 of 12 steps agree."""
    compile_kw = _compile_kw(kernel, compiled)
    model = _model()
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the CNN in float32 on both paths (TF32 rounds its scores to ~1e-3)
    try:
        ref, got, ref_pages, pages = _ap_both(model, kernel, compile_kw)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    agree = 0
    while agree < len(pages) and ref_pages[agree] == pages[agree]:
        agree += 1
    assert agree >= 8, (ref_pages, pages)
    for r, g in zip(ref[:agree], got[:agree]):
        torch.testing.assert_close(g.float(), r.float(), atol=3e-2, rtol=3e-2)
    assert len({tuple(map(tuple, p)) for p in pages}) > 1  # the predicted pages move


KIVI_CASES = {  # name -> (method, kwargs, bits): KIVI storage over a full cache and after a prefill eviction
    "kivi2": ("full", {}, 2),
    "kivi4": ("full", {}, 4),
    "knorm+kivi2": ("knorm", dict(compression_ratio=0.5), 2),
}


@on_device
@pytest.mark.parametrize("case", list(KIVI_CASES))
@pytest.mark.parametrize("kernel", [None, "matmul", "triton"])
def test_static_kivi_logits_equal_eager_in_bf16(case, kernel):
    """The static KIVI step (packed buffers + residual; None = the fused Triton kernel on CUDA, "matmul" the
    dequantizing reference) gives the eager KIVI cache's bf16 logits, across a residual flush."""
    if kernel in (None, "triton") and not _triton_runs():
        pytest.skip("triton on CUDA (or TRITON_INTERPRET=1 on the CPU) needed")
    name, kw, bits = KIVI_CASES[case]
    ref, got = _both(_model(), name, kw, kernel=kernel, bits=bits)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g.float(), r.float(), atol=3e-2, rtol=3e-2)


@on_device
@pytest.mark.parametrize("case", list(KIVI_CASES))
def test_compiled_static_kivi_equals_eager_and_never_syncs(case):
    """torch.compile(mode="reduce-overhead") of the static KIVI step with the fused kernel (CUDA graphs): the eager
    KIVI cache's logits, no host synchronisation in the timed steps (a residual flush among them)."""
    import torch._dynamo

    cuda = torch.device(DEVICE).type == "cuda"
    if not (cuda and _triton_runs()):
        pytest.skip("a compiled Triton kernel needs CUDA")
    torch._dynamo.reset()
    name, kw, bits = KIVI_CASES[case]
    ref, got = _both(_model(), name, kw, compile_kw=dict(compile=True), kernel="triton", bits=bits)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g.float(), r.float(), atol=3e-2, rtol=3e-2)


def test_near_ties_tells_a_near_tie_from_a_wrong_page():
    agg = torch.tensor([[[0.50, 0.30, 0.29, 0.01]]])  # (b=1, hk=1, P=4)
    eager = [[[0, 1]]]
    assert _near_ties(eager, [[[0, 1]]], [agg], rtol=0.05) == []
    assert _near_ties(eager, [[[0, 2]]], [agg], rtol=0.05) == []  # 0.29 vs 0.30: a near tie
    assert _near_ties(eager, [[[0, 3]]], [agg], rtol=0.05)  # 0.01 vs 0.30: a wrong page
