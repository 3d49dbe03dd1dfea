"""AttentionPredictor in the static decode step (issue 12, item 2; issue 13 needs its one-token-ahead rule): the
static step picks the same pages as the eager AttentionPredictor (selection/attention_predictor.py), step by step,
and gives the same greedy tokens and logits, uncompiled and compiled (fullgraph, aot_eager: one graph, the
calibration rows written eagerly after the step); its history after decoding equals the eager one (sparse rows and
the full calibration rows); the rule holds on random histories and keys over page boundaries; what it cannot run is
refused."""

import os
from types import SimpleNamespace

import pytest
import torch

import kvsqueeze as kq
from kvsqueeze.methods import get_method
from kvsqueeze.runtime.generate import decode_step, prefill
from kvsqueeze.runtime.static import StaticCompressedCache, StaticDecoder, static_greedy_decode
from kvsqueeze.selection import AttentionPredictor, PredictorNet
from kvsqueeze.selection.attention_predictor import IncrementalCNN, LastRow
from kvsqueeze.selection.static_attention_predictor import StaticAttentionPredictor

from conftest import check_compiled_static_step, tiny_llama

TOL = dict(atol=1e-5, rtol=1e-5)
N = 14  # tokens generated: 13 decoding steps, calibration rows at steps 5 and 10


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """One torch thread (conftest's `one_thread`)."""


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def _ids(b=1, t=100, seed=0):
    return torch.randint(1, 101, (b, t), generator=torch.Generator().manual_seed(seed))


def _selector(budget=64, **kw):
    torch.manual_seed(3)  # PredictorNet's default (random) init: scores that depend on the whole history
    return AttentionPredictor(budget, predictor=PredictorNet(), sink=16, local=16, **kw)


def _cache(model, ids, method=None, **kw):
    c = kq.CompressedCache(model, method, selector=_selector(**kw))
    return c, prefill(model, c, ids)


def _eager(model, cache, first, n):
    tok = first.argmax(-1)
    toks, logits = [tok], []
    for _ in range(n - 1):
        lg = decode_step(model, cache, tok)
        logits.append(lg)
        tok = lg.argmax(-1)
        toks.append(tok)
    return torch.stack(toks, 1).tolist(), logits


@pytest.fixture
def recorded(monkeypatch):
    """Record the slots the eager AttentionPredictor attends to and the pages the static one picks, per step of a
    sparse layer (the eager None: a dense step)."""
    eager, static = [], []
    pages_fn, select_fn = AttentionPredictor._pages, StaticAttentionPredictor.select

    def rec_eager(self, st, layer, n):
        idx = pages_fn(self, st, layer, n)
        eager.append((n, None if idx is None else idx.clone()))
        return idx

    def rec_static(self, layer_idx, query, scaling):
        pages = select_fn(self, layer_idx, query, scaling)
        if pages is not None:
            static.append((layer_idx, pages.clone(), self.slots.write[layer_idx].clone()))
        return pages

    monkeypatch.setattr(AttentionPredictor, "_pages", rec_eager)
    monkeypatch.setattr(StaticAttentionPredictor, "select", rec_static)
    return eager, static


def _same_pages(eager, static, page=16, min_sparse=12 * 2):
    """Every eager step's slots (all slots when dense) are the static step's pages, cut at the slots written."""
    assert eager and len(eager) == len(static)
    moved, sparse = set(), 0
    for (n, idx), (_, pages, write) in zip(eager, static):
        slots = (pages[..., None] * page + torch.arange(page)).flatten(-2)
        for b in range(pages.shape[0]):
            for h in range(pages.shape[1]):
                assert int(write[b, h]) == n - 1
                got = [s for s in slots[b, h].tolist() if s <= int(write[b, h])]
                want = list(range(n)) if idx is None else idx[b, h].tolist()
                assert got == want
                moved.add(tuple(want[16:-16]))  # the predicted pages (between the sink and the local page)
        sparse += idx is not None
    assert sparse >= min_sparse  # every step of both sparse layers selects
    assert len(moved) > 1  # the choice changes between steps / heads / layers


def _triton_runs() -> bool:
    from kvsqueeze.kernels.split_kv import triton

    return triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("prompt,budget,gqa", [(100, 64, "max"), (60, 48, "max"), (200, 80, "mean")])
