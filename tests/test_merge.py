"""The merge primitive (issue 14): `storage.merge.MergePlan` applied by storage with the eviction, checked against
averages computed by hand on tiny tensors, on dense (rectangular and ragged) and quantized stores, and through the
cache with a toy merging method."""

from dataclasses import dataclass

import pytest
import torch

import kvsqueeze as kq
from kvsqueeze.methods.base import Method, ScoreInputs
from kvsqueeze.quant import kivi
from kvsqueeze.storage import CompressedLayer
from kvsqueeze.storage.merge import MergePlan

from conftest import kv, tiny_llama


def _kv(n=4, d=2, b=1, h=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)


def _plan(into, weight, **kw):
    return MergePlan(torch.tensor(into).view(1, 1, -1), torch.tensor(weight, dtype=torch.float32).view(1, 1, -1), **kw)


def test_plan_averages_by_hand():
    k, v = _kv()
    idx = torch.tensor([[[1, 3]]])
    # slot 0 -> slot 1 (weight 2), slot 2 -> slot 3 (weight 1); the kept slots' own weights 1 and 3
    plan = _plan([1, 1, 3, 3], [2.0, 1.0, 1.0, 3.0])
    mk, mv = plan.apply(k, v, idx)
    K, V = k[0, 0], v[0, 0]
    assert torch.allclose(mk[0, 0, 0], (1 * K[1] + 2 * K[0]) / 3)
    assert torch.allclose(mk[0, 0, 1], (3 * K[3] + 1 * K[2]) / 4)
    assert torch.allclose(mv[0, 0, 0], (1 * V[1] + 2 * V[0]) / 3)
    assert torch.allclose(mv[0, 0, 1], (3 * V[3] + 1 * V[2]) / 4)


def test_plan_values_only_and_own_value_weights():
    k, v = _kv()
    idx = torch.tensor([[[1, 3]]])
    plan = _plan([1, 1, -1, 3], [2.0, 1.0, 5.0, 3.0], keys=False,
                 value_weight=torch.tensor([1.0, 1.0, 0.0, 1.0]).view(1, 1, -1))
    mk, mv = plan.apply(k, v, idx)
    assert torch.equal(mk, k[:, :, [1, 3]])  # keys not merged
    assert torch.allclose(mv[0, 0, 0], (v[0, 0, 0] + v[0, 0, 1]) / 2)
    assert torch.equal(mv[0, 0, 1], v[0, 0, 3])  # slot 2 is dropped (-1): slot 3 unchanged, bit for bit


def test_plan_drops_invalid_sources_and_targets_not_kept_or_hidden():
    k, v = _kv(n=5)
    idx = torch.tensor([[[1, 3]]])
    valid = torch.tensor([[[False, True, True, True, True]]])
    # slot 0 is padding (invalid): dropped; slot 2 names slot 4, not kept: dropped; slot 4 -> slot 3
    plan = _plan([1, 1, 4, 3, 3], [1.0, 1.0, 1.0, 1.0, 1.0])
    mk, _ = plan.apply(k, v, idx, valid)
    assert torch.equal(mk[0, 0, 0], k[0, 0, 1])
    assert torch.allclose(mk[0, 0, 1], (k[0, 0, 3] + k[0, 0, 4]) / 2)
    # the same with slot 3 kept hidden (a head-wise budget's empty slot): nothing merges into it
    mk, _ = plan.apply(k, v, idx, valid, visible=torch.tensor([[[True, False]]]))
    assert torch.equal(mk[0, 0, 1], k[0, 0, 3])


def test_plan_refuses_bad_shapes_and_weights():
    k, v = _kv()
    idx = torch.tensor([[[1, 3]]])
    with pytest.raises(ValueError, match="shape"):
        _plan([1, 1, 3], [1.0, 1.0, 1.0]).apply(k, v, idx)
    with pytest.raises(ValueError, match=">= 0"):
        _plan([1, 1, 3, 3], [1.0, -1.0, 1.0, 1.0]).apply(k, v, idx)


def _layer(k, v, factory=None):
    layer = (factory or CompressedLayer)()
    layer.update(k, v)
    layer.state["acc"] = torch.arange(k.shape[2], dtype=torch.float32).expand(*k.shape[:3]).clone()
    return layer


def test_layer_keep_with_a_plan_rectangular():
    k, v = _kv(n=6, d=4, h=2)
    layer = _layer(k, v)
    before = layer.kv_nbytes()
    idx = torch.tensor([[[0, 3], [2, 5]]])
    into = torch.tensor([[[0, 0, 3, 3, 3, -1], [2, 2, 2, 5, 5, 5]]])
    w = torch.ones(1, 2, 6)
    layer.keep(idx, plan=MergePlan(into, w))
    K = k[0]
    assert torch.allclose(layer.keys[0, 0, 0], (K[0, 0] + K[0, 1]) / 2)
    assert torch.allclose(layer.keys[0, 0, 1], (K[0, 2] + K[0, 3] + K[0, 4]) / 3)  # slot 5 dropped
    assert torch.allclose(layer.keys[0, 1, 0], K[1, :3].mean(0))
    assert torch.allclose(layer.keys[0, 1, 1], K[1, 3:].mean(0))
    assert layer.positions.tolist() == [[[0, 3], [2, 5]]]  # positions of the kept slots, unchanged
    assert layer.state["acc"].tolist() == [[[0.0, 3.0], [2.0, 5.0]]]  # slot-aligned state follows
    assert layer.kv_nbytes() == before // 3  # 2 of 6 entries held
    assert layer.n_merged == 7 and layer.n_evicted == 4  # slots per (row, kv head): 6 -> 2


