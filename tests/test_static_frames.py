"""Device page frames of an offloaded static cache (storage/frames.py, kernels/page_copy.py, the frames path of
kernels/page_decode.py): after every fetch the frames hold exactly the selected pages with their host contents,
only the pages missing from the step before (and the page being written) are copied, and the page attention over
the frames equals the in-place read.

The kernels run on CUDA, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1); the torch references
everywhere. The step-level equality (offloaded with frames vs on the device, uncompiled and compiled, Quest and
AttentionPredictor) is in tests/test_static_offload.py.
"""

import os

import pytest
import torch

from kvsqueeze.kernels.page_copy import copy_pages, reference_copy_pages
from kvsqueeze.kernels.page_decode import page_decode_attention, reference_page_decode
from kvsqueeze.kernels.split_kv import triton
from kvsqueeze.storage.frames import StaticFrames
from kvsqueeze.storage.static import StaticSlots

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
kernel_runs = pytest.mark.skipif(triton is None or (not CUDA and os.environ.get("TRITON_INTERPRET") != "1"),
                                 reason="triton with CUDA or TRITON_INTERPRET=1 needed")
PAGE = 4


def _slots(b=2, h=3, pages=10, d=8, layers=2):
    s = StaticSlots(layers, b, h, pages * PAGE, d, torch.float32, DEV, host_layers=[1])
    g = torch.Generator().manual_seed(0)
    for i in range(layers):
        s.keys[i].copy_(torch.randn(s.keys[i].shape, generator=g))
        s.values[i].copy_(torch.randn(s.values[i].shape, generator=g))
    return s


def _frame_contents(frames, layer, frame_of):
    b, h, k = frame_of.shape
    offs = torch.arange(PAGE, device=frame_of.device)
    idx = (frame_of[..., None] * PAGE + offs).view(b, h, k * PAGE)
    return frames.keys[layer].gather(2, idx[..., None].expand(-1, -1, -1, frames.keys[layer].shape[-1]))


def _host_contents(slots, layer, pages):
    b, h, k = pages.shape
    offs = torch.arange(PAGE, device=pages.device)
    idx = (pages[..., None] * PAGE + offs).view(b, h, k * PAGE)
    return slots.keys[layer].gather(2, idx[..., None].expand(-1, -1, -1, slots.keys[layer].shape[-1]))


@pytest.mark.parametrize("n_frames", [4, 7])
def test_frames_hold_the_selected_pages_and_copy_only_the_missing_ones(n_frames):
    """Random page sets of 4 over 12 steps, with a write into the current page between steps, F = 4 or 7 frames:
    after every fetch each selected page's frame equals its host page (the written page copied again), every
    resident frame equals its host page (nothing stale stays), and the hits are the selected pages (but the
    written one) the table held before the fetch; with F = K the frames hold exactly the step's pages."""
    s = _slots()
    k = 4
    fr = StaticFrames(s, PAGE, n_frames)
    g = torch.Generator().manual_seed(1)
    b, h = s.batch, s.kv_heads
    n_pages = s.capacity // PAGE
    for step in range(12):
        s.write[1] = torch.randint(0, s.capacity, (b, h), generator=g).to(DEV)
        writing = s.write[1] // PAGE
        s.keys[1][0, 0, int(s.write[1][0, 0])] += 1.0  # this step's token changes the page being written
        # k distinct pages, the current one among them (Quest and AttentionPredictor always select it)
        pages = torch.stack([torch.stack([
            torch.cat([writing[bi, hi, None].cpu(),
                       torch.tensor([p for p in torch.randperm(n_pages, generator=g).tolist()
                                     if p != int(writing[bi, hi])][:k - 1])]).sort().values
            for hi in range(h)]) for bi in range(b)]).to(DEV)
        table = fr.frame_page[1].clone()
        before = fr.counts[1].clone()
        keys, values, frame_of = fr.fetch(1, pages)
        assert torch.equal(_frame_contents(fr, 1, frame_of), _host_contents(s, 1, pages))
        held = fr.frame_page[1]
        for bi in range(b):
            for hi in range(h):
                for f, p in enumerate(held[bi, hi].tolist()):
                    if p >= 0:  # every resident page equals its host copy
                        assert torch.equal(fr.keys[1][bi, hi, f * PAGE:(f + 1) * PAGE],
                                           s.keys[1][bi, hi, p * PAGE:(p + 1) * PAGE]), (step, bi, hi, f, p)
                        assert torch.equal(fr.values[1][bi, hi, f * PAGE:(f + 1) * PAGE],
                                           s.values[1][bi, hi, p * PAGE:(p + 1) * PAGE])
                assert len([p for p in held[bi, hi].tolist() if p >= 0]) == \
                    len({p for p in held[bi, hi].tolist() if p >= 0})  # a page in one frame at most
        if n_frames == k:
            assert sorted(held.flatten().tolist()) == sorted(pages.flatten().tolist())
        expect_hits = sum(len((set(pages[bi, hi].tolist()) - {int(writing[bi, hi])}) & set(table[bi, hi].tolist()))
                          for bi in range(b) for hi in range(h))
        assert int(fr.counts[1, 1] - before[1]) == expect_hits
        assert int(fr.counts[1, 0] - before[0]) == pages.numel()
    t = fr.traffic()
    assert t["needed"] == 12 * b * h * k and 0 < t["hits"] < t["needed"]
    assert t["hit_rate_after_first"] == pytest.approx(t["hits"] / (11 * b * h * k))
    assert t["bytes_moved"] == (t["needed"] - t["hits"]) * PAGE * 2 * 8 * 4
    assert not fr.holds(0) and fr.holds(1) and fr.nbytes() == 2 * b * h * n_frames * PAGE * 8 * 4