@pytest.mark.parametrize("kernel", [None, "matmul", "eager", "triton"])
def test_static_ap_picks_eager_pages_and_gives_eager_tokens(model, recorded, prompt, budget, gqa, kernel):
    """prompt 100: a full history of 64 rows that slides; 60: 60 rows that grow to 64 and slide; 200: the middle
    widens as pages leave the local window (slots 207, 223 cross page boundaries)."""
    if kernel == "triton" and not _triton_runs():
        pytest.skip("TRITON_INTERPRET=1 and triton needed")
    ids = _ids(t=prompt)
    c1, f1 = _cache(model, ids, budget=budget, gqa=gqa)
    ref, ref_logits = _eager(model, c1, f1, N)
    c2, f2 = _cache(model, ids, budget=budget, gqa=gqa)
    static = StaticCompressedCache.from_cache(c2, N)
    assert isinstance(static.pages, StaticAttentionPredictor) and static.pages.k_pages == budget // 16
    logits = []
    got = static_greedy_decode(model, static, f2, N, set(), logits_out=logits, kernel=kernel)
    assert got == ref
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, **TOL)
    _same_pages(*recorded)
    # the history the static step kept (ring, time order) is the eager one: sparse rows and calibration rows
    _same_history(c1.selector, static.pages)
    # the selection matters: the full cache's logits differ
    full = kq.CompressedCache(model, None)
    _, full_logits = _eager(model, full, prefill(model, full, ids), N)
    assert max(float((a - b).abs().max()) for a, b in zip(logits, full_logits)) > 1e-3


def _same_history(eager_sel, sap):
    for i in range(len(sap.hist)):
        if not sap.sparse(i):
            continue
        want = eager_sel.state[i]["hist"]  # (b, hq, T, W)
        T, W = want.shape[2], want.shape[3]
        c = int(sap.rows[i])
        ring = [(c - T + t) % sap.history for t in range(T)]
        got = sap.hist[i][ring].permute(1, 2, 0, 3)
        torch.testing.assert_close(got[..., :W], want, atol=1e-6, rtol=1e-5)
        assert not got[..., W:].any()
        # the calibration rows are full rows (every page of the row > 0), the others zero off the chosen pages
        steps = eager_sel.state[i]["step"]
        calib = [T - 1 - (steps - s) for s in range(1, steps + 1) if s % 5 == 0]
        assert calib and all(bool((want[:, :, t, :3] > 0).all()) for t in calib)
        assert bool((want[:, :, -1 if steps % 5 else -2] == 0).any())


def test_static_ap_batch_of_two(model, recorded):
    """A batch of 2 (no padding), dense layers (0,): layers 1-3 select."""
    ids = _ids(2, 100, seed=4)
    c1, f1 = _cache(model, ids, dense_layers=(0,))
    ref, ref_logits = _eager(model, c1, f1, N)
    c2, f2 = _cache(model, ids, dense_layers=(0,))
    static = StaticCompressedCache.from_cache(c2, N)
    logits = []
    assert static_greedy_decode(model, static, f2, N, set(), logits_out=logits) == ref
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, **TOL)
    eager, st = recorded
    assert {li for li, *_ in st} == {1, 2, 3}
    _same_pages(eager, st)


def test_compiled_step_equals_uncompiled_one_graph(model):
    """fullgraph, aot_eager: the same tokens and logits; one graph (a calibration step's full row is written by
    `after_step`, eagerly, after the compiled step), no graph break."""
    ids = _ids()
    check_compiled_static_step(model, lambda: _cache(model, ids), N, TOL, graphs=1)


class _Layer(SimpleNamespace):
    """The eager selector's view of a layer: the first `n_stored` slots of `all_keys`."""

    def selected_keys(self, idx):
        return self.keys.gather(2, idx[..., None].expand(*idx.shape, self.keys.shape[-1]))