def test_layer_evict_with_head_counts_ragged_frees_memory_and_merges():
    k, v = _kv(n=6, d=4, h=2, seed=1)
    layer = _layer(k, v)
    scores = torch.tensor([[[5.0, 4, 3, 2, 1, 0], [0.0, 1, 2, 3, 4, 5]]])
    # head 0 keeps 3 slots, head 1 keeps 1 (the store becomes ragged); every evicted slot merges into the
    # first kept slot of its head, weight 1
    plan = lambda idx, visible: MergePlan(torch.tensor([[[0] * 6, [5] * 6]]), torch.ones(1, 2, 6))  # noqa: E731
    layer.evict(scores, 3, torch.tensor([[3, 1]]), merge=plan)
    assert layer.store.ragged
    assert layer.kv_nbytes() == (3 + 1) * 4 * 2 * k.element_size()  # keys + values of 4 entries
    K = k[0]
    assert torch.allclose(layer.keys[0, 0, 0], (K[0, 0] + K[0, 3] + K[0, 4] + K[0, 5]) / 4)
    assert torch.equal(layer.keys[0, 0, 1:], K[0, 1:3])
    # head 1 keeps slot 5 visible (slots 3, 4 kept hidden, empty, are freed too): slots 0..4 all merge into it
    vis = layer.valid[0, 1]
    assert layer.positions[0, 1][vis].tolist() == [5]
    assert torch.allclose(layer.keys[0, 1][vis][0], K[1].mean(0))


def test_quantized_store_merges_before_the_commit():
    k, v = _kv(n=40, d=16, h=2, seed=2)
    layer = _layer(k, v, kivi(4, group=8, residual=8))
    idx = torch.arange(0, 40, 2).expand(1, 2, 20).contiguous()
    into = (torch.arange(40) // 2 * 2).expand(1, 2, 40).contiguous()  # odd slots into the even slot before
    plan = MergePlan(into, torch.ones(1, 2, 40))
    expected_k, expected_v = plan.apply(k, v, idx)
    layer.keep(idx, plan=plan)
    assert layer.store.n_compressed == 0  # merged entries wait, full precision, for the commit
    assert torch.equal(layer.keys, expected_k)
    layer.commit()
    assert layer.store.n_compressed == 8  # 20 kept: 8 quantized (whole groups), 12 in the residual window
    assert torch.equal(layer.keys[:, :, 8:], expected_k[:, :, 8:])
    assert (layer.keys - expected_k).abs().max() < 0.1  # 4-bit codes of the merged entries


@dataclass(kw_only=True)
class _MergeIntoPrevious(Method):
    """A toy merging method: keeps the even positions; every odd slot merges into the slot before it, weight 1."""

    name = "toy_merge"
    merges = True

    def score(self, x: ScoreInputs) -> torch.Tensor:
        return (x.positions % 2 == 0).float()

    def merge_plan(self, x, idx, visible):
        slots = torch.arange(x.keys.shape[2], device=x.keys.device)
        into = (slots - (x.positions % 2)).expand_as(x.positions).contiguous()
        return MergePlan(into, torch.ones_like(x.positions, dtype=torch.float32))


@pytest.mark.parametrize("scheme", ["fp", "kivi"])
def test_cache_applies_a_method_plan_and_sweep_copy_builds_the_same_cache(scheme):
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(0))
    factory = None if scheme == "fp" else kivi(4, group=4, residual=4)
    full = kq.CompressedCache(model)
    with torch.no_grad():
        model(ids, **kv(full))
    cache = kq.CompressedCache(model, _MergeIntoPrevious(compression_ratio=0.5), layer_factory=factory)
    with torch.no_grad():
        model(ids, **kv(cache))
    for i, (a, b) in enumerate(zip(full.layers, cache.layers)):
        assert b.positions[0, 0].tolist() == list(range(0, 20, 2))
        expected = (a.keys[:, :, 0::2] + a.keys[:, :, 1::2]) / 2
        tol = 1e-6 if scheme == "fp" else 0.2
        assert (b.keys - expected).abs().max() < tol, f"layer {i}"
        assert b.n_merged == 2 * 10
    assert cache.stats().kv_bytes <= full.stats().kv_bytes / 2

    from kvsqueeze.runtime.generate import record_prefill

    rec = record_prefill(model, ids)
    copy = rec.compress(model, _MergeIntoPrevious(compression_ratio=0.5), factory)
    for a, b in zip(cache.layers, copy.layers):
        assert torch.equal(a.positions, b.positions)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_mixed_precision_storage_refuses_a_merging_method():
    from kvsqueeze.methods import for_storage
    from kvsqueeze.quant import parse_quant

    with pytest.raises(kq.KVSqueezeError, match="merges"):
        for_storage(_MergeIntoPrevious(compression_ratio=0.5), parse_quant("mikv-8-2"))