def test_more_frames_keep_recent_pages_resident():
    """Page sets A, B, A (the written page 0 in all): with F = K the third step copies A's pages again; with F = 2K
    they are still resident (least recently used frames are reused first)."""
    hits = {}
    for n_frames in (3, 6):
        s = _slots(b=1, h=1)
        fr = StaticFrames(s, PAGE, n_frames)
        s.write[1] = torch.tensor([[1]], device=DEV)  # page 0
        for sel in ([0, 2, 4], [0, 5, 7], [0, 2, 4]):
            before = int(fr.counts[1, 1])
            fr.fetch(1, torch.tensor([[sel]], device=DEV))
        hits[n_frames] = int(fr.counts[1, 1]) - before
    assert hits == {3: 0, 6: 2}


def test_a_stale_copy_of_the_written_page_is_dropped():
    """A frame holding the page being written, when that page is not selected, is emptied (its copy is stale)."""
    s = _slots(b=1, h=1)
    fr = StaticFrames(s, PAGE, 4)
    s.write[1] = torch.tensor([[1]], device=DEV)
    fr.fetch(1, torch.tensor([[[0, 2]]], device=DEV))
    assert 0 in fr.frame_page[1].flatten().tolist()
    s.write[1] = torch.tensor([[2]], device=DEV)  # still page 0, now not selected
    fr.fetch(1, torch.tensor([[[3, 5]]], device=DEV))
    assert 0 not in fr.frame_page[1].flatten().tolist() and 2 in fr.frame_page[1].flatten().tolist()


def test_a_repeated_page_set_is_all_hits_but_the_written_page():
    s = _slots(b=1, h=2)
    fr = StaticFrames(s, PAGE, 3)
    s.write[1] = torch.tensor([[9, 9]], device=DEV)  # page 2
    pages = torch.tensor([[[0, 2, 5], [1, 2, 7]]], device=DEV)
    fr.fetch(1, pages)
    fr.fetch(1, pages)
    assert fr.counts[1].tolist() == [12, 4, 0]  # second step: 2 heads x (3 pages - the written one); none ahead


def test_prefetch_makes_the_next_fetch_hit_all_but_the_written_page():
    """`prefetch` (AttentionPredictor's next pages, during this step): the next step's fetch of those pages finds
    them resident but the page it writes into (not copied ahead: it changes first), their frames hold the host's
    pages, and the pages copied ahead are counted apart (counts[:, 2])."""
    s = _slots(b=1, h=2)
    fr = StaticFrames(s, PAGE, 4, prefetch=True)
    s.write[1] = torch.tensor([[PAGE - 1, 3 * PAGE - 1]], device=DEV)  # the next step writes pages 1 and 3
    fr.fetch(1, torch.tensor([[[0, 3, 4], [1, 2, 6]]], device=DEV))
    nxt = torch.tensor([[[1, 3, 5], [3, 6, 8]]], device=DEV)
    fr.prefetch(1, nxt)
    fr.join()
    assert fr.counts[1, 2].item() == 2  # pages 5 and 8 (3 and 6 resident; 1 and 3 are the next written pages)
    s.write[1] += 1  # the next step
    for h in range(2):  # its token changes the written page on the host
        w = int(s.write[1][0, h])
        s.keys[1][0, h, w] += 1.0
    k, v, frame_of = fr.fetch(1, nxt)
    assert fr.counts[1, :2].tolist() == [12, 4]  # the second fetch: 6 needed, 4 resident (not the written ones)
    for h in range(2):
        for i, p in enumerate(nxt[0, h].tolist()):
            f = int(frame_of[0, h, i])
            torch.testing.assert_close(k[0, h, f * PAGE:(f + 1) * PAGE], s.keys[1][0, h, p * PAGE:(p + 1) * PAGE])
    assert fr.traffic()["prefetched"] == 2


