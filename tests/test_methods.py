"""Each method keeps what its paper's scoring rule says it keeps."""

import pytest
import torch
import torch.nn.functional as F

import kvsqueeze as kq
from kvsqueeze.runtime import calibration
from kvsqueeze.methods import qfilters
from kvsqueeze.runtime.generate import prefill, record_prefill

from conftest import tiny_llama, kv


def _ids(n, seed=3):
    return torch.randint(0, 101, (1, n), generator=torch.Generator().manual_seed(seed))


def _full_attention(rec, layer_idx):
    """(b, hq, T, T) causal softmax attention of the recorded prefill, computed the plain way."""
    q = rec.queries[layer_idx].float()
    k = rec.cache.layers[layer_idx].keys.float()
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, dim=1)
    logits = q @ k.transpose(-1, -2) * rec.scaling[layer_idx]
    t = logits.shape[-1]
    logits = logits.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return logits.softmax(-1)


def _kept(cache, layer_idx=1):
    return [sorted(p.tolist()) for p in cache.layers[layer_idx].positions[0]]


def test_streaming_llm_keeps_sinks_and_recent():
    model = tiny_llama()
    cache = kq.CompressedCache(model, kq.get_method("streaming_llm", budget=20))
    prefill(model, cache, _ids(100))
    for kept in _kept(cache):
        assert kept == [0, 1, 2, 3] + list(range(84, 100))


def test_knorm_keeps_lowest_norm_keys():
    model = tiny_llama()
    rec = record_prefill(model, _ids(80))
    norms = rec.cache.layers[2].keys[0].norm(dim=-1)  # (h, n)
    cache = rec.compress(model, kq.get_method("knorm", budget=10))
    for h, kept in enumerate(_kept(cache, 2)):
        assert kept == sorted(norms[h].argsort()[:10].tolist())


def test_h2o_accumulates_exact_column_sums_in_chunks():
    model = tiny_llama()
    ids = _ids(90)
    rec = record_prefill(model, ids)
    cache = kq.CompressedCache(model, kq.get_method("h2o", budget=1000))  # observe only, never evicts
    with torch.no_grad():
        for s in (0, 30, 60):  # chunked prefill
            with cache.prefill():
                model(ids[:, s : s + 30], **kv(cache))
    for li in range(4):
        attn = _full_attention(rec, li)  # (1, hq, T, T)
        expected = attn.sum(2).view(1, 2, 2, 90).sum(2)  # over queries, then over each GQA group
        torch.testing.assert_close(cache.layers[li].state["h2o_acc"], expected, atol=1e-4, rtol=1e-4)


def test_h2o_keeps_heavy_hitters_and_recent_window():
    model = tiny_llama()
    rec = record_prefill(model, _ids(90))
    cache = rec.compress(model, kq.get_method("h2o", budget=20))
    acc = _full_attention(rec, 1).sum(2).view(1, 2, 2, 90).sum(2)[0]
    for h, kept in enumerate(_kept(cache)):
        recent = list(range(80, 90))
        heavy = sorted(acc[h, :80].argsort(descending=True)[:10].tolist())
        assert kept == heavy + recent


def test_snapkv_votes_of_the_window_pooled():
    model = tiny_llama()
    rec = record_prefill(model, _ids(100))
    w, budget = 16, 40
    cache = rec.compress(model, kq.get_method("snapkv", budget=budget, window=w, kernel_size=5))
    votes = _full_attention(rec, 1)[:, :, -w:].sum(2)  # (1, hq, n)
    pooled = F.avg_pool1d(votes, 5, stride=1, padding=2).view(1, 2, 2, 100).mean(2)[0]
    for h, kept in enumerate(_kept(cache)):
        top = pooled[h, : 100 - w].argsort(descending=True)[: budget - w].tolist()
        assert kept == sorted(top) + list(range(100 - w, 100))


def test_tova_keeps_the_same_tokens_in_every_head():
    model = tiny_llama()
    rec = record_prefill(model, _ids(70))
    cache = rec.compress(model, kq.get_method("tova", budget=15))
    last = _full_attention(rec, 1)[0, :, -1].mean(0)  # averaged over all heads
    expected = sorted(last.argsort(descending=True)[:15].tolist())
    assert _kept(cache) == [expected, expected]


def test_pyramidkv_budgets_decrease_linearly_around_the_mean():
    m = kq.methods.PyramidKV(compression_ratio=0.5)  # SnapKV scorer, window 64
    budgets = [m.n_keep(2000, li, 30) for li in range(30)]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > 1.8 * budgets[-1]
    assert abs(sum(budgets) / 30 - 1000) < 2
    assert budgets[-1] == 64 + round((1000 - 64) / 20)


