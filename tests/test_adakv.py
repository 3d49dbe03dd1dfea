"""AdaKV: head-wise budgets with the memory really freed (ragged storage)."""

import pytest
import torch

import kvsqueeze as kq
from kvsqueeze.methods.adakv import allocate_heads
from kvsqueeze.runtime.generate import prefill

from conftest import kv, tiny_llama


def test_allocation_follows_the_papers_rule_by_hand():
    # 2 heads, 6 slots, budget B = 5 per head -> 10 entries in all; alpha 0.2 -> floor(1.0) = 1 guaranteed per head
    s = torch.tensor([[[9.0, 8, 7, 6, 5, 4],
                       [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]]])
    # head 0's 6 scores beat every score of head 1 except head 1's guaranteed best: head 0 keeps 6, head 1 keeps 4
    assert allocate_heads(s, torch.tensor([5]), 0.2).tolist() == [[6, 4]]
    # budget 2 per head -> 4 entries; guaranteed floor(0.4) = 0: the top 4 overall are all head 0's
    assert allocate_heads(s, torch.tensor([2]), 0.2).tolist() == [[4, 0]]
    # alpha 0.5 with B = 2 -> 1 guaranteed per head: head 1 keeps its best, head 0 the other 3
    assert allocate_heads(s, torch.tensor([2]), 0.5).tolist() == [[3, 1]]
    # alpha 1: uniform budgets
    assert allocate_heads(s, torch.tensor([3]), 1.0).tolist() == [[3, 3]]
    # invalid slots are never counted; a row's total is capped by its valid slots
    valid = torch.ones(1, 2, 6, dtype=torch.bool)
    valid[0, 0, 2:] = False
    assert allocate_heads(s, torch.tensor([5]), 0.2, valid).tolist() == [[2, 6]]
    # per-row budgets
    s2 = torch.cat([s, s.flip(1)])
    assert allocate_heads(s2, torch.tensor([5, 2]), 0.2).tolist() == [[6, 4], [0, 4]]
    with pytest.raises(ValueError):
        allocate_heads(s, torch.tensor([2]), 1.5)


@pytest.mark.parametrize("scorer", ["snapkv", "knorm"])
def test_bytes_equal_the_base_methods_and_heads_really_differ(scorer):
    model = tiny_llama(layers=3)
    ids = torch.randint(0, 101, (1, 80), generator=torch.Generator().manual_seed(3))
    base = kq.CompressedCache(model, kq.get_method(scorer, compression_ratio=0.5))
    prefill(model, base, ids)
    ada = kq.CompressedCache(model, kq.get_method(f"adakv:{scorer}", compression_ratio=0.5))
    prefill(model, ada, ids)
    n_keep = 40
    differ = False
    for lb, la in zip(base.layers, ada.layers):
        counts = la.held_counts()  # (1, kv_heads)
        assert int(counts.sum()) == n_keep * counts.shape[1]  # the layer's budget, shared by its heads
        differ |= bool((counts != counts[:, :1]).any())
        # ragged storage: only the kept entries are held (the widest head does not set the bytes)
        assert la.kv_nbytes() == lb.kv_nbytes()
        assert la.store.k.numel() == int(counts.sum()) * la.store.k.shape[-1]
    assert differ, "AdaKV gave every head the same budget on every layer"
    assert ada.stats().kv_bytes == base.stats().kv_bytes


def test_a_head_averaged_scorer_gives_uniform_budgets():
    """TOVA scores a token by the last query's attention averaged over all heads, so every kv head has the same
    scores and Ada-KV's top-(B*H) takes the same tokens in every head: AdaKV(TOVA) is TOVA."""
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 101, (1, 64), generator=torch.Generator().manual_seed(5))
    caches = []
    for name in ("tova", "adakv:tova"):
        caches.append(kq.CompressedCache(model, kq.get_method(name, compression_ratio=0.5)))
        prefill(model, caches[-1], ids)
    for a, b in zip(*(c.layers for c in caches)):
        assert torch.equal(a.positions, b.positions) and b.valid is None


def test_ragged_store_survives_decoding_batch_ops_and_reset():
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 101, (1, 60), generator=torch.Generator().manual_seed(4))
    cache = kq.CompressedCache(model, kq.get_method("adakv:snapkv", compression_ratio=0.5, compression_interval=1))
    prefill(model, cache, ids)
    assert any(layer.store.ragged for layer in cache.layers)
    with torch.no_grad():
        for t in range(4):
            model(torch.tensor([[5 + t]]), **kv(cache))
            for layer in cache.layers:
                assert int(layer.held_counts().sum()) == 30 * layer.held_counts().shape[1]
    before = [layer.keys.clone() for layer in cache.layers]
    cache.batch_repeat_interleave(2)
    for layer, k in zip(cache.layers, before):
        assert torch.equal(layer.keys[0], k[0]) and torch.equal(layer.keys[1], k[0])
    cache.reset()
    assert all(not layer.is_initialized for layer in cache.layers)
