"""Offloaded KV (issue 13): the host tier + device page frames (storage/offload.py), AttentionPredictor's
cross-token prefetch and Quest's on-demand fetch, on tiny random Llamas on the CPU (the copies go through the same
code as on CUDA, synchronously)."""

import pytest
import torch

import kvsqueeze as kq
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.quant import parse_quant
from kvsqueeze.selection import AttentionPredictor, PredictorNet, Quest
from kvsqueeze.storage.offload import OffloadLayer

from conftest import Spy, kv, tiny_llama
from offload_helpers import PinnedPages, decode as _decode, selector as _selector


@pytest.mark.parametrize("kind", ["quest", "ap"])
@pytest.mark.parametrize("case", ["plain", "chunked+snapkv", "batch2"])
def test_offloaded_answers_equal_on_device_selection(kind, case):
    """Same selector, same budget: the offloaded cache attends to the same pages, so the greedy tokens and the
    logits are identical (bit for bit) to on-device selection."""
    model = tiny_llama(layers=4)
    torch.manual_seed(1)
    ids = torch.randint(0, 101, (2 if case == "batch2" else 1, 200))
    kw = {}
    if case == "chunked+snapkv":  # prefill in chunks (a chunk after the first reads the host tier), evicting
        kw = dict(method=kq.get_method("snapkv", compression_ratio=0.25), chunk_size=96)
    ref_sel, off_sel = Spy(_selector(kind)), Spy(_selector(kind))
    ref, ref_toks, _ = _decode(model, ref_sel, ids, **kw)
    out, toks, cache = _decode(model, off_sel, ids, offload="cpu", **kw)
    assert any(isinstance(layer, OffloadLayer) for layer in cache.layers)
    assert torch.equal(toks, ref_toks)
    assert torch.equal(out, ref)
    sparse = [(li, n, idx) for li, n, idx in off_sel.calls if idx is not None]
    assert sparse and len(sparse) == len([c for c in ref_sel.calls if c[2] is not None])
    for (li, n, idx), (li2, n2, idx2) in zip(sparse, [c for c in ref_sel.calls if c[2] is not None]):
        assert (li, n) == (li2, n2) and torch.equal(idx, idx2)  # the same pages attended


