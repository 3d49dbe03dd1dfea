"""The attention-sum kernel (kernels/attention_sum.py): the attention of `attention_chunks` summed over the queries,
in two passes that never hold the probabilities, against the chunks' sums (positions, sliding window, `valid`,
rows with no visible key, grouped-query heads, head sizes that are not powers of two). The kernel runs on CUDA or
on the CPU under Triton's interpreter (TRITON_INTERPRET=1); the dispatch and the errors everywhere."""

import os

import pytest
import torch

from kvsqueeze.kernels.attention_probs import attention_chunks, attention_sum
from kvsqueeze.kernels.attention_sum import attention_sum_kernel, kernel_applies
from kvsqueeze.kernels.split_kv import triton

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
kernel_runs = pytest.mark.skipif(triton is None or (not CUDA and os.environ.get("TRITON_INTERPRET") != "1"),
                                 reason="needs triton (not in the CPU venv), and CUDA or TRITON_INTERPRET=1")


def _rule(q, k, **kw):
    return sum(c.probs.sum(2) for c in attention_chunks(q, k, **kw))


def _case(b, hq, hk, w, n, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, w, d, generator=g).to(dtype)
    k = torch.randn(b, hk, n, d, generator=g).to(dtype)
    # keys at positions 0 .. n-1 of each row (a left-padded row 1 starts at -5), the queries the last w positions
    kp = torch.arange(n).expand(b, hk, n).clone()
    if b > 1:
        kp[1] -= 5
    qp = torch.arange(n - w, n).expand(b, w).clone()
    return q.to(DEV), k.to(DEV), qp.to(DEV), kp.to(DEV)


@kernel_runs
@pytest.mark.parametrize("b,hq,hk,w,n,d", [(1, 8, 2, 64, 300, 64), (2, 4, 4, 7, 130, 48), (2, 6, 2, 40, 65, 16)])
def test_kernel_equals_the_chunks(b, hq, hk, w, n, d):
    q, k, qp, kp = _case(b, hq, hk, w, n, d, seed=b + hq + w)
    valid = torch.rand(b, hk, n, generator=torch.Generator().manual_seed(1)).to(DEV) > 0.2
    scale = d ** -0.5
    for kw in (dict(), dict(q_positions=qp, k_positions=kp), dict(q_positions=qp, k_positions=kp, valid=valid),
               dict(q_positions=qp, k_positions=kp, window=33), dict(valid=valid)):
        got = attention_sum_kernel(q, k, scaling=scale, **kw)
        assert got.shape == (b, hq, n) and got.dtype == torch.float32
        torch.testing.assert_close(got, _rule(q, k, scaling=scale, **kw), rtol=1e-5, atol=1e-6)


@kernel_runs
def test_rows_without_a_visible_key_contribute_nothing():
    q, k, qp, kp = _case(1, 4, 2, 20, 90, 32, seed=3)
    qp = qp - 85  # the first 15 queries see no key (positions before every key's)
    got = attention_sum_kernel(q, k, scaling=0.2, q_positions=qp, k_positions=kp)
    torch.testing.assert_close(got, _rule(q, k, scaling=0.2, q_positions=qp, k_positions=kp), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(got).all()


@pytest.mark.skipif(not CUDA or triton is None, reason="bf16 products need CUDA (Triton's CPU interpreter gets "
                                                       "bf16 tl.dot wrong: 4e10 off on a 16 x 32 product, triton 3.9)")
def test_bf16_products_equal_the_upcast_rule():
    q, k, qp, kp = _case(2, 8, 2, 64, 1000, 128, seed=5, dtype=torch.bfloat16)
    ref = _rule(q.float(), k.float(), scaling=0.088, q_positions=qp, k_positions=kp)  # products of bf16: exact
    got = attention_sum_kernel(q, k, scaling=0.088, q_positions=qp, k_positions=kp)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_dispatch_and_errors():
    q, k, qp, kp = _case(1, 4, 2, 5, 20, 16, seed=0)
    ref = _rule(q, k, scaling=0.25, q_positions=qp, k_positions=kp)
    # softcap is not in the kernel: the chunks' sums, everywhere
    assert not kernel_applies(q, k, softcap=30.0)
    torch.testing.assert_close(attention_sum(q, k, scaling=0.25, softcap=30.0),
                               _rule(q, k, scaling=0.25, softcap=30.0))
    torch.testing.assert_close(attention_sum(q, k, scaling=0.25, q_positions=qp, k_positions=kp), ref,
                               rtol=1e-5, atol=1e-6)
    import kvsqueeze.kernels.attention_sum as mod

    old, mod.KERNEL = mod.KERNEL, False  # off: the chunks' sums wherever the kernel could run
    try:
        assert not kernel_applies(q, k, softcap=None)
    finally:
        mod.KERNEL = old
    with pytest.raises(ValueError, match="both"):
        attention_sum_kernel(q, k, scaling=0.25, q_positions=qp)
    with pytest.raises(ValueError, match="multiple"):
        attention_sum_kernel(q[:, :3], k, scaling=0.25)
