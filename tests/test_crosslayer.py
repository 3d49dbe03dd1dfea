"""Cross-layer storage (issue 14): MiniCache (merged layer pairs) and xKV (a shared SVD token basis per group).

The rules are checked against hand computations on tiny tensors; on the tiny model: the bytes drop, shared
tensors are counted once, attention reads the reconstruction, and the shared prefill builds what a real prefill
builds."""

from __future__ import annotations

import math

import pytest
import torch

import kvsqueeze as kq
from conftest import kv, tiny_llama
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.methods import MiniCache, XKV, get_method
from kvsqueeze.quant import kivi
from kvsqueeze.runtime.generate import prefill, record_prefill
from kvsqueeze.storage.crosslayer import (MiniCacheStore, XKVStore, retention_mask, share_minicache, share_xkv,
                                          slerp_directions, unique_tensors, xkv_ranks)
from kvsqueeze.storage.layer import CompressedLayer


def _layer(keys: torch.Tensor, values: torch.Tensor) -> CompressedLayer:
    layer = CompressedLayer()
    layer.update(keys, values)
    return layer


def _unit(theta):
    return torch.tensor([math.cos(theta), math.sin(theta)])


# --- MiniCache --------------------------------------------------------------------------------------------------
def test_slerp_of_two_2d_directions_is_the_direction_at_the_interpolated_angle():
    # in 2D, SLERP(u(a), u(b), t) = u(a + t (b - a)): the paper's Eq. 3 by hand
    a, b, t = 0.3, 1.1, 0.6
    xa, xb = 2.0 * _unit(a), 5.0 * _unit(b)
    e, na, nb, omega = slerp_directions(xa[None], xb[None], t)
    assert torch.allclose(e[0], _unit(a + t * (b - a)), atol=1e-6)
    assert math.isclose(float(na), 2.0, rel_tol=1e-6) and math.isclose(float(nb), 5.0, rel_tol=1e-6)
    assert math.isclose(float(omega), b - a, rel_tol=1e-5)
    # parallel states: the direction itself (no 0/0)
    e, *_ = slerp_directions(_unit(a)[None], 3 * _unit(a)[None], t)
    assert torch.allclose(e[0], _unit(a), atol=1e-6)


def test_retention_keeps_the_top_gamma_of_the_distance_range_per_row():
    omega = torch.tensor([[[0.1, 0.2, 0.3, 1.0, 0.95]]])
    paired = torch.ones_like(omega, dtype=torch.bool)
    # d = W / pi; range [0.1, 1.0] / pi; gamma 0.1 keeps d > d_max - 0.09 / pi: W > 0.91
    assert retention_mask(omega, paired, 0.1).tolist() == [[[False, False, False, True, True]]]
    assert retention_mask(omega, paired, 0.05).tolist() == [[[False, False, False, True, False]]]
    assert not retention_mask(omega, paired, 0.0).any()
    unpaired = paired.clone()
    unpaired[..., 3] = False  # an unpaired slot is never "retained" (it is its layer's own anyway)
    assert retention_mask(omega, unpaired, 0.1).tolist() == [[[False, False, False, False, True]]]


