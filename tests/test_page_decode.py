"""The split-KV page decode kernel (kernels/page_decode.py) against the torch reference (gather + masked
attention), and the reference against dense masked attention over the selected slots. The kernel runs on CUDA, or
on the CPU under Triton's interpreter (TRITON_INTERPRET=1); the reference everywhere."""

import os

import pytest
import torch

from kvsqueeze.kernels.page_decode import page_decode_attention, page_slots, reference_page_decode
from kvsqueeze.kernels.slot_decode import reference_slot_decode
from kvsqueeze.kernels.split_kv import triton

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
kernel_runs = pytest.mark.skipif(triton is None or (not CUDA and os.environ.get("TRITON_INTERPRET") != "1"),
                                 reason="triton with CUDA or TRITON_INTERPRET=1 needed")


def _case(B, HQ, HK, C, D, KP, page, seed, dt):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, D, generator=g).to(DEV, dt)
    k = torch.randn(B, HK, C, D, generator=g).to(DEV, dt)
    v = torch.randn(B, HK, C, D, generator=g).to(DEV, dt)
    n_pages = C // page
    fill = (C * 3) // 4  # the last quarter of the slots is empty: pages there hold nothing
    valid = torch.zeros(B, HK, C, dtype=torch.bool)
    valid[..., :fill] = torch.rand(B, HK, fill, generator=g) < 0.8
    valid[..., fill - 1] = True  # the current token
    cur = (fill - 1) // page  # the current page is always selected
    rows = []
    for r in range(B * HK):  # KP distinct pages, the current one first
        rest = [p for p in torch.randperm(n_pages, generator=g).tolist() if p != cur]
        if r == 0 and n_pages - 1 not in rest[: KP - 1]:
            rest.insert(0, n_pages - 1)  # an empty page among the selected ones
        rows.append([cur] + rest[: KP - 1])
    pages = torch.tensor(rows).view(B, HK, KP)
    return q, k, v, valid.to(DEV), pages.to(DEV)


def test_reference_is_masked_attention_over_the_selected_slots():
    q, k, v, valid, pages = _case(2, 8, 2, 256, 16, 5, 16, 0, torch.float32)
    sel = torch.zeros_like(valid)
    sel.scatter_(2, page_slots(pages, 16), True)
    want = reference_slot_decode(q, k, v, valid & sel, scale=0.3)
    torch.testing.assert_close(reference_page_decode(q, k, v, valid, pages, 16, scale=0.3), want)
    # a page left out changes the result
    assert not torch.allclose(reference_page_decode(q, k, v, valid, pages[..., :-2], 16, scale=0.3), want)


@kernel_runs
@pytest.mark.parametrize("B,HQ,HK,C,D,KP,page,block_n", [(1, 8, 2, 512, 64, 7, 16, 64),
                                                          (2, 32, 8, 1024, 128, 16, 16, 64),
                                                          (1, 3, 3, 192, 16, 5, 32, 32), (2, 4, 2, 256, 32, 9, 16, 16)])
def test_kernel_matches_reference(B, HQ, HK, C, D, KP, page, block_n):
    dt = torch.bfloat16 if CUDA else torch.float32
    q, k, v, valid, pages = _case(B, HQ, HK, C, D, KP, page, C + KP, dt)
    out = page_decode_attention(q, k, v, valid, pages, page, scale=0.1, block_n=block_n)
    ref = reference_page_decode(q, k, v, valid, pages, page, scale=0.1)
    tol = 2e-2 if dt == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    # what lies outside the selected pages, or in invalid slots, never matters
    k2, v2 = k.clone(), v.clone()
    sel = torch.zeros_like(valid)
    sel.scatter_(2, page_slots(pages, page), True)
    k2[~(valid & sel)], v2[~(valid & sel)] = 1e3, -1e3
    torch.testing.assert_close(page_decode_attention(q, k2, v2, valid, pages, page, scale=0.1, block_n=block_n), out)


@kernel_runs
def test_kernel_reads_strided_views_and_int32_pages():
    """The static step hands a mask row view (b, hk, C) of the stacked (layers * b, hk, 1, C) buffer."""
    dt = torch.bfloat16 if CUDA else torch.float32
    q, k, v, _, pages = _case(1, 4, 2, 128, 32, 3, 16, 5, dt)
    stacked = (torch.rand(3, 2, 1, 128) < 0.5).to(DEV)
    stacked[..., 100] = True
    pages[..., 0] = 100 // 16
    valid = stacked[1:2, :, 0]
    out = page_decode_attention(q, k, v, valid, pages.int(), 16)
    torch.testing.assert_close(out.float(), reference_page_decode(q, k, v, valid.contiguous(), pages, 16).float(),
                               atol=2e-2, rtol=2e-2)


def test_kernel_refuses_shapes_it_does_not_take():
    if triton is None:
        pytest.skip("triton needed")
    q, k, v, valid, pages = _case(1, 4, 2, 128, 16, 3, 16, 1, torch.float32)
    with pytest.raises(ValueError, match="page decode"):
        page_decode_attention(q, k, v, valid, pages, 48)  # 128 slots are not whole pages of 48


@kernel_runs
@pytest.mark.parametrize("frames", [False, True])
@pytest.mark.parametrize("per_sm", [1, 8])
def test_every_split_plan_gives_the_reference(frames, per_sm):
    """One split or many, with and without page frames: the reference's output."""
    dt = torch.bfloat16 if CUDA else torch.float32
    q, k, v, valid, pages = _case(2, 8, 2, 1024, 32, 24, 16, 11, dt)
    fr = torch.randperm(24).repeat(2, 2, 1).to(DEV) if frames else None  # page i read from frame fr[..., i]
    kf = k[:, :, :24 * 16] if frames else k
    vf = v[:, :, :24 * 16] if frames else v
    out = page_decode_attention(q, kf, vf, valid, pages, 16, frames=fr, block_n=16, programs_per_sm=per_sm)
    tol = 2e-2 if dt == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), reference_page_decode(q, kf, vf, valid, pages, 16, frames=fr).float(),
                               atol=tol, rtol=tol)
