"""kernels/attention_probs.py: the one softmax(q K^T) against a naive per-row reference."""

import math

import pytest
import torch

from kvsqueeze.kernels.attention_probs import attention_chunks, attention_probs


def naive(q, k, scaling, softcap, q_pos, k_pos, valid, window):
    """One (batch, head, query) row at a time, keys repeated per head, float64, the visibility rule spelt out."""
    b, hq, w, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    out = torch.zeros(b, hq, w, n, dtype=torch.float64)
    for r in range(b):
        for h in range(hq):
            kh = k[r, h // (hq // hk)].double()
            for i in range(w):
                logits = (kh @ q[r, h, i].double()) * scaling
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                vis = [j for j in range(n)
                       if (q_pos is None or (k_pos[r, h // (hq // hk), j] <= q_pos[r, i]
                                             and (not window or k_pos[r, h // (hq // hk), j] > q_pos[r, i] - window)))
                       and (valid is None or valid[r, h // (hq // hk), j])]
                if vis:
                    e = torch.exp(logits[vis] - logits[vis].max())
                    out[r, h, i, vis] = e / e.sum()
    return out


def random_case(seed):
    g = torch.Generator().manual_seed(seed)
    ri = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    b, hk, group, d = ri(1, 4), ri(1, 3), ri(1, 5), 8
    n = ri(2, 30)
    w = ri(1, n + 3)
    q = torch.randn(b, hk * group, w, d, generator=g) * 2
    k = torch.randn(b, hk, n, d, generator=g) * 2
    pad = torch.randint(0, 4, (b,), generator=g)
    k_pos = (torch.arange(n) - pad[:, None]).view(b, 1, n).expand(b, hk, n).clone()
    k_pos = k_pos[:, :, torch.randperm(n, generator=g)]  # slots in any order (as after eviction)
    valid = (k_pos >= 0) & (torch.rand(b, hk, n, generator=g) > 0.15)
    q_pos = (torch.arange(w) + ri(-w, n))[None].expand(b, w) - pad[:, None]  # some queries see no key
    window = ri(1, n + 1) if seed % 2 else None
    softcap = 3.0 if seed % 3 == 0 else None
    return q, k, q_pos, k_pos, valid, window, softcap, 1 / math.sqrt(d)


@pytest.mark.parametrize("seed", range(12))
def test_kernel_equals_naive_reference(seed):
    q, k, q_pos, k_pos, valid, window, softcap, scaling = random_case(seed)
    p = attention_probs(q, k, scaling=scaling, softcap=softcap, q_positions=q_pos, k_positions=k_pos, valid=valid,
                        window=window)
    ref = naive(q, k, scaling, softcap, q_pos, k_pos, valid, window)
    assert p.dtype == torch.float32 and p.shape == ref.shape
    assert not torch.isnan(p).any()
    torch.testing.assert_close(p.double(), ref, atol=1e-6, rtol=1e-5)
    # without positions: every key is in the past; without valid: every slot counts
    torch.testing.assert_close(attention_probs(q, k, scaling=scaling).double(),
                               naive(q, k, scaling, None, None, None, None, None), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_chunks_concatenate_to_the_whole_and_count_visible_keys(seed):
    q, k, q_pos, k_pos, valid, window, softcap, scaling = random_case(seed)
    kw = dict(scaling=scaling, softcap=softcap, q_positions=q_pos, k_positions=k_pos, valid=valid, window=window)
    whole = attention_probs(q, k, **kw)
    chunks = list(attention_chunks(q, k, chunk=2, **kw))
    assert [c.start for c in chunks] == list(range(0, q.shape[2], 2))
    torch.testing.assert_close(torch.cat([c.probs for c in chunks], 2), whole)
    ref = naive(q, k, scaling, softcap, q_pos, k_pos, valid, window)
    hk = k.shape[1]
    counts = sum(c.allowed.sum(dim=(2, 3)) for c in chunks)  # (b, hk, n): queries that see each key
    expect = (ref.view(q.shape[0], hk, -1, q.shape[2], k.shape[2])[:, :, 0] > 0).sum(2)
    assert torch.equal(counts, expect)


def test_row_with_no_visible_key_is_zero_and_bad_arguments_are_refused():
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8)
    p = attention_probs(q, k, scaling=0.3, valid=torch.zeros(1, 2, 5, dtype=torch.bool))
    assert torch.equal(p, torch.zeros_like(p))
    with pytest.raises(ValueError, match="both q_positions and k_positions"):
        attention_probs(q, k, scaling=0.3, q_positions=torch.arange(3))
    with pytest.raises(ValueError, match="not a multiple"):
        attention_probs(torch.randn(1, 3, 3, 8), k, scaling=0.3)