@pytest.mark.parametrize("rows", [64, 20, 3])
def test_static_rule_is_the_eager_rule_on_random_histories(rows):
    """StaticAttentionPredictor.select against AttentionPredictor.select on the same random history (`rows` rows:
    full and sliding, growing, too few for the interior rows) and keys, 4 query heads per kv head, 2 rows, 40 steps
    from slot 100: pages leave the local window at slots 112, 128 (the middle widens), calibration every 5 steps."""
    from kvsqueeze.storage.static import StaticSlots

    g = torch.Generator().manual_seed(11)
    b, hk, hq, d, n0, steps, cap = 2, 2, 8, 16, 100, 40, 160
    keys = torch.randn(b, hk, n0 + steps, d, generator=g) * torch.rand(1, 1, n0 + steps, 1, generator=g) * 3
    sel = _selector(64, dense_layers=())
    sel.scaling = {0: 0.25}
    sel._incremental = IncrementalCNN(sel.net)  # what setup(model) builds
    hist = torch.rand(b, hq, rows, 7, generator=g) ** 4
    sel.state[0] = {"hist": hist.clone(), "n": n0}
    slots = StaticSlots(1, b, hk, cap, d, torch.float32, "cpu")
    slots.load(0, keys[:, :, :n0], keys[:, :, :n0], torch.arange(n0).expand(b, hk, -1), None)
    sap = StaticAttentionPredictor(sel, slots, hq)
    sap.load(sel, [n0])
    moved = set()
    for s in range(steps):
        n = n0 + s + 1
        slots.keys[0][:, :, n - 1] = keys[:, :, n - 1]
        slots.valid[0][:, :, n - 1] = True
        slots.write[0] = n - 1
        layer = _Layer(n_stored=n, keys=keys[:, :, :n], valid=None, version=n,
                       positions=torch.arange(n).expand(b, hk, -1))
        query = torch.randn(b, hq, 1, d, generator=g) * torch.tensor([0.2, 1, 2, 4] * 2).view(1, hq, 1, 1)
        want = sel.select(0, layer, query)
        sap.host_step()
        pages = sap.select(0, query, 0.25)
        sap.observe(0, query, 0.25, pages)
        sap.after_step()
        got = (pages[..., None] * 16 + torch.arange(16)).flatten(-2)
        assert want is not None
        assert [[[x for x in r if x < n] for r in h] for h in got.tolist()] == want.tolist()
        moved.add(tuple(pages.flatten().tolist()))
    assert len(moved) > 5
    _same_history(sel, sap)


def test_history_bytes_count_in_the_stats(model):
    c, _ = _cache(model, _ids())
    st = StaticCompressedCache.from_cache(c, 4)
    P = st.slots.capacity // 16
    # hist (64, 1, 4 heads, P) + z (64, 4, P + 1), float32, sparse layers 2 and 3
    assert st.pages.nbytes() == 2 * 4 * (64 * 4 * P + 64 * 4 * (P + 1))
    assert st.stats().total_bytes == st.slots.nbytes() + st.slots.table_nbytes() + st.pages.nbytes()


def test_what_the_static_ap_step_refuses(model):
    ids = _ids(1, 100)
    c = kq.CompressedCache(model, None, selector=AttentionPredictor(64, predictor=LastRow(), sink=16, local=16))
    prefill(model, c, ids)
    with pytest.raises(kq.KVSqueezeError, match="PredictorNet"):
        StaticCompressedCache.from_cache(c, 4)
    c, _ = _cache(model, ids, budget=72)
    with pytest.raises(kq.KVSqueezeError, match="multiple of the page"):
        StaticCompressedCache.from_cache(c, 4)
    c, _ = _cache(model, ids, track_recovery=True)
    with pytest.raises(kq.KVSqueezeError, match="recovery"):
        StaticCompressedCache.from_cache(c, 4)
    c, _ = _cache(model, ids, get_method("knorm", budget=64, compression_interval=1))
    with pytest.raises(kq.KVSqueezeError, match="decode-time eviction"):
        StaticCompressedCache.from_cache(c, 4)
    # a prefill compression resets the eager history (the layer holds fewer slots); the next step would be dense
    # over more than the budget
    c, _ = _cache(model, _ids(1, 200), get_method("snapkv", compression_ratio=0.5, window=8))
    with pytest.raises(kq.KVSqueezeError, match="no attention history"):
        StaticCompressedCache.from_cache(c, 4)


