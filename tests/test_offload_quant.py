"""Offloading composed with KIVI (issue 13 item 4, `--quant kivi-2 --offload cpu|disk`): KIVI's packed storage as
the host tier, dequantized pages in the device frames (src/kvsqueeze/quant/offload.py), on tiny random Llamas on
the CPU. The reference everywhere is the same selector over `--quant kivi-2` on the device."""


import pytest
import torch

import kvsqueeze as kq
from kvsqueeze.quant import parse_quant
from kvsqueeze.quant.offload import KIVIOffloadStore
from kvsqueeze.storage.offload import OffloadLayer

from conftest import kv, tiny_llama
from offload_helpers import PinnedPages, decode, selector

KIVI2 = parse_quant("kivi-2").layer_factory
STEPS = 100  # 200 prompt tokens: 160 quantized after the prefill, residual 40; flushes after steps 24, 56 and 88


def _offloaded(cache):
    return [layer for layer in cache.layers if isinstance(layer, OffloadLayer)]


def _assert_frames_hold_host_copy(store: KIVIOffloadStore):
    """Every resident page's frame equals the host tier's view (dequantized) at the page's stored slots."""
    if store.kd is None:
        return
    k, v = (t.to(store.kd.device) for t in store.view())
    n, page = store.n, store.page
    for b, h, p in (store.page_frame >= 0).nonzero().tolist():
        f = int(store.page_frame[b, h, p])
        s = min(page, n - p * page)
        assert int(store.frame_page[b, h, f]) == p
        assert torch.equal(store.kd[b, h, f * page : f * page + s], k[b, h, p * page : p * page + s]), (b, h, p)
        assert torch.equal(store.vd[b, h, f * page : f * page + s], v[b, h, p * page : p * page + s]), (b, h, p)


@pytest.mark.parametrize("kind", ["quest", "ap"])
@pytest.mark.parametrize("case", ["plain", "chunked+snapkv", "few-frames", "disk", "batch2"])
def test_kivi_offloaded_answers_equal_kivi_on_device(kind, case, tmp_path):
    """The same selector over `--quant kivi-2`, offloaded or on the device, over 100 decoding steps (three
    residual flushes): the same tokens and logits (bit for bit); the frames hold their pages' host values after the
    run. batch2: two rows. few-frames: 3 frames for 7 pages a step, so every sparse step takes the full fetch (packed pages moved and
    dequantized for that step only); disk: the packed segment in memory-mapped files."""
    model = tiny_llama(layers=4)
    torch.manual_seed(1)
    ids = torch.randint(0, 101, (2 if case == "batch2" else 1, 200))
    kw = {}
    if case == "chunked+snapkv":  # a chunk after the first reads the host tier; the eviction keeps whole groups
        kw = dict(method=kq.get_method("snapkv", compression_ratio=0.25), chunk_size=96)
    ref, ref_toks, ref_cache = decode(model, selector(kind), ids, steps=STEPS, layer_factory=KIVI2, **kw)
    cache = kq.CompressedCache(model, kw.get("method"), selector=selector(kind), layer_factory=KIVI2,
                               offload="disk" if case == "disk" else "cpu", offload_dir=str(tmp_path))
    if case == "few-frames":
        for layer in _offloaded(cache):
            layer.offload_args["frames"] = 3
            layer.store = layer._new_store()
    out, toks, cache = decode(model, None, ids, steps=STEPS, cache=cache, chunk_size=kw.get("chunk_size"))
    assert torch.equal(toks, ref_toks)
    assert torch.equal(out, ref)
    stats = cache.offload_stats()
    assert stats["needed"] > 0
    if case == "few-frames":
        assert stats["full_fetches"] > 0 and stats["demand_pages"] + stats["prefetch_pages"] < stats["needed"]
    else:
        # AttentionPredictor's first step after a chunked prefill is dense (its history is empty): 10 pages for
        # 7 frames, the full fetch (as with full precision)
        assert stats["full_fetches"] == (2 if case == "chunked+snapkv" and kind == "ap" else 0)
        # Quest keeps recent pages resident across a flush, which drops them; AttentionPredictor (local 32) no
        # longer attends to the two pages a flush quantizes (test_a_flush_drops_... covers the drop itself)
        assert stats["invalidated"] > 0 or kind == "ap"
    for layer in _offloaded(cache):
        assert isinstance(layer.store, KIVIOffloadStore)
        _assert_frames_hold_host_copy(layer.store)
    if case == "disk":
        files = sorted(tmp_path.iterdir())
        assert len(files) == 2 * 6  # 2 offloaded layers x the segment's codes, scales, zeros of keys and values
        residual = sum(t.numel() * t.element_size() for layer in _offloaded(cache)
                       for t in (layer.store.codec.residual_keys, layer.store.codec.residual_values))
        assert sum(f.stat().st_size for f in files) + residual == stats["host_kv_bytes"]
        del cache, layer
        import gc

        gc.collect()
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", [None, "snapkv"])
def test_host_tier_holds_the_bytes_of_kivi_on_device(method):
    """The host tier holds exactly what `--quant kivi-2` holds on the device for the same layer: the same tensors
    (packed codes, scales, zeros, residual), equal bit for bit, so the same bytes; `offload_stats` and the stats
    line report them as host bytes, the frames and the dense layers as device bytes."""
    model = tiny_llama(layers=4)
    torch.manual_seed(2)
    ids = torch.randint(0, 101, (1, 180))
    m = kq.get_method("snapkv", compression_ratio=0.5) if method else None
    _, _, ref = decode(model, selector("quest"), ids, steps=40, method=m, layer_factory=KIVI2)
    _, _, off = decode(model, selector("quest"), ids, steps=40, method=m, layer_factory=KIVI2, offload="cpu")
    host = 0
    for i, layer in enumerate(off.layers):
        if not isinstance(layer, OffloadLayer):
            assert torch.equal(layer.keys, ref.layers[i].keys)  # a dense layer: KIVI on the device, as without
            continue
        mine, theirs = layer.store.codec.tensors(), ref.layers[i].store.tensors()
        assert mine.keys() == theirs.keys() and "store0.k.codes" in mine and "residual.keys" in mine
        for name, t in theirs.items():
            assert torch.equal(mine[name], t) and mine[name].dtype == t.dtype, name
        assert layer.offload_bytes()[1] == ref.layers[i].kv_nbytes()
        host += ref.layers[i].kv_nbytes()
    st = off.offload_stats()
    assert host > 0 and st["host_kv_bytes"] == host
    frames = sum(layer.offload_bytes()[0] for layer in _offloaded(off))
    assert st["device_kv_bytes"] == ref.stats().kv_bytes - host + frames
    assert f"{host / 2**20:.2f} MiB" in off.stats().line()


