"""Left-padded batches (issue 9, item 1): every row of a left-padded batch keeps exactly the tokens it keeps
alone, and its logits match the row alone, for every method, budget kind, decode-time eviction, attention
kernel and quantized storage."""

import pytest
import torch

import kvsqueeze as kq
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.methods import METHODS, MiKV, SnapKV, ZipCacheSaliency
from kvsqueeze.quant import kivi, mikv, zipcache

from conftest import kv, prefixkv_profiles, tiny_llama

LAYERS = 2
PADS = (0, 10, 4)  # left padding of each row; every row is 40 slots wide
WIDTH = 40
TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test of this module runs with one torch thread (conftest's `one_thread`)."""


def _method(name: str, amount: dict, compression_interval: int):
    kw = dict(amount, compression_interval=compression_interval)
    if name == "snapkv":
        kw["window"] = 8  # the default window (64) covers the whole prompt: every slot would tie at +inf
    if name == "pyramidkv":
        kw["scorer"] = SnapKV(window=8)
    if name == "qfilters":
        kw["filters"] = torch.randn(LAYERS, 2, 16, generator=torch.Generator().manual_seed(1))
        kw["window"] = 4
    if name == "prefixkv":
        kw["profiles"] = prefixkv_profiles(LAYERS)
    if name == "windowkv":  # an observation window and windows smaller than the 40-token prompts
        kw.update(window=4, review_window=4)
    return METHODS[name](**kw)


def _prompts():
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 101, (WIDTH - p,), generator=gen) for p in PADS]
    ids = torch.zeros(len(rows), WIDTH, dtype=torch.long)
    mask = torch.zeros(len(rows), WIDTH, dtype=torch.long)
    for i, (r, p) in enumerate(zip(rows, PADS)):
        ids[i, p:], mask[i, p:] = r, 1
    return rows, ids, mask


def _generate(model, ids, mask, cache):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **kv(cache), max_new_tokens=3, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0)


def _kept(cache, row: int, pad: int) -> list[list[list[int]]]:
    """Per layer and kv head: the sorted positions, counted from the row's first real token (`pad` padding
    tokens before it), of the visible slots of `row`."""
    out = []
    for layer in cache.layers:
        pos = layer.positions[row].long() - pad
        valid = torch.ones_like(pos, dtype=torch.bool) if layer.valid is None else layer.valid[row]
        out.append([sorted(pos[h][valid[h]].tolist()) for h in range(pos.shape[0])])
    return out


def _check(model, make_method, layer_factory=None):
    rows, ids, mask = _prompts()
    batch_cache = kq.CompressedCache(model, make_method(), layer_factory=layer_factory)
    batch = _generate(model, ids, mask, batch_cache)
    for r, row in enumerate(rows):
        alone_cache = kq.CompressedCache(model, make_method(), layer_factory=layer_factory)
        alone = _generate(model, row[None], torch.ones(1, row.numel(), dtype=torch.long), alone_cache)
        assert _kept(batch_cache, r, PADS[r]) == _kept(alone_cache, 0, 0), f"row {r} (padding {PADS[r]}) kept other tokens"
        for step, (lb, la) in enumerate(zip(batch.logits, alone.logits)):
            diff = float((lb[r] - la[0]).abs().max())
            assert diff < TOL, f"row {r} (padding {PADS[r]}), step {step}: logits differ by {diff:.3g}"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("compression_interval", [0, 1])
@pytest.mark.parametrize("amount", [{"compression_ratio": 0.5}, {"budget": 12}], ids=["compression_ratio", "budget"])
@pytest.mark.parametrize("name", list(METHODS))
def test_left_padded_rows_match_rows_alone(name, amount, compression_interval, attn):
    if hasattr(METHODS[name], "cross_layer_plan"):  # MiniCache, xKV refuse decode-time eviction, xKV a budget
        try:
            _method(name, amount, compression_interval)
        except KVSqueezeError as e:
            pytest.skip(f"{name} refuses it: {e}")
    model = tiny_llama(attn, layers=LAYERS)
    _check(model, lambda: _method(name, amount, compression_interval))


@pytest.mark.parametrize("name", ["h2o", "snapkv", "streaming_llm", "random"])
@pytest.mark.parametrize("amount", [{"compression_ratio": 0.5}, {"budget": 12}], ids=["compression_ratio", "budget"])
def test_left_padded_rows_match_rows_alone_kivi4(name, amount):
    model = tiny_llama(layers=LAYERS)
    _check(model, lambda: _method(name, amount, 1), layer_factory=kivi(4))


@pytest.mark.parametrize("scheme", ["mikv", "zipcache"])
@pytest.mark.parametrize("amount", [{"compression_ratio": 0.5}, {"budget": 12}], ids=["compression_ratio", "budget"])
def test_left_padded_rows_match_rows_alone_mixed_precision(scheme, amount):
    """MiKV / ZipCache split instead of evicting: every row's high-precision tokens are those it picks alone (a
    residual of 8 so that the split and the quantized stores are reached with 40 tokens)."""
    model = tiny_llama(layers=LAYERS)
    if scheme == "mikv":
        make, factory = (lambda: MiKV(inner=METHODS["h2o"](**amount, compression_interval=1))), mikv(8, 2, residual=8, group=8)
    else:
        make, factory = (lambda: ZipCacheSaliency(**amount)), zipcache(4, 2, residual=8, group=8)
    _check(model, make, layer_factory=factory)


def test_attention_probs_row_without_valid_key_is_zero_not_nan():
    """A selector's attention row with every key hidden (a padding row) contributes nothing."""
    from kvsqueeze.selection.base import attention_probs

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 1, 16, generator=gen), torch.randn(2, 2, 6, 16, generator=gen)
    valid = torch.ones(2, 2, 6, dtype=torch.bool)
    valid[1] = False
    p = attention_probs(q, k, 0.25, valid=valid)
    assert not bool(p.isnan().any())
    assert bool((p[1] == 0).all())
    assert torch.allclose(p[0].sum(-1), torch.ones(4, 1))