def test_random_is_reproducible_and_seed_dependent():
    model = tiny_llama()
    rec = record_prefill(model, _ids(60))
    a = _kept(rec.compress(model, kq.get_method("random", budget=20, seed=1)))
    b = _kept(rec.compress(model, kq.get_method("random", budget=20, seed=1)))
    c = _kept(rec.compress(model, kq.get_method("random", budget=20, seed=2)))
    assert a == b and a != c


def test_exempt_layers_keep_everything():
    model = tiny_llama()
    cache = kq.CompressedCache(model, kq.get_method("knorm", compression_ratio=0.5, exempt_layers=(0, 3)))
    prefill(model, cache, _ids(60))
    assert cache.stats().tokens_stored == [60, 30, 30, 60]


@pytest.mark.parametrize("kwargs", [{"compression_ratio": 1.0}, {"compression_ratio": -0.1}, {"budget": 0}, {"compression_interval": -1}])
def test_bad_budgets_are_refused(kwargs):
    with pytest.raises(kq.KVSqueezeError):
        kq.get_method("snapkv", **kwargs)


def test_unknown_method_is_refused():
    with pytest.raises(kq.KVSqueezeError, match="unknown method"):
        kq.get_method("nope")


class _CharTokenizer:
    """Enough of a tokenizer for calibration: one id per character."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = torch.tensor([[ord(c) % 101 for c in text]])

        class Out:
            input_ids = ids

        return Out()


def test_qfilters_calibration_points_where_queries_point(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSQUEEZE_CACHE", str(tmp_path))
    torch.manual_seed(0)
    cfg = tiny_llama().config
    cfg.attention_bias, cfg.rope_parameters = True, {"rope_type": "default", "rope_theta": 1e9}
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # queries of every head lean along channel 7 (the slowest rotary pair: ~no rotation)
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.zero_()
            layer.self_attn.q_proj.bias[7::16] = 3.0
    filters = calibration.calibrate_qfilters(model, _CharTokenizer(), n_seq=3, seq_len=256, progress=False)
    assert filters.shape == (4, 2, 16)
    assert bool((filters[:, :, 7] > 0.9).all())  # the sign is fixed towards where queries point
    rec = record_prefill(model, _ids(200))
    # stored as safetensors, keyed by model, found again by setup()
    path = calibration.save(model, filters)
    assert path.suffix == ".safetensors" and path.parent == tmp_path / "qfilters"
    m = kq.get_method("qfilters", budget=10)
    calibration.prepare(m, model)
    torch.testing.assert_close(m.filters, filters)
    cache = rec.compress(model, m)
    scores = torch.einsum("hnd,hd->hn", rec.cache.layers[1].keys[0], filters[1])
    for h, kept in enumerate(_kept(cache)):
        assert kept == sorted(scores[h].argsort(descending=True)[:10].tolist())


def test_qfilters_without_calibration_says_how(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSQUEEZE_CACHE", str(tmp_path))
    with pytest.raises(kq.KVSqueezeError, match="calibrate qfilters"):
        calibration.prepare(kq.get_method("qfilters", compression_ratio=0.5), tiny_llama(seed=9))


def test_pyramid_budgets_compose_with_another_scorer():
    model = tiny_llama()
    rec = record_prefill(model, _ids(120))
    m = kq.methods.PyramidKV(scorer=kq.methods.TOVA(), compression_ratio=0.5, beta=4)
    cache = rec.compress(model, m)
    stored = cache.stats().tokens_stored
    assert stored == [m.n_keep(120, li, 4) for li in range(4)] and stored[0] > stored[-1]
    for li, n in enumerate(stored):  # TOVA's choice at this layer's own budget
        last = _full_attention(rec, li)[0, :, -1].mean(0)
        assert _kept(cache, li)[0] == sorted(last.argsort(descending=True)[:n].tolist())


def test_qfilters_calibration_reads_a_short_text_once_and_windows_are_slices():
    torch.manual_seed(0)
    model = tiny_llama()
    seen = []
    model.register_forward_pre_hook(lambda mod, args, kw: seen.append(args[0][0].clone()), with_kwargs=True)
    tok = _CharTokenizer()
    short = "abcdefghij" * 20  # 200 tokens < seq_len: one window, not n_seq copies of the same queries
    calibration.calibrate_qfilters(model, tok, [short], n_seq=8, seq_len=1024, progress=False)
    assert len(seen) == 1 and seen[0].tolist() == tok(short).input_ids[0].tolist()
    seen.clear()
    text = "".join(chr(33 + i % 90) for i in range(600))
    ids = tok(text).input_ids[0].tolist()
    calibration.calibrate_qfilters(model, tok, [text], n_seq=5, seq_len=128, progress=False)
    assert len(seen) == 5
    for w in seen:  # each window is a contiguous slice of the text
        w = w.tolist()
        assert len(w) == 128 and any(ids[s:s + 128] == w for s in range(len(ids) - 127))