def test_prefetch_needs_prefetch_frames():
    s = _slots(b=1, h=2)
    fr = StaticFrames(s, PAGE, 4)
    assert not fr.prefetching and fr.load_next is None


@pytest.mark.parametrize("frac", [0.0, 0.3, 1.0])
def test_copy_pages_reference_moves_only_flagged_frames(frac):
    g = torch.Generator().manual_seed(2)
    src_k, src_v = torch.randn(2, 3, 40, 8, generator=g), torch.randn(2, 3, 40, 16, generator=g)
    dst_k, dst_v = torch.zeros(2, 3, 5 * PAGE, 8), torch.zeros(2, 3, 5 * PAGE, 16)
    fp = torch.randint(0, 10, (2, 3, 5), generator=g)
    load = torch.rand(2, 3, 5, generator=g) < frac
    reference_copy_pages(src_k, src_v, dst_k, dst_v, fp, load, PAGE)
    for bi in range(2):
        for hi in range(3):
            for f in range(5):
                got = dst_k[bi, hi, f * PAGE:(f + 1) * PAGE]
                want = src_k[bi, hi, fp[bi, hi, f] * PAGE:(fp[bi, hi, f] + 1) * PAGE] if load[bi, hi, f] \
                    else torch.zeros_like(got)
                assert torch.equal(got, want)


