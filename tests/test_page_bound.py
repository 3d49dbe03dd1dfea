"""Quest's page bound kernel (kernels/page_bound.py) against the rule in torch and against the eager Quest's two
matrix products (`selection.quest.page_scores`): equal up to float32 rounding order, the same top pages. The kernel
runs on CUDA, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1); the references everywhere."""

import os

import pytest
import torch

from kvsqueeze.kernels.page_bound import page_bound, reference_page_bound
from kvsqueeze.kernels.split_kv import triton
from kvsqueeze.selection.quest import page_scores

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
kernel_runs = pytest.mark.skipif(triton is None or (not CUDA and os.environ.get("TRITON_INTERPRET") != "1"),
                                 reason="triton with CUDA or TRITON_INTERPRET=1 needed")


def _case(b, hq, hk, P, d, seed, qdt=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, hk, P, 16, d, generator=g)
    kmin, kmax = keys.amin(3), keys.amax(3)
    kmin[:, :, -1] = kmax[:, :, -1] = 0.0  # an empty page (no valid slot): metadata 0
    q = torch.randn(b, hq, d, generator=g).to(qdt)
    return q.to(DEV), kmin.to(DEV), kmax.to(DEV), keys.to(DEV)


def test_reference_bounds_every_key_and_equals_the_products():
    q, kmin, kmax, keys = _case(2, 8, 2, 9, 32, 0)
    u = reference_page_bound(q, kmin, kmax)  # (b, hq, P)
    b, hq, d = q.shape
    qk = torch.einsum("bhgd,bhpsd->bhgps", q.float().view(b, 2, 4, d), keys).reshape(b, hq, 9, 16)
    assert (u[..., :-1] >= qk.amax(-1)[..., :-1] - 1e-5).all()  # an upper bound of every key's q.k
    torch.testing.assert_close(u, page_scores(q, kmin, kmax), rtol=1e-5, atol=1e-5)


@kernel_runs
@pytest.mark.parametrize("products", [False, True])
@pytest.mark.parametrize("b,hq,hk,P,d,block_p", [(1, 32, 8, 100, 128, 32), (2, 8, 2, 37, 64, 16),
                                                 (1, 4, 4, 5, 16, 32)])
def test_kernel_matches_reference_and_picks_the_same_pages(b, hq, hk, P, d, block_p, products):
    """Both forms (elementwise; two tl.dot over q+ and q-) over float32 metadata with a bf16 query (the products
    in IEEE float32) and over 16-bit metadata with a query of that dtype (the products of exact 16-bit operands:
    bf16 on CUDA, fp16 under the interpreter, whose bf16 tl.dot is wrong)."""
    q, kmin, kmax, _ = _case(b, hq, hk, P, d, 1)
    u = page_bound(q, kmin, kmax, block_p=block_p, products=products)
    torch.testing.assert_close(u, reference_page_bound(q, kmin, kmax), rtol=1e-5, atol=1e-4)
    half = torch.bfloat16 if CUDA else torch.float16
    qh, kh, xh = q.to(half), kmin.to(half), kmax.to(half)
    torch.testing.assert_close(page_bound(qh, kh, xh, block_p=block_p, products=products),
                               reference_page_bound(qh, kh, xh), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(u, reference_page_bound(q, kmin, kmax), rtol=1e-5, atol=1e-4)
    ref = page_scores(q, kmin, kmax)
    k = min(8, P)
    assert torch.equal(u.topk(k).indices.sort().values, ref.topk(k).indices.sort().values)


@kernel_runs
def test_kernel_reads_strided_metadata():
    q, kmin, kmax, _ = _case(1, 8, 2, 20, 32, 2, qdt=torch.float32)
    wide_q = torch.zeros(1, 8, 64, device=DEV)
    wide_q[..., :32] = q
    big_min = torch.zeros(1, 2, 40, 32, device=DEV)
    big_max = torch.zeros(1, 2, 40, 32, device=DEV)
    big_min[:, :, :20], big_max[:, :, :20] = kmin, kmax
    u = page_bound(wide_q[..., :32], big_min[:, :, :20], big_max[:, :, :20])
    torch.testing.assert_close(u, reference_page_bound(q, kmin, kmax), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(triton is None, reason="triton needed")
def test_kernel_refuses_shapes_it_does_not_take():
    q, kmin, kmax, _ = _case(1, 8, 2, 4, 32, 3)
    with pytest.raises(ValueError, match="page bound kernel"):
        page_bound(q[:, :7], kmin, kmax)  # 7 query heads over 2 kv heads
    with pytest.raises(ValueError, match="page bound kernel"):
        page_bound(q, kmin.half(), kmax)  # one dtype for both
    with pytest.raises(ValueError, match="block_p"):
        page_bound(q, kmin, kmax, block_p=24)  # bench/page_bound.py's sweep: powers of two


@kernel_runs
def test_kernel_reads_metadata_in_the_keys_dtype_losslessly():
    """The min / max of bf16 keys are bf16 values: metadata kept in bf16 gives the float32 metadata's bound, up to
    float32 rounding (the two specialisations may contract the products into FMAs differently: 20 of 192 bounds
    differed by <= 1.1e-7 relative on the H200), and the same reference bound."""
    q, _, _, keys = _case(1, 8, 2, 24, 64, 4)
    kb = keys.to(torch.bfloat16)
    mn, mx = kb.amin(3), kb.amax(3)
    assert torch.equal(mn.float(), kb.float().amin(3)) and torch.equal(mx.float(), kb.float().amax(3))
    torch.testing.assert_close(page_bound(q, mn, mx), page_bound(q, mn.float(), mx.float()), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(page_bound(q, mn, mx), reference_page_bound(q, mn.float(), mx.float()), rtol=1e-5,
                               atol=1e-4)