def test_minicache_pair_reconstructs_merged_tokens_by_hand_and_retains_the_distinct_one():
    t = 0.6
    # one row, one kv head, 4 tokens, d = 2; token 2's two layers disagree by far the most
    angles_a = [0.0, 0.5, 0.2, 1.0]
    angles_b = [0.1, 0.6, 2.9, 1.05]
    mags_a = [1.0, 2.0, 3.0, 4.0]
    mags_b = [0.5, 1.5, 2.5, 3.5]
    ka = torch.stack([m * _unit(x) for m, x in zip(mags_a, angles_a)])[None, None]
    kb = torch.stack([m * _unit(x) for m, x in zip(mags_b, angles_b)])[None, None]
    va, vb = ka.flip(-1) * 2, kb.flip(-1) * 2  # values: mirrored, the same angles
    la, lb = _layer(ka, va), _layer(kb, vb)
    share_minicache([la, lb], t=t, gamma=0.05)
    assert isinstance(la.store, MiniCacheStore) and la.store.shared is lb.store.shared
    for i in range(4):
        if i == 2:  # retained: both layers' exact states
            assert torch.allclose(la.keys[0, 0, i], ka[0, 0, i]) and torch.allclose(lb.keys[0, 0, i], kb[0, 0, i])
            assert torch.allclose(la.values[0, 0, i], va[0, 0, i])
            continue
        phi = angles_a[i] + t * (angles_b[i] - angles_a[i])
        assert torch.allclose(la.keys[0, 0, i], mags_a[i] * _unit(phi), atol=1e-5)
        assert torch.allclose(lb.keys[0, 0, i], mags_b[i] * _unit(phi), atol=1e-5)
        assert torch.allclose(la.values[0, 0, i], 2 * mags_a[i] * _unit(phi).flip(-1), atol=1e-5)
    # storage: 3 shared directions per half (held once), 3 magnitudes + 1 own entry per layer and half
    assert la.store.shared.tensors["keys_dir"].shape == (3, 2)
    assert la.store.own["keys_mag"].shape == (3,) and la.store.own["keys_own"].shape == (1, 2)
    held = unique_tensors([la.kv_tensors(), lb.kv_tensors()])
    assert sum(t.numel() for t in held if t.dtype != torch.bool) == 2 * (3 * 2 + 2 * (3 + 2))


def test_minicache_after_eviction_merges_only_tokens_both_layers_kept():
    torch.manual_seed(0)
    ka, kb = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    la, lb = _layer(ka, ka.clone()), _layer(kb, kb.clone())
    # layer a keeps tokens 0, 2, 3, 5 in head 0 and 0, 1, 4, 5 in head 1; layer b keeps 1, 2, 3, 5 / 0, 1, 2, 3
    la.keep(torch.tensor([[[0, 2, 3, 5], [0, 1, 4, 5]]]))
    lb.keep(torch.tensor([[[1, 2, 3, 5], [0, 1, 2, 3]]]))
    share_minicache([la, lb], t=0.5, gamma=0.0)
    merged_a = la.store.own["keys_merged"]
    merged_b = lb.store.own["keys_merged"]
    assert merged_a.tolist() == [[[False, True, True, True], [True, True, False, False]]]
    assert merged_b.tolist() == [[[False, True, True, True], [True, True, False, False]]]
    # the unpaired tokens are each layer's exact state
    assert torch.allclose(la.keys[0, 0, 0], ka[0, 0, 0]) and torch.allclose(lb.keys[0, 1, 3], kb[0, 1, 3])
    # a paired token: the shared direction with each layer's magnitude
    e, *_ = slerp_directions(ka[0, 0, 2], kb[0, 0, 2], 0.5)
    assert torch.allclose(la.keys[0, 0, 1], ka[0, 0, 2].norm() * e, atol=1e-5)
    assert torch.allclose(lb.keys[0, 0, 1], kb[0, 0, 2].norm() * e, atol=1e-5)


def test_minicache_plan_pairs_from_mid_depth_and_skips_exempt_layers():
    assert MiniCache().cross_layer_plan(30).groups == [(i, i + 1) for i in range(15, 29, 2)]
    assert MiniCache(exempt_layers=(17,)).cross_layer_plan(8).groups == [(4, 5), (6, 7)]
    assert MiniCache(start_layer=0).cross_layer_plan(5).groups == [(0, 1), (2, 3)]
    assert MiniCache(exempt_layers=(5,)).cross_layer_plan(8).groups == [(6, 7)]