def test_a_forward_that_drops_the_pages_is_refused(model, monkeypatch):
    c, f = _cache(model, _ids())
    st = StaticCompressedCache.from_cache(c, N)
    monkeypatch.setattr(StaticCompressedCache, "forward_kwargs", lambda self: {})
    with pytest.raises(kq.KVSqueezeError, match="keyword arguments"):
        StaticDecoder(model, st)(f.argmax(-1))


@pytest.mark.parametrize("calibrate", [False, True])
def test_compiled_history_update_stays_in_place(calibrate):
    """The compiled step (inductor) writes one history row and the z rows / columns it recomputes in place: its
    code never loops over a whole history or z buffer (a copy out and back per layer and step would cost more
    than the selection), and it selects and updates what the uncompiled step does."""
    import re

    from torch._inductor.utils import run_and_get_code

    from kvsqueeze.storage.static import StaticSlots

    b, hk, hq, d, cap, n, H = 1, 2, 8, 16, 160, 120, 8

    def build():
        g = torch.Generator().manual_seed(0)
        slots = StaticSlots(1, b, hk, cap, d, torch.float32, "cpu")
        keys = torch.randn(b, hk, n, d, generator=g)
        slots.load(0, keys, keys, torch.arange(n).expand(b, hk, -1), None)
        slots.write[0] = n - 1
        sel = AttentionPredictor(48, predictor=PredictorNet().init_blend(noise=0.3), sink=16, local=16,
                                 history=H, dense_layers=())
        sel.state[0] = {"hist": torch.rand(b, hq, H, 8, generator=g), "n": n - 1}
        sap = StaticAttentionPredictor(sel, slots, hq)
        sap.load(sel, [n - 1])
        sap._calib = (calibrate,)
        return sap

    q = torch.randn(b, hq, 1, d, generator=torch.Generator().manual_seed(1))
    eager, comp = build(), build()
    def step(sap):
        pages = sap.select(0, q, 0.25)
        sap.observe(0, q, 0.25, pages)
        return pages

    want = step(eager)
    eager.after_step()  # a calibration step: the full row replaces the selected one (eagerly, both)
    torch._dynamo.reset()
    got, code = run_and_get_code(torch.compile(lambda: step(comp), fullgraph=True))
    comp.after_step()
    bounds = {int(x) for x in re.findall(r"static_cast<int64_t>\((\d+)L\)", "\n".join(code))}
    assert comp.hist[0].numel() == H * hq * 10 and comp.z[0].numel() == H * hq * 11
    assert not bounds & {comp.hist[0].numel(), comp.z[0].numel()}, "the compiled step copies a whole buffer"
    assert torch.equal(want, got)
    torch.testing.assert_close(comp.hist[0], eager.hist[0])
    torch.testing.assert_close(comp.z[0][..., :10], eager.z[0][..., :10], atol=1e-6, rtol=1e-5)  # not the scratch
    assert int(comp.rows[0]) == H + 1 and comp.wprev[0].tolist() == [[8, 8]]


def test_cli_generate_compile_with_attention_predictor(tmp_path, monkeypatch):
    """`kvsqueeze generate --select attention_predictor --compile` answers what the eager AttentionPredictor loop
    answers (a predictor at its blend init stands in for a trained one; a budget that is not a whole number of
    pages is rounded down to whole pages)."""
    from click.testing import CliRunner

    from conftest import own_cache, save_tiny_llama_with_smollm2_tokenizer
    from kvsqueeze.cli import main
    from kvsqueeze.selection import attention_predictor, save_predictor

    path = save_predictor(PredictorNet().init_blend(noise=0.3), tmp_path / "ap.safetensors")
    monkeypatch.setattr(attention_predictor, "predictor_path", lambda model: path)
    d = save_tiny_llama_with_smollm2_tokenizer(tmp_path / "tiny")
    ctx = tmp_path / "c.txt"
    ctx.write_text("The passkey is 4821. Remember it well, it matters later on. " * 12)
    base = ["generate", "--model", str(d), "--context-file", str(ctx), "--question", "What is the passkey?",
            "--method", "full", "--max-new-tokens", "8", "--select", "attention_predictor", "--select-budget", "72"]
    with own_cache(tmp_path / "cache"):
        eager = CliRunner().invoke(main, base[:-1] + ["64"])
        assert eager.exit_code == 0, eager.output
        compiled = CliRunner().invoke(main, base + ["--compile"])
        assert compiled.exit_code == 0, compiled.output
    assert compiled.output.splitlines()[0] == eager.output.splitlines()[0]
    assert "attention_predictor(budget=64" in compiled.output
    # offloaded, with the cross-token prefetch: the same answer, the pages copied ahead counted
    with own_cache(tmp_path / "cache"):
        ahead = CliRunner().invoke(main, base + ["--compile", "--offload", "cpu", "--prefetch"])
    assert ahead.exit_code == 0, ahead.output
    assert ahead.output.splitlines()[0] == eager.output.splitlines()[0]
    line = next(x for x in ahead.output.splitlines() if x.startswith("offload:"))
    assert "copied a step ahead" in line, line
    from conftest import assert_one_error_line

    assert_one_error_line(base + ["--compile", "--prefetch"], "--prefetch copies AttentionPredictor's next pages")
    quest = [x if x != "attention_predictor" else "quest" for x in base]
    assert_one_error_line(quest + ["--compile", "--offload", "cpu", "--prefetch"], "--select attention_predictor")


