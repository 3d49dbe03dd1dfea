"""Quest in the static decode step (issue 12, item 2): the static step picks the same pages as the eager Quest
(selection/quest.py) and gives the same greedy tokens and logits, uncompiled and compiled (fullgraph, aot_eager);
its page metadata kept on the device equals a rebuild from the slots; the selection matters (the logits differ
from the full cache's); what it cannot run is refused. The Triton page kernel: tests/test_page_decode.py."""

import os

import pytest
import torch

import kvsqueeze as kq
from kvsqueeze.methods import get_method
from kvsqueeze.runtime.generate import decode_step, prefill
from kvsqueeze.runtime.static import StaticCompressedCache, StaticDecoder, static_greedy_decode
from kvsqueeze.selection import Quest
from kvsqueeze.selection.static_quest import StaticQuest

from conftest import check_compiled_static_step, kv, tiny_llama

TOL = dict(atol=1e-5, rtol=1e-5)
N = 12  # tokens generated
T = 100  # prompt tokens: budget 32 (2 pages) is well below the context, so the selection matters


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """One torch thread (conftest's `one_thread`)."""


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def _ids(b=1, t=T, seed=0):
    return torch.randint(1, 101, (b, t), generator=torch.Generator().manual_seed(seed))


def _cache(model, ids, method=None, **quest):
    c = kq.CompressedCache(model, method, selector=Quest(quest.pop("budget", 32), **quest))
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


def _triton_runs() -> bool:
    """The Triton page kernel runs on this file's CPU model: under Triton's interpreter (TRITON_INTERPRET=1; on
    CUDA, tests/test_gpu_static.py runs it)."""
    from kvsqueeze.kernels.split_kv import triton

    return triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def recorded(monkeypatch):
    """Record the slots the eager Quest attends to and the pages the static one picks, per sparse step."""
    eager, static = [], []
    quest_select, static_select = Quest._select, StaticQuest.select

    def rec_eager(self, layer_idx, layer, query):
        idx = quest_select(self, layer_idx, layer, query)
        if idx is not None:
            eager.append((layer_idx, idx.clone()))
        return idx

    def rec_static(self, layer_idx, query, scaling):
        pages = static_select(self, layer_idx, query, scaling)
        if pages is not None:
            static.append((layer_idx, pages.clone(), int(self.slots.write[layer_idx].max())))
        return pages

    monkeypatch.setattr(Quest, "_select", rec_eager)
    monkeypatch.setattr(StaticQuest, "select", rec_static)
    return eager, static


def _same_pages(eager, static, page=16):
    """Every sparse eager step's slots are the static step's pages (cut at the slots written so far)."""
    assert eager and len(eager) == len(static)
    moved = set()
    for (le, idx), (ls, pages, write) in zip(eager, static):
        assert le == ls
        slots = (pages[..., None] * page + torch.arange(page)).flatten(-2)
        for b in range(idx.shape[0]):
            for h in range(idx.shape[1]):
                want = idx[b, h].tolist()
                assert [s for s in slots[b, h].tolist() if s <= write] == want
                moved.add(tuple(want[:-1]))
    assert len(moved) > 1  # the choice changes between steps / heads / layers: not a fixed window


@pytest.mark.parametrize("gqa", ["max", "raw", "mean"])
@pytest.mark.parametrize("kernel", [None, "matmul", "eager", "triton"])
def test_static_quest_picks_eager_pages_and_gives_eager_tokens(model, recorded, gqa, kernel):
    if kernel == "triton" and not _triton_runs():
        pytest.skip("TRITON_INTERPRET=1 and triton needed")
    ids = _ids()
    c1, f1 = _cache(model, ids, gqa=gqa)
    ref, ref_logits = _eager(model, c1, f1, N)
    c2, f2 = _cache(model, ids, gqa=gqa)
    static = StaticCompressedCache.from_cache(c2, N)
    assert static.pages is not None and static.pages.k_pages == 2
    logits = []
    got = static_greedy_decode(model, static, f2, N, set(), logits_out=logits, kernel=kernel)
    assert got == ref
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, **TOL)
    _same_pages(*recorded)
    # the selection matters: the full cache's logits differ
    full = kq.CompressedCache(model, None)
    _, full_logits = _eager(model, full, prefill(model, full, ids), N)
    assert max(float((a - b).abs().max()) for a, b in zip(logits, full_logits)) > 1e-3