# --- xKV --------------------------------------------------------------------------------------------------------
def test_xkv_ranks_by_hand():
    # T = 60 tokens, G = 4 layers, F = 32 features, keep half: r_k + r_v = 2 * 0.5 * 4 * 60 * 32 / (60 + 128)
    total = 2 * 0.5 * 4 * 60 * 32 / (60 + 4 * 32)
    assert xkv_ranks(60, 4, 32, 0.5) == (math.floor(0.4 * total), math.floor(0.6 * total)) == (16, 24)
    assert xkv_ranks(10, 4, 32, 0.99) == (7, 10)  # clamped to min(T, G F) = 10
    assert xkv_ranks(1000, 2, 8, 0.01)[0] == 1  # at least rank 1


def test_xkv_group_is_the_truncated_svd_of_the_concatenated_layers():
    torch.manual_seed(0)
    b, h, n, d, g = 1, 2, 24, 4, 3
    keys = [torch.randn(b, h, n, d) for _ in range(g)]
    values = [torch.randn(b, h, n, d) for _ in range(g)]
    layers = [_layer(k, v) for k, v in zip(keys, values)]
    keep = 0.4
    share_xkv(layers, keep=keep, value_share=0.6)
    rk, rv = xkv_ranks(n, g, h * d, keep, 0.6)
    for half, xs, r in (("keys", keys, rk), ("values", values, rv)):
        x = torch.cat([t[0].transpose(0, 1).reshape(n, h * d) for t in xs], dim=1).double()  # (T, G F)
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        approx = (u[:, :r] * s[:r]) @ vh[:r]  # Eckart-Young: the best rank-r approximation
        for j, layer in enumerate(layers):
            got = (layer.keys if half == "keys" else layer.values)[0].transpose(0, 1).reshape(n, h * d)
            assert torch.allclose(got.double(), approx[:, j * h * d : (j + 1) * h * d], atol=1e-4)
        assert layers[0].store.shared.tensors[f"{half}_a0"].shape == (n, r)
        assert layers[1].store.own[f"{half}_b0"].shape == (r, h * d)
    assert all(isinstance(layer.store, XKVStore) for layer in layers)
    assert len({id(layer.store.shared) for layer in layers}) == 1


def test_xkv_refuses_layers_holding_different_tokens():
    torch.manual_seed(0)
    la, lb = _layer(torch.randn(1, 1, 5, 2), torch.randn(1, 1, 5, 2)), _layer(torch.randn(1, 1, 5, 2),
                                                                               torch.randn(1, 1, 5, 2))
    lb.keep(torch.tensor([[[0, 1, 3]]]))
    la.keep(torch.tensor([[[0, 1, 2]]]))
    with pytest.raises(KVSqueezeError, match="different tokens"):
        share_xkv([la, lb], keep=0.5)


# --- on the tiny model ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=6)


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 101, (1, n), generator=g)


@pytest.mark.parametrize("name,ratio", [("minicache", 0.0), ("minicache", 0.5), ("xkv", 0.5), ("xkv", 0.8)])
def test_bytes_drop_and_shared_state_is_counted_once(model, name, ratio):
    ids = _ids(64)
    full = kq.CompressedCache(model, None)
    prefill(model, full, ids)
    cache = kq.CompressedCache(model, get_method(name, compression_ratio=ratio))
    prefill(model, cache, ids)
    st = cache.stats()
    shared = {id(layer.store.shared): layer.store.shared for layer in cache.layers
              if getattr(layer.store, "shared", None) is not None}
    assert shared and st.shared_kv_bytes == sum(
        t.numel() * t.element_size() for s in shared.values() for t in s.tensors.values())
    per_layer = sum(layer.kv_nbytes() for layer in cache.layers)
    # every member lists its group's shared tensors; the stats count them once per group
    nbytes = lambda s: sum(t.numel() * t.element_size() for t in s.tensors.values())  # noqa: E731
    assert per_layer - st.kv_bytes == sum((len(s.layers) - 1) * nbytes(s) for s in shared.values())
    assert st.kv_bytes < full.stats().kv_bytes and st.full_kv_bytes == full.stats().full_kv_bytes
    # the 16-bit sizes of the results store count the shared state once too (float32 here: 2 bytes per element)
    from kvsqueeze.evaluation.sizes import kv_bytes_16

    def b16(t):
        return t.numel() * (2 if t.is_floating_point() else t.element_size())

    once = sum(b16(t) for t in unique_tensors([layer.kv_tensors() for layer in cache.layers]))
    assert kv_bytes_16(cache) == once < sum(b16(t) for layer in cache.layers for t in layer.kv_tensors().values())
    if name == "xkv":  # the rank follows the ratio: about (1 - ratio) of the full bytes
        assert abs(st.kept_fraction - (1 - ratio)) < 0.08
    elif ratio == 0:  # each merged pair holds about one layer (plus magnitudes, maps, retained tokens)
        n, pairs = len(cache.layers), len(shared)
        assert (n - pairs) / n < st.kept_fraction < (n - pairs) / n + 0.06