def test_prefetch_makes_every_step_after_the_first_a_hit():
    """AttentionPredictor: each step's pages are copied during the previous step, so only the first decoding step
    (no prediction ahead of it) fetches on demand; Quest (needs the current query) fetches on demand only."""
    model = tiny_llama(layers=4)
    ids = torch.randint(0, 101, (1, 300))
    _, _, ap = _decode(model, _selector("ap"), ids, steps=20, offload="cpu")
    s = ap.offload_stats()
    offloaded = sum(isinstance(layer, OffloadLayer) for layer in ap.layers)  # layers 2, 3 (0, 1 dense)
    first_step = offloaded * 2 * (96 // 16)  # every page of the first step, per kv head
    assert s["demand_pages"] == first_step
    assert s["prefetch_pages"] > 0 and s["full_fetches"] == 0
    assert s["hits"] == s["needed"] - first_step
    assert s["needed"] == 20 * offloaded * 2 * (96 // 16)
    _, _, q = _decode(model, _selector("quest"), ids, steps=20, offload="cpu")
    sq = q.offload_stats()
    assert sq["prefetch_pages"] == 0 and sq["demand_pages"] > 0
    assert sq["demand_pages"] == sq["needed"] - sq["hits"]
    assert sq["bytes_per_token"] == sq["demand_pages"] * 16 * 2 * 16 * 4 / 20  # pages x slots x (k+v) x d x fp32


def test_only_changed_pages_travel_and_device_memory_is_fixed():
    model = tiny_llama(layers=4)
    ids = torch.randint(0, 101, (1, 200))  # 12.5 pages: the first step's last page is page 12
    steps = 40  # slots 200..239: pages 13 and 14 open at slots 208 and 224
    cache = kq.CompressedCache(model, selector=PinnedPages(64, lead=2, tail=1), offload="cpu")
    tok = kq.prefill(model, cache, ids).argmax(-1, keepdim=True)
    device_bytes = []
    with torch.no_grad():
        for _ in range(steps):
            tok = model(input_ids=tok, **kv(cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            device_bytes.append(sum(layer.offload_bytes()[0] for layer in cache.layers
                                    if isinstance(layer, OffloadLayer)))
    s = cache.offload_stats()
    per_layer_head = 3 + 2  # first step: pages 0, 1, 12; then pages 13 and 14 as they open
    assert s["demand_pages"] == 2 * 2 * per_layer_head  # 2 offloaded layers x 2 kv heads
    assert len(set(device_bytes)) == 1  # frames allocated once
    frames = 64 // 16 + 1  # the budget's pages + the partial page
    assert device_bytes[0] == 2 * (2 * 2 * frames * 16 * 16 * 4)  # 2 layers x (k + v) x 2 heads x frames x d x fp32
    dense_layers = 2 * 2 * (2 * 240 * 16) * 4  # layers 0, 1 (dense) stay on the device: (b, h, n, d) keys + values
    assert s["device_kv_bytes"] == device_bytes[-1] + dense_layers
    assert s["host_kv_bytes"] >= 2 * 2 * 2 * 240 * 16 * 4  # the offloaded layers' every slot, in host memory
    st = cache.stats()
    assert st.device_kv_bytes + st.host_kv_bytes == st.kv_bytes
    assert st.frame_kv_bytes == device_bytes[-1]  # the device part's frames, said in the stats line
    assert f"({device_bytes[-1] / 2**20:.2f} MiB of it page frames" in st.line()


def test_disk_tier_answers_as_the_cpu_tier_from_mapped_files(tmp_path):
    """offload='disk': the host tier is memory-mapped files in `offload_dir` (two per offloaded layer: keys and
    values; a file replaced when the tier grows is deleted), the answers those of the CPU tier."""
    model = tiny_llama(layers=4)
    ids = torch.randint(0, 101, (1, 200))
    ref, _, _ = _decode(model, _selector("quest"), ids, steps=20, offload="cpu")
    cache = kq.CompressedCache(model, selector=_selector("quest"), offload="disk", offload_dir=str(tmp_path))
    tok = kq.prefill(model, cache, ids).argmax(-1, keepdim=True)
    out = []
    with torch.no_grad():
        for _ in range(20):  # 200 + 20 slots: the tier grows once (208 -> 260 slots), its old files deleted
            lg = model(input_ids=tok, **kv(cache), use_cache=True).logits[:, -1]
            out.append(lg)
            tok = lg.argmax(-1, keepdim=True)
    assert torch.equal(torch.stack(out), ref)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 2 * 2  # 2 offloaded layers x (keys, values)
    assert sum(f.stat().st_size for f in files) == cache.offload_stats()["host_kv_bytes"]
    assert "MiB in memory-mapped files on disk" in cache.stats().line()  # not "in host memory"
    del cache
    import gc

    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_simulated_slow_link_changes_time_not_answers():
    model = tiny_llama(layers=4)
    ids = torch.randint(0, 101, (1, 200))
    ref, _, _ = _decode(model, _selector("ap"), ids, steps=6, offload="cpu")
    import time

    t0 = time.perf_counter()
    out, _, cache = _decode(model, _selector("ap"), ids, steps=6, offload="cpu", latency=0.01)
    copies = 2 * 6  # at most one copy per offloaded layer and step (the first on demand, then prefetches)
    assert time.perf_counter() - t0 >= 0.01 * min(copies, 2)
    assert torch.equal(out, ref)


def test_offload_refusals():
    model = tiny_llama(layers=4)
    with pytest.raises(KVSqueezeError, match="decode-time selector"):
        kq.CompressedCache(model, offload="cpu")
    with pytest.raises(KVSqueezeError, match="kivi-<bits> only"):  # KIVI has a host tier (test_offload_quant.py)
        kq.CompressedCache(model, selector=Quest(64), offload="cpu", layer_factory=parse_quant("gear-4").layer_factory)
    with pytest.raises(KVSqueezeError, match="'cpu' or 'disk'"):
        kq.CompressedCache(model, selector=Quest(64), offload="gpu")
    for m in (kq.get_method("h2o", compression_ratio=0.5), kq.get_method("knorm", budget=64, compression_interval=4),
              kq.get_method("pyramidkv:knorm", compression_ratio=0.5, compression_interval=2),
              kq.get_method("minicache", compression_ratio=0.5), kq.get_method("kvmerger", compression_ratio=0.5)):
        with pytest.raises(KVSqueezeError, match="while decoding"):
            kq.CompressedCache(model, m, selector=Quest(64), offload="cpu")
    with pytest.raises(KVSqueezeError, match="does not offload"):
        kq.CompressedCache(model, selector=Quest(64)).offload_stats()


# --- sweep and CLI -----------------------------------------------------------------------------------------------
def test_sweep_offloaded_rows_answer_as_on_device_selection(tiny_dir, tmp_path):
    """`make_pairs(..., offload='cpu')`: every pair offloaded (shared prefill and re-prefill alike), keys marked,
    answers those of on-device selection; a grid with a dense pair or a --quant scheme other than KIVI is refused."""
    from conftest import loaded_in_own_cache
    from kvsqueeze.evaluation import make_pairs, run_sweep
    from kvsqueeze.tasks import TaskConfig, build_samples

    with loaded_in_own_cache(tiny_dir, tmp_path) as (model, tok):
        samples = build_samples(tok, "passkey", TaskConfig(length=400, samples=2))
        for s in samples:
            s.max_new_tokens = 5
        kw = dict(selects=[("quest", 64)])
        runs = {}
        for off in (None, "cpu"):
            pairs = make_pairs(["full", "snapkv"], [0.25], offload=off, **kw)
            assert all(('"offload": "cpu"' in p.params_json) == (off == "cpu") for p in pairs)
            for share in (True, False):
                runs[off, share] = run_sweep(model, tok, samples, pairs, None, model_name="tiny", progress=False,
                                             keep_answers=True, code_version="t", share_prefill=share)
        ref = sorted(runs[None, True].answers.values())
        assert ref == sorted(runs["cpu", True].answers.values()) == sorted(runs["cpu", False].answers.values())
    with pytest.raises(KVSqueezeError, match="needs --select"):
        make_pairs(["full"], [0.0], selects=["none", ("quest", 64)], offload="cpu")
    with pytest.raises(KVSqueezeError, match="--quant kivi-<bits> only"):
        make_pairs(["full"], [0.0], quants=["kivi-4", "mikv-8-2"], selects=[("quest", 64)], offload="cpu")
    with pytest.raises(KVSqueezeError, match="while decoding"):
        make_pairs(["h2o"], [0.5], selects=[("quest", 64)], offload="cpu")


def test_cli_generate_offload(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from conftest import assert_one_error_line, own_cache
    from kvsqueeze.cli import main

    ctx = tmp_path / "ctx.txt"
    ctx.write_text("The grass is green. The sky is blue. " * 60 + "The pass key is 71432. " + "Here we go. " * 40)
    args = ["generate", "--model", str(tiny_dir), "--method", "full", "--context-file", str(ctx), "--question",
            "What is the pass key?", "--max-new-tokens", "6", "--select", "quest", "--select-budget", "64"]
    with own_cache(tmp_path / "cache"):
        dense = CliRunner().invoke(main, args)
        off = CliRunner().invoke(main, args + ["--offload", "cpu"])
        static = CliRunner().invoke(main, args + ["--compile"])
        static_off = CliRunner().invoke(main, args + ["--compile", "--offload", "cpu"])
        static_off2 = CliRunner().invoke(main, args + ["--compile", "--offload", "cpu", "--page-frames", "2"])
    assert dense.exit_code == 0 and off.exit_code == 0, off.output
    assert off.output.splitlines()[0] == dense.output.splitlines()[0]  # the same answer
    assert "offloaded:" in off.output and "KV offloaded to cpu" in off.output
    assert "were already on the device (prefetched, or kept" in off.output
    # the prefill's line has no frames yet; the decoding's line counts them (fresh-user report, thirteenth session)
    assert "(page frames not allocated yet: no decoding step)" in off.output
    assert "while decoding: " in off.output and "MiB of KV on the device (page frames included)" in off.output
    # the compiled static step, offloaded with device frames: the on-device static step's answer, frames' traffic
    assert static.exit_code == 0 and static_off.exit_code == 0, static_off.output
    assert static_off.output.splitlines()[0] == static.output.splitlines()[0]
    line = next(x for x in static_off.output.splitlines() if x.startswith("offload:"))
    assert "already in the device frames (steps after the first" in line and "KiB moved per token" in line, line
    frames_line = next(x for x in static_off.output.splitlines() if x.startswith("while decoding"))
    assert "page frames included" in frames_line, static_off.output
    # --page-frames 2: the same answer, twice the frames (more device bytes while decoding)
    assert static_off2.exit_code == 0, static_off2.output
    assert static_off2.output.splitlines()[0] == static.output.splitlines()[0]

    def device_mib(out):
        line = next(x for x in out.splitlines() if x.startswith("while decoding"))
        return float(line.split("): ")[1].split(" MiB")[0])

    assert device_mib(static_off2.output) > device_mib(static_off.output)
    assert_one_error_line(args + ["--page-frames", "2"], "--page-frames sets the compiled step's device page frames")
    assert_one_error_line(args[:-4] + ["--offload", "cpu"], "--offload needs --select")
    assert_one_error_line(args + ["--offload", "cpu", "--quant", "gear-4"], "composes with --quant kivi-<bits> only")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["quest", "ap"])
def test_smollm2_offloaded_answers_equal_on_device_selection(smollm2, kind):
    """The real default model (smollm2-135m, 30 layers, GQA 9:3) on a ~1,000-token passkey prompt: offloaded
    selection decodes the tokens and logits of on-device selection (AttentionPredictor with its CNN initialised to
    the history heuristic: no trained checkpoint needed, the equality does not depend on the weights)."""
    from kvsqueeze.tasks.passkey import passkey_samples

    model, tok = smollm2
    s = passkey_samples(tok, 1, 1000, seed=0)[0]
    ids = torch.tensor([tok(s.context + s.question).input_ids])

    def sel():
        if kind == "quest":
            return Quest(256)
        return AttentionPredictor(256, predictor=PredictorNet().init_blend(0.75, noise=0.0))

    ref, ref_toks, _ = _decode(model, sel(), ids, steps=10)
    out, toks, cache = _decode(model, sel(), ids, steps=10, offload="cpu")
    assert torch.equal(toks, ref_toks) and torch.equal(out, ref)
    st = cache.offload_stats()
    assert st["needed"] > 0 and st["full_fetches"] == 0
    if kind == "ap":
        assert st["prefetch_pages"] > 0 and st["hit_rate"] > 0.85


def test_cli_offload_line_without_a_decoding_step(tiny_dir, tmp_path, monkeypatch):
    """An answer that ends at once (end of sequence first) leaves no decoding step: the offload line says so
    instead of printing "nan%"."""
    from click.testing import CliRunner

    import kvsqueeze.runtime.generate as gen
    from conftest import own_cache
    from kvsqueeze.cli import main

    real = gen.generate_answer

    def no_steps(*a, **kw):
        res = real(*a, **dict(kw, max_new_tokens=1))
        res.offload = dict(res.offload, hit_rate=float("nan"), pages_per_token=0.0, bytes_per_token=0.0,
                           prefetch_pages=0, demand_pages=0)
        return res

    monkeypatch.setattr(gen, "generate_answer", no_steps)
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("The grass is green. " * 80)
    args = ["generate", "--model", str(tiny_dir), "--method", "full", "--context-file", str(ctx), "--question",
            "What?", "--max-new-tokens", "1", "--select", "quest", "--select-budget", "64", "--offload", "cpu"]
    with own_cache(tmp_path / "cache"):
        r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "offload: no decoding step: none of the pages needed" in r.output and "nan" not in r.output