@kernel_runs
@pytest.mark.parametrize("d,dv", [(64, 64), (16, 32)])
def test_copy_pages_kernel_equals_the_reference(d, dv):
    g = torch.Generator().manual_seed(3)
    src_k, src_v = torch.randn(2, 3, 64, d, generator=g).to(DEV), torch.randn(2, 3, 64, dv, generator=g).to(DEV)
    fp = torch.randint(0, 64 // 16, (2, 3, 3), generator=g).to(DEV)
    load = (torch.rand(2, 3, 3, generator=g) < 0.5).to(DEV)
    outs = []
    for fn in (copy_pages, reference_copy_pages):
        dk = torch.full((2, 3, 48, d), -7.0, device=DEV)
        dv_ = torch.full((2, 3, 48, dv), -7.0, device=DEV)
        if fn is copy_pages and not CUDA:  # the interpreter: call the kernel path directly
            from kvsqueeze.kernels import page_copy

            page_copy._copy_pages[(6, 3)](
                src_k, src_v, dk, dv_, fp, load.view(torch.uint8), *src_k.stride()[:3], *src_v.stride()[:3],
                *dk.stride()[:3], *dv_.stride()[:3], *fp.stride(), HK=3, PAGE=16, D=d, DVAL=dv)
        else:
            fn(src_k, src_v, dk, dv_, fp, load, 16)
        outs.append((dk, dv_))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@kernel_runs
def test_page_kernel_over_frames_equals_the_in_place_read():
    """The page kernel reading keys / values from frames (frames=) gives the in-place result exactly."""
    g = torch.Generator().manual_seed(4)
    b, hq, hk, d, page, P, K = 1, 8, 2, 64, 16, 12, 5
    dt = torch.bfloat16 if CUDA else torch.float32
    q = torch.randn(b, hq, d, generator=g).to(DEV, dt)
    k = torch.randn(b, hk, P * page, d, generator=g).to(DEV, dt)
    v = torch.randn(b, hk, P * page, d, generator=g).to(DEV, dt)
    valid = torch.rand(b, hk, P * page, generator=g).to(DEV) < 0.8
    pages = torch.stack([torch.randperm(P, generator=g)[:K] for _ in range(hk)])[None].to(DEV)
    frame_of = torch.stack([torch.randperm(K, generator=g) for _ in range(hk)])[None].to(DEV)
    fk, fv = torch.zeros(b, hk, K * page, d, device=DEV, dtype=dt), torch.zeros(b, hk, K * page, d, device=DEV,
                                                                               dtype=dt)
    reference_copy_pages(k, v, fk, fv, torch.zeros_like(frame_of).scatter(-1, frame_of, pages),
                         torch.ones_like(frame_of, dtype=torch.bool), page)
    ref = page_decode_attention(q, k, v, valid, pages, page)
    got = page_decode_attention(q, fk, fv, valid, pages, page, frames=frame_of)
    assert torch.equal(got, ref)
    torch.testing.assert_close(reference_page_decode(q, fk, fv, valid, pages, page, frames=frame_of).float(),
                               ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("n_pages,n_frames,k", [(600, 256, 256), (600, 512, 256)])
def test_fetch_at_the_128k_widths_compiles_and_equals_eager(n_pages, n_frames, k):
    """At 128k's widths (K = 256 pages per step, F = K or 2K: where the H200's compiled step hit an index assert
    in an inductor kernel fusing the fetch's argmax with its scatters), the compiled fetch (inductor; on CUDA where there is one) equals the eager one over
    12 steps whose page sets overlap by about 70%: frame of each page, page table, counters."""
    import torch._dynamo

    g = torch.Generator().manual_seed(n_frames)
    sels, prev = [], torch.randperm(n_pages, generator=g)[:k]
    for _ in range(12):
        keep = prev[torch.rand(k, generator=g) < 0.7]
        rest = torch.randperm(n_pages, generator=g)
        rest = rest[~torch.isin(rest, keep)][: k - keep.numel()]
        prev = torch.cat([keep, rest])
        sels.append(prev.sort().values)
    runs = []
    for compiled in (False, True):
        s = _slots(b=1, h=2, pages=n_pages, d=4)
        fr = StaticFrames(s, PAGE, n_frames)
        fetch = fr.fetch
        if compiled:
            torch._dynamo.reset()
            fetch = torch.compile(fr.fetch, fullgraph=True)
        outs = []
        for sel in sels:
            s.write[1] = torch.full((1, 2), int(sel[-1]) * PAGE + 1, device=DEV)
            _, _, frame_of = fetch(1, torch.stack([sel, ((sel + 1) % n_pages).sort().values])[None].to(DEV))
            outs.append((frame_of.clone(), fr.frame_page.clone(), fr.counts.clone()))
        runs.append(outs)
    for a, b in zip(*runs):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert 0 < int(runs[1][-1][2][1, 1]) < int(runs[1][-1][2][1, 0])  # some hits, some copies


def test_fetch_compiles_with_inductor_and_equals_eager():
    """`fetch` inside a compiled step (inductor, fullgraph: what StaticDecoder(compile=True) builds on CUDA; here on
    the CPU) gives the eager result: frames, table, counters (inductor lowers no scatter of bools)."""
    import torch._dynamo

    runs = []
    for compiled in (False, True):
        s = _slots(b=1, h=2, pages=12)
        fr = StaticFrames(s, PAGE, 4)
        fetch = fr.fetch
        if compiled:
            torch._dynamo.reset()
            fetch = torch.compile(fr.fetch, backend="inductor", fullgraph=True)
        outs = []
        for step, sel in enumerate(([0, 3, 5, 9], [0, 3, 6, 9], [1, 3, 6, 10], [1, 3, 6, 10])):
            s.write[1] = torch.tensor([[4 * step + 1, 4 * step + 2]], device=DEV)  # pages 0/1, 1/2, 2/3, 3/4
            pages = torch.tensor([sel, sel], device=DEV)[None]
            k, v, frame_of = fetch(1, pages)
            outs.append((k.clone(), frame_of.clone(), fr.frame_page.clone(), fr.counts.clone()))
        runs.append(outs)
    for a, b in zip(*runs):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("n_frames", [1, 7, 256, 512])
def test_lru_order_is_the_stable_sort_of_the_ages_without_sorting(n_frames):
    """`_lru_order` (the frames' hand-out order, counted by comparisons: the compiled fetch does no sort, cumsum,
    argmax or scatter, after the H200's 128k index assert in an inductor kernel of the fetch) is the place of each
    frame in the stable ascending sort of its age, kept frames last: checked against torch.sort over ages
    with many ties (never used: -1, the same step) and random kept sets."""
    from kvsqueeze.storage.frames import _lru_order

    g = torch.Generator().manual_seed(n_frames)
    for trial in range(20):
        last = torch.randint(-1, 4 if trial % 2 else 10**6, (2, 3, n_frames), generator=g).to(DEV)
        kept = (torch.rand(2, 3, n_frames, generator=g) < (trial % 4) / 4).to(DEV)
        order = _lru_order(last, kept)
        age = torch.where(kept, torch.iinfo(torch.long).max, last)
        ref = torch.empty_like(order).scatter_(-1, age.sort(dim=-1, stable=True).indices,
                                               torch.arange(n_frames, device=DEV).expand_as(age).contiguous())
        assert torch.equal(order, ref)