@torch.no_grad()
def test_a_flush_drops_the_frames_of_the_pages_it_quantizes():
    """Pages resident in full precision (the residual) change value when KIVI's flush quantizes them: the flush
    drops them from their frames, and the next fetch brings their dequantized values, which equal the host copy
    (and differ from the full-precision frame held before)."""
    model = tiny_llama(layers=4)
    torch.manual_seed(3)
    ids = torch.randint(0, 101, (1, 200))
    cache = kq.CompressedCache(model, selector=PinnedPages(96, lead=1, tail=5), layer_factory=KIVI2, offload="cpu")
    tok = kq.prefill(model, cache, ids).argmax(-1, keepdim=True)
    store = _offloaded(cache)[0].store
    flushes = 0
    for _ in range(60):
        nc0 = store.codec.n_compressed
        p0 = nc0 // 16
        before = store.kd.clone() if store.kd is not None else None
        resident = store.page_frame[:, :, p0 : p0 + 2].clone()
        tok = model(input_ids=tok, **kv(cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        _assert_frames_hold_host_copy(store)
        if store.codec.n_compressed == nc0:
            continue
        flushes += 1
        assert store.codec.n_compressed == nc0 + 32 and bool((resident >= 0).all())  # both pages were resident
        assert bool((store.page_frame[:, :, p0 : p0 + 2] == -1).all())  # dropped at the flush
        assert store.counters.invalidated >= 2 * 2 * flushes  # 2 pages x 2 kv heads per flush
        tok = model(input_ids=tok, **kv(cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        _assert_frames_hold_host_copy(store)  # fetched again: the dequantized values
        k = store.view()[0]
        for h in range(store.h):
            for j in (0, 1):
                f_old, f_new = int(resident[0, h, j]), int(store.page_frame[0, h, p0 + j])
                assert f_new >= 0
                page_now = store.kd[0, h, f_new * 16 : f_new * 16 + 16]
                assert torch.equal(page_now, k[0, h, (p0 + j) * 16 : (p0 + j) * 16 + 16])
                assert not torch.equal(page_now, before[0, h, f_old * 16 : f_old * 16 + 16])  # the value changed
    assert flushes >= 2
    k, n, nc = store.view()[0], store.n, store.codec.n_compressed
    for lo, hi in ((0, 16), (40, 70), (nc - 16, nc + 16), (nc - 48, nc), (n - 5, n), (nc, n), (0, n), (7, 7)):
        assert torch.equal(store.key_slots(lo, hi), k[:, :, lo:hi]), (lo, hi)  # Quest's summaries read these


def test_refusals():
    """Schemes without a host tier, a page the key group does not divide, and the compiled static step over a
    quantized host tier are refused with KVSqueezeError."""
    from kvsqueeze.errors import KVSqueezeError
    from kvsqueeze.runtime.static import StaticCompressedCache
    from kvsqueeze.selection import Quest

    model = tiny_llama(layers=4)
    for spec in ("gear-4", "mikv-8-2", "zipcache-4-2"):
        with pytest.raises(KVSqueezeError, match="kivi-<bits> only"):
            kq.CompressedCache(model, selector=Quest(64), offload="cpu", layer_factory=parse_quant(spec).layer_factory)
    with pytest.raises(KVSqueezeError, match="divide the key group"):
        kq.CompressedCache(model, selector=Quest(128, page=64), offload="cpu", layer_factory=KIVI2)
    cache = kq.CompressedCache(model, selector=Quest(64), offload="cpu", layer_factory=KIVI2)
    kq.prefill(model, cache, torch.randint(0, 101, (1, 100)))
    with pytest.raises(KVSqueezeError, match="quantized host tier"):
        StaticCompressedCache.from_cache(cache, 8)


# --- sweep and CLI -----------------------------------------------------------------------------------------------
def test_sweep_kivi_offloaded_rows_answer_as_kivi_on_device(tiny_dir, tmp_path):
    """`make_pairs(quants=['kivi-2'], offload='cpu')`: a shared prefill's KIVI layers moved to the host tier as they
    are (`offload_to`), and re-prefilled caches built offloaded, answer as `--quant kivi-2` on the device."""
    from conftest import loaded_in_own_cache
    from kvsqueeze.evaluation import make_pairs, run_sweep
    from kvsqueeze.tasks import TaskConfig, build_samples

    with loaded_in_own_cache(tiny_dir, tmp_path) as (model, tok):
        samples = build_samples(tok, "passkey", TaskConfig(length=400, samples=2))
        for s in samples:
            s.max_new_tokens = 40
        runs = {}
        for off in (None, "cpu"):
            pairs = make_pairs(["full", "snapkv"], [0.25], quants=["kivi-2"], selects=[("quest", 64)], offload=off)
            for share in (True, False):
                runs[off, share] = run_sweep(model, tok, samples, pairs, None, model_name="tiny", progress=False,
                                             keep_answers=True, code_version="t", share_prefill=share)
        ref = sorted(runs[None, True].answers.values())
        assert ref == sorted(runs["cpu", True].answers.values()) == sorted(runs["cpu", False].answers.values())


def test_cli_generate_kivi_offload(tiny_dir, tmp_path):
    """`generate --quant kivi-2 --offload cpu` answers as `--quant kivi-2`; the stats line puts the packed bytes in
    host memory; schemes without a host tier and --compile are refused in one line (exit 2)."""
    from click.testing import CliRunner

    from conftest import assert_one_error_line, own_cache
    from kvsqueeze.cli import main

    ctx = tmp_path / "ctx.txt"
    ctx.write_text("The grass is green. The sky is blue. " * 60 + "The pass key is 71432. " + "Here we go. " * 40)
    args = ["generate", "--model", str(tiny_dir), "--method", "full", "--context-file", str(ctx), "--question",
            "What is the pass key?", "--max-new-tokens", "40", "--select", "quest", "--select-budget", "64",
            "--quant", "kivi-2"]
    with own_cache(tmp_path / "cache"):
        dense = CliRunner().invoke(main, args)
        off = CliRunner().invoke(main, args + ["--offload", "cpu"])
    assert dense.exit_code == 0 and off.exit_code == 0, off.output
    assert off.output.splitlines()[0] == dense.output.splitlines()[0]  # the same answer
    assert "quant: kivi-2" in off.output and "KV offloaded to cpu" in off.output
    assert "MiB in host memory" in off.output and "offload:" in off.output
    for spec in ("gear-4", "mikv-8-2"):
        assert_one_error_line(args[:-1] + [spec, "--offload", "cpu"], "composes with --quant kivi-<bits> only")
    assert_one_error_line(args + ["--offload", "cpu", "--compile"], "--compile does not read a quantized host tier")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned host tier, side-stream prefetch)")
@pytest.mark.parametrize("kind", ["quest", "ap"])
def test_kivi_offloaded_on_cuda_equals_kivi_on_cuda(kind):
    """On CUDA: the host tier pinned, pages copied asynchronously (AttentionPredictor's on a side stream) and
    dequantized on the GPU, the flushes quantized on the host: the tokens and logits of `--quant kivi-2` on the
    GPU."""
    model = tiny_llama(layers=4).cuda()
    torch.manual_seed(1)
    ids = torch.randint(0, 101, (1, 200), device="cuda")
    ref, ref_toks, _ = decode(model, selector(kind), ids, steps=STEPS, layer_factory=KIVI2)
    out, toks, cache = decode(model, selector(kind), ids, steps=STEPS, layer_factory=KIVI2, offload="cpu")
    torch.cuda.synchronize()
    assert torch.equal(toks, ref_toks)
    assert torch.equal(out, ref)
    for layer in _offloaded(cache):
        assert all(t.is_pinned() for t in layer.store.codec.tensors().values())
        _assert_frames_hold_host_copy(layer.store)