def test_generate_with_a_static_ap_cache(model):
    """model.generate over the static copy (uncompiled, driven by the routing hooks: the host step counter advances
    there too, so the calibration rows fall on the eager steps) gives generate()'s tokens over the eager cache
    prefilled the same way (all but the last prompt token)."""
    from conftest import kv

    ids = _ids()
    eager = kq.CompressedCache(model, None, selector=_selector())
    prefill(model, eager, ids[:, :-1])
    ref = model.generate(ids, **kv(eager), max_new_tokens=N, do_sample=False, pad_token_id=0)
    c = kq.CompressedCache(model, None, selector=_selector())
    prefill(model, c, ids[:, :-1])
    static = StaticCompressedCache.from_cache(c, N)
    got = model.generate(ids, **kv(static), max_new_tokens=N, do_sample=False, pad_token_id=0)
    assert got.tolist() == ref.tolist()
    _same_history(eager.selector, static.pages)


def test_a_history_reset_by_the_prefill_compression_regrows(model, recorded):
    """SnapKV keeps 40 of 100 prompt slots: the eager selector drops the prompt's history at the first step (the
    layer holds fewer slots) and attends densely, one full row per step, until the layer holds more than the budget
    (48); then it selects from a history of 8 and more rows. The static step does the same, step by step."""
    ids = _ids()
    meth = lambda: get_method("snapkv", compression_ratio=0.6, window=8)  # noqa: E731
    n = 24
    c1, f1 = _cache(model, ids, meth(), budget=48)
    ref, ref_logits = _eager(model, c1, f1, n)
    c2, f2 = _cache(model, ids, meth(), budget=48)
    static = StaticCompressedCache.from_cache(c2, n)
    assert int(static.pages.rows[2]) == 0  # no history carried over
    logits = []
    assert static_greedy_decode(model, static, f2, n, set(), logits_out=logits) == ref
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, **TOL)
    eager, st = recorded  # the eager records the steps over more than the budget only (the others are dense)
    dense = [pages for _, pages, write in st if int(write.max()) + 1 <= 48]
    assert len(dense) >= 8 * 2 and all(p.tolist() == [[[0, 1, 2]] * 2] for p in dense)
    sparse = [e for e in st if int(e[2].max()) + 1 > 48]
    assert len(sparse) >= 6 * 2 and all(idx is not None for _, idx in eager)
    _same_pages(eager, sparse, min_sparse=6 * 2)
    _same_history(c1.selector, static.pages)


def test_a_capacity_below_the_budget_is_dense(model):
    """A static capacity of fewer pages than the budget (40 prompt tokens + 4, budget 64): every step attends to
    every page, as the eager steps (n <= budget) do; the first-step check of the route passes."""
    ids = _ids(1, 40)
    c1, f1 = _cache(model, ids)
    ref, ref_logits = _eager(model, c1, f1, 4)
    c2, f2 = _cache(model, ids)
    st = StaticCompressedCache.from_cache(c2, 4)
    assert st.slots.capacity // 16 < st.pages.k_pages
    logits = []
    assert static_greedy_decode(model, st, f2, 4, set(), logits_out=logits) == ref
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, **TOL)
    assert st.pages.chosen[2].tolist() == [[[0, 1, 2]] * 2]