@pytest.mark.parametrize("name,ratio", [("minicache", 0.0), ("minicache", 0.5), ("xkv", 0.5)])
def test_attention_reads_the_reconstruction(model, name, ratio):
    ids, q = _ids(64), _ids(5, seed=1)
    cache = kq.CompressedCache(model, get_method(name, compression_ratio=ratio))
    prefill(model, cache, ids)
    # the same slots and entries, held densely
    dense = kq.CompressedCache(model, None)
    prefill(model, dense, ids)
    for src, dst in zip(cache.layers, dense.layers):
        dst.keep(torch.arange(src.n_stored).expand(*src.positions.shape))
        dst.keys, dst.values = src.keys.clone(), src.values.clone()
        dst.positions, dst.valid = src.positions.clone(), None if src.valid is None else src.valid.clone()
        dst.table.aligned = src.table.aligned
    with torch.no_grad():
        a = model(input_ids=q, **kv(cache)).logits
        b = model(input_ids=q, **kv(dense)).logits
    assert torch.allclose(a, b, atol=1e-5)
    full = kq.CompressedCache(model, None)
    prefill(model, full, ids)
    with torch.no_grad():
        c = model(input_ids=q, **kv(full)).logits
    assert not torch.allclose(a, c, atol=1e-5)  # the merge / factorisation really changed what is read


@pytest.mark.parametrize("name,ratio", [("minicache", 0.0), ("minicache", 0.6), ("xkv", 0.5)])
def test_shared_prefill_builds_the_cache_a_real_prefill_builds(model, name, ratio):
    ids = _ids(70, seed=2)
    method = get_method(name, compression_ratio=ratio)
    real = kq.CompressedCache(model, method)
    prefill(model, real, ids)
    rec = record_prefill(model, ids)
    copy = rec.compress(model, get_method(name, compression_ratio=ratio))
    for a, b in zip(real.layers, copy.layers):
        assert type(a.store) is type(b.store)
        assert torch.equal(a.positions, b.positions)
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
    assert real.stats().kv_bytes == copy.stats().kv_bytes


def test_chunked_prefill_and_decoding_keep_working(model):
    ids = _ids(80, seed=3)
    for method in (get_method("minicache", compression_ratio=0.5), get_method("xkv", compression_ratio=0.5)):
        cache = kq.CompressedCache(model, method)
        prefill(model, cache, ids, chunk_size=32)
        assert isinstance(cache.layers[3].store, (MiniCacheStore, XKVStore))
        before = cache.stats().kv_bytes
        with torch.no_grad():
            logits = model(input_ids=_ids(3, seed=4), **kv(cache)).logits
            step = model(input_ids=logits[:, -1:].argmax(-1), **kv(cache)).logits
        assert torch.isfinite(step).all() and cache.get_seq_length() == 84
        assert cache.stats().kv_bytes > before  # the appended tokens are held per layer, in full precision