def test_static_quest_batch_and_prefill_compression(model, recorded):
    """A batch of 2 (no padding) over a SnapKV-compressed prefill, budget 48 (3 pages), dense layers (0,)."""
    ids = _ids(2, 120, seed=4)
    meth = lambda: get_method("snapkv", compression_ratio=0.25, window=8)  # noqa: E731
    c1, f1 = _cache(model, ids, meth(), budget=48, dense_layers=(0,))
    ref, ref_logits = _eager(model, c1, f1, N)
    c2, f2 = _cache(model, ids, meth(), budget=48, dense_layers=(0,))
    static = StaticCompressedCache.from_cache(c2, N)
    logits = []
    assert static_greedy_decode(model, static, f2, N, set(), logits_out=logits) == ref
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, **TOL)
    _same_pages(*recorded)
    assert {li for li, *_ in recorded[1]} == {1, 2, 3}


def test_page_metadata_kept_on_the_device_equals_a_rebuild(model):
    c, f = _cache(model, _ids())
    static = StaticCompressedCache.from_cache(c, N)
    static_greedy_decode(model, static, f, N, set())
    q = static.pages
    kept = [(t.clone(), u.clone()) for t, u in zip(q.kmin, q.kmax) if t is not None]
    assert any(bool((t != 0).any()) for t, _ in kept)
    q.load()
    for (a, b), t, u in zip(kept, [t for t in q.kmin if t is not None], [u for u in q.kmax if u is not None]):
        torch.testing.assert_close(a, t, atol=0, rtol=0)
        torch.testing.assert_close(b, u, atol=0, rtol=0)
    # the written pages hold the decoded tokens: a page past the prompt is no longer empty
    assert bool((q.kmax[2][:, :, T // 16] != 0).any())


def test_compiled_step_equals_uncompiled_one_graph(model):
    ids = _ids()
    check_compiled_static_step(model, lambda: _cache(model, ids), N, TOL, graphs=1)


def test_generate_with_a_static_quest_cache(model):
    """model.generate over the static copy (uncompiled, driven by the routing hooks) gives generate()'s tokens over
    the eager Quest cache prefilled the same way (all but the last prompt token)."""
    ids = _ids()
    eager = kq.CompressedCache(model, None, selector=Quest(32))
    prefill(model, eager, ids[:, :-1])
    ref = model.generate(ids, **kv(eager), max_new_tokens=N, do_sample=False, pad_token_id=0)
    c = kq.CompressedCache(model, None, selector=Quest(32))
    prefill(model, c, ids[:, :-1])
    got = model.generate(ids, **kv(StaticCompressedCache.from_cache(c, N)), max_new_tokens=N, do_sample=False,
                         pad_token_id=0)
    assert got.tolist() == ref.tolist()


def test_what_the_static_quest_step_refuses(model):
    from kvsqueeze.selection import Selector

    ids = _ids(1, 40)
    c = kq.CompressedCache(model, None, selector=Selector(48))  # a selector with no static counterpart
    prefill(model, c, ids)
    with pytest.raises(kq.KVSqueezeError, match="Selector.*eager"):
        StaticCompressedCache.from_cache(c, 4)
    c, _ = _cache(model, ids, get_method("knorm", budget=32, compression_interval=1))
    with pytest.raises(kq.KVSqueezeError, match="decode-time eviction"):
        StaticCompressedCache.from_cache(c, 4)
    c, _ = _cache(model, ids, budget=40)
    with pytest.raises(kq.KVSqueezeError, match="multiple of the page"):
        StaticCompressedCache.from_cache(c, 4)
    c, _ = _cache(model, ids, track_recovery=True)
    with pytest.raises(kq.KVSqueezeError, match="recovery"):
        StaticCompressedCache.from_cache(c, 4)


def test_capacity_holds_whole_pages(model):
    c, _ = _cache(model, _ids(1, 40), page=32, budget=64)
    st = StaticCompressedCache.from_cache(c, 3)
    assert st.slots.capacity % 32 == 0 and st.slots.capacity >= 43
    assert st.pages.n_pages == st.slots.capacity // 32
    # the page metadata counts in the bytes held: min and max, float32 (4 bytes), per channel (16), page, kv head
    # (2) and sparse layer (2 and 3)
    assert st.stats().total_bytes == (st.slots.nbytes() + st.slots.table_nbytes()
                                      + 2 * 2 * 2 * st.pages.n_pages * 16 * 4)
    StaticDecoder(model, st)  # builds


@pytest.mark.parametrize("gqa", ["max", "raw", "mean"])
def test_static_selection_is_the_eager_rule_on_random_keys(gqa):
    """StaticQuest.select against Quest._select on the same keys (4 query heads per kv head of very different
    norms, up to 150 of 256 slots filled: many empty pages the softmax must not count), for several write slots."""
    from types import SimpleNamespace

    from kvsqueeze.storage.static import StaticSlots

    g = torch.Generator().manual_seed(7)
    b, hk, hq, cap, d, n = 2, 2, 8, 256, 16, 150
    keys = torch.randn(b, hk, n, d, generator=g) * torch.rand(1, 1, n, 1, generator=g) * 3
    slots = StaticSlots(4, b, hk, cap, d, torch.float32, "cpu")
    quest = Quest(48, gqa=gqa, dense_layers=())
    sq = StaticQuest(quest, slots)
    moved = set()
    for write in (95, 120, 149):  # the current token's slot: the eager layer holds write + 1 slots
        for i in range(4):
            slots.load(i, keys[:, :, : write + 1], keys[:, :, : write + 1], torch.arange(write + 1).expand(b, hk, -1),
                       None)
        sq.load()
        assert slots.write[2].eq(write + 1).all()
        slots.write[2] = write
        layer = SimpleNamespace(n_stored=write + 1, keys=keys[:, :, : write + 1], valid=None, version=write)
        for _ in range(8):  # queries of several draws: heads of the group take turns deciding the ranking
            quest.reset()
            query = torch.randn(b, hq, 1, d, generator=g) * torch.tensor([0.2, 1, 2, 4] * 2).view(1, hq, 1, 1)
            want = quest._select(2, layer, query)
            pages = sq.select(2, query, 0.25 if gqa != "raw" else None)
            got = (pages[..., None] * 16 + torch.arange(16)).flatten(-2)
            assert got[..., : want.shape[-1]].tolist() == want.tolist()
            moved.add(tuple(pages.flatten().tolist()))
    assert len(moved) > 3


def test_cli_generate_compile_with_quest(tmp_path):
    """`kvsqueeze generate --select quest --compile` answers what the eager Quest loop answers (a budget that is not
    a whole number of pages is rounded down to whole pages, as --select-budget's help says)."""
    from click.testing import CliRunner

    from conftest import own_cache, save_tiny_llama_with_smollm2_tokenizer
    from kvsqueeze.cli import main

    d = save_tiny_llama_with_smollm2_tokenizer(tmp_path / "tiny")
    ctx = tmp_path / "c.txt"
    ctx.write_text("The passkey is 4821. Remember it well, it matters later on. " * 12)
    base = ["generate", "--model", str(d), "--context-file", str(ctx), "--question", "What is the passkey?",
            "--method", "full", "--max-new-tokens", "8", "--select", "quest", "--select-budget", "40"]
    with own_cache(tmp_path / "cache"):
        eager = CliRunner().invoke(main, base[:-1] + ["32"])
        assert eager.exit_code == 0, eager.output
        compiled = CliRunner().invoke(main, base + ["--compile"])
        assert compiled.exit_code == 0, compiled.output
    assert compiled.output.splitlines()[0] == eager.output.splitlines()[0]
    assert "quest(budget=32)" in compiled.output


def test_a_forward_that_drops_the_pages_is_refused(model, monkeypatch):
    """A model whose forward would not hand `kvsqueeze_pages` down to its attention (the step would silently attend
    densely) is refused after the first step."""
    c, f = _cache(model, _ids())
    st = StaticCompressedCache.from_cache(c, N)
    monkeypatch.setattr(StaticCompressedCache, "forward_kwargs", lambda self: {})
    with pytest.raises(kq.KVSqueezeError, match="keyword arguments"):
        StaticDecoder(model, st)(f.argmax(-1))


def test_compiled_metadata_refresh_stays_in_place():
    """The per-step metadata write (`StaticQuest.refresh`) compiles to an in-place store of one page per (row, kv
    head): inductor's code never loops over a whole metadata buffer (a copy out and back per layer and step would
    cost as much as reading the metadata), and the compiled refresh equals the eager one."""
    import re

    from torch._inductor.utils import run_and_get_code

    from kvsqueeze.selection import Quest
    from kvsqueeze.selection.static_quest import StaticQuest
    from kvsqueeze.storage.static import StaticSlots

    def build():  # 2 layers, 2 rows, 2 kv heads, 64 slots, head_dim 8; pages of 16: kmin / kmax have 128 values each
        s = StaticSlots(2, 2, 2, 64, 8, torch.float32, "cpu")
        g = torch.Generator().manual_seed(3)
        for i in range(2):
            s.keys[i].copy_(torch.randn(s.keys[i].shape, generator=g))
        s.valid[..., :40] = True
        s.write.copy_(torch.tensor([[[39, 20], [5, 63]], [[17, 33], [48, 2]]]))
        q = StaticQuest(Quest(32, dense_layers=()), s)
        q.load()
        s.keys[1].mul_(2.0)  # the refreshed pages change
        return q

    eager, comp = build(), build()
    eager.refresh(1)
    torch._dynamo.reset()
    _, code = run_and_get_code(torch.compile(lambda: comp.refresh(1), fullgraph=True))
    bounds = [int(n) for n in re.findall(r"x0<static_cast<int64_t>\((\d+)L\)", "\n".join(code))]
    assert comp.kmin[1].numel() == 128 and 128 not in bounds, "the compiled refresh copies a whole metadata buffer"
    assert torch.equal(eager.kmin[1], comp.kmin[1]) and torch.equal(eager.kmax[1], comp.kmax[1])
    assert not torch.equal(comp.kmax[1], build().kmax[1])  # the write happened


def test_compiled_selection_at_128k_widths_equals_uncompiled():
    """At 128k's widths (8,192 pages per kv head, budget 4096 = K 256 pages: the top-k and the sort of its indices
    over 256 values per row, the widths at which the H200's compiled offloaded step once hit an index assert,
    traced to the frames' fetch), the compiled selection (inductor; on CUDA where there is one, in the keys' dtype
    there) picks the uncompiled one's pages: K distinct increasing pages per (row, kv head), the page being written
    among them."""
    from kvsqueeze.selection import Quest
    from kvsqueeze.selection.static_quest import StaticQuest
    from kvsqueeze.storage.static import StaticSlots

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    b, hk, hq, d, cap = 1, 2, 4, 16, 131072
    g = torch.Generator().manual_seed(5)
    s = StaticSlots(3, b, hk, cap, d, dtype, dev)
    n = cap - 40
    keys = (torch.randn(b, hk, n, d, generator=g) * torch.rand(1, 1, n, 1, generator=g) * 3).to(dev, dtype)
    for i in range(3):
        s.load(i, keys, keys, torch.arange(n, device=dev).expand(b, hk, -1), None)
    s.write[2] = n - 1
    sq = StaticQuest(Quest(4096, dense_layers=()), s)
    sq.load()
    queries = [(torch.randn(b, hq, 1, d, generator=g) * 2).to(dev, dtype) for _ in range(4)]
    want = [sq.select(2, q, d ** -0.5).clone() for q in queries]
    torch._dynamo.reset()
    sel = torch.compile(lambda q: sq.select(2, q, d ** -0.5), fullgraph=True)
    got = [sel(q).clone() for q in queries]
    for w, x in zip(want, got):
        assert x.shape[-1] == 256 and bool((x.diff(dim=-1) > 0).all()) and bool((x == (n - 1) // 16).any(-1).all())
        assert torch.equal(w, x)