def test_errors_are_one_clear_line(model):
    with pytest.raises(KVSqueezeError, match="quantized storage"):
        kq.CompressedCache(model, get_method("minicache"), layer_factory=kivi(2))
    from kvsqueeze.evaluation import make_pairs

    with pytest.raises(KVSqueezeError, match="--quant kivi-2"):  # a sweep refuses before running anything
        make_pairs(["snapkv", "xkv"], [0.5], quants=["none", "kivi-2"])
    with pytest.raises(KVSqueezeError, match="budget"):
        get_method("xkv", budget=16)
    with pytest.raises(KVSqueezeError, match="cannot be the scorer"):
        get_method("adakv:xkv")
    with pytest.raises(KVSqueezeError, match="takes no scorer"):
        get_method("xkv:snapkv")
    with pytest.raises(KVSqueezeError, match="compression_interval"):
        get_method("minicache", compression_interval=1)
    assert isinstance(get_method("minicache:tova", compression_ratio=0.5), MiniCache)
    assert isinstance(get_method("xkv", compression_ratio=0.5), XKV)


@pytest.mark.parametrize("make", [lambda: MiniCache(start_layer=0), lambda: MiniCache(start_layer=0, compression_ratio=0.5),
                                  lambda: XKV(compression_ratio=0.5, group_size=2)],
                         ids=["minicache", "minicache+snapkv", "xkv"])
def test_left_padded_rows_match_rows_alone(model, make):
    """Each row of a left-padded batch is merged / factored from its own tokens (per-row retention threshold,
    per-row SVD over the row's tokens): its logits equal the row alone."""
    pads = [0, 5]
    rows = [_ids(40 - p, seed=10 + i)[0] for i, p in enumerate(pads)]
    ids = torch.zeros(2, 40, dtype=torch.long)
    mask = torch.zeros(2, 40, dtype=torch.long)
    for i, (r, p) in enumerate(zip(rows, pads)):
        ids[i, p:], mask[i, p:] = r, 1

    def run(x, m):
        cache = kq.CompressedCache(model, make())
        with torch.no_grad():
            out = model.generate(x, attention_mask=m, **kv(cache), max_new_tokens=3, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        return cache, out

    batch_cache, batch = run(ids, mask)
    assert isinstance(batch_cache.layers[0].store, (MiniCacheStore, XKVStore))
    for i, (r, p) in enumerate(zip(rows, pads)):
        _, alone = run(r[None], torch.ones(1, r.numel(), dtype=torch.long))
        for lb, la in zip(batch.logits, alone.logits):
            assert float((lb[i] - la[0]).abs().max()) < 1e-4


def test_the_static_decode_path_refuses_cross_layer_storage_in_one_line(model):
    from kvsqueeze.runtime.static import StaticCompressedCache

    cache = kq.CompressedCache(model, get_method("xkv", compression_ratio=0.5))
    prefill(model, cache, _ids(40))
    with pytest.raises(KVSqueezeError, match="cross-layer"):
        StaticCompressedCache.from_cache(cache, 4)


def test_sweep_grid_skips_combinations_that_do_not_compose_and_names_them():
    """`--methods all --quant none,mikv-8-2` must not stop on the methods that refuse a scheme (cross-layer with any,
    merging with MiKV): those pairs are left out and named; the others run. Without `skipped`, the refusal raises."""
    import pytest as _pytest

    from kvsqueeze.errors import KVSqueezeError
    from kvsqueeze.evaluation.sweep import make_pairs

    skipped: list[str] = []
    pairs = make_pairs(["snapkv", "xkv", "d2o"], [0.5], quants=["none", "mikv-8-2"], skipped=skipped)
    got = {(p.method_name, p.quant) for p in pairs}
    assert ("snapkv", "mikv-8-2") in got and ("xkv", None) in got and ("d2o", None) in got
    assert ("xkv", "mikv-8-2") not in got and ("d2o", "mikv-8-2") not in got
    assert skipped == ["xkv + mikv-8-2", "d2o + mikv-8-2"]
    with _pytest.raises(KVSqueezeError):
        make_pairs(["xkv"], [0.5], quants=["kivi-4"])
