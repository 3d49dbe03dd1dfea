"""The split-KV slot decode kernel (kernels/slot_decode.py) against the torch reference: head-wise masks, masked
blocks and splits, GQA groups padded to the tile, a capacity that is not a multiple of the block. Runs on CUDA, or
on the CPU under Triton's interpreter (TRITON_INTERPRET=1)."""

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from kvsqueeze.kernels.slot_decode import reference_slot_decode, slot_decode_attention  # noqa: E402

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CUDA or TRITON_INTERPRET=1 needed")
DEV = "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("B,HQ,HK,C,D", [(1, 8, 2, 200, 64), (2, 32, 8, 1000, 128), (1, 3, 3, 70, 16)])
def test_slot_decode_matches_reference_with_headwise_masks(B, HQ, HK, C, D):
    g = torch.Generator().manual_seed(C)
    dt = torch.bfloat16 if CUDA else torch.float32
    q = torch.randn(B, HQ, D, generator=g).to(DEV, dt)
    k = torch.randn(B, HK, C, D, generator=g).to(DEV, dt)
    v = torch.randn(B, HK, C, D, generator=g).to(DEV, dt)
    valid = torch.rand(B, HK, C, generator=g) < 0.4
    valid[..., :C // 2] = False  # whole blocks (and splits) masked for some heads
    valid[0, 0, : C // 2] = True  # others hold more slots: head-wise counts
    valid[..., -1] = True  # the current token
    valid = valid.to(DEV)
    out = slot_decode_attention(q, k, v, valid, scale=0.1)
    ref = reference_slot_decode(q, k, v, valid, scale=0.1)
    tol = 2e-2 if dt == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    # an invalid slot's contents never matter
    k2, v2 = k.clone(), v.clone()
    k2[~valid], v2[~valid] = 1e3, -1e3
    torch.testing.assert_close(slot_decode_attention(q, k2, v2, valid, scale=0.1), out)


def test_slot_decode_reads_strided_views():
    """The static cache hands a mask row view (b, hk, C) of a stacked (layers*b, hk, 1, C) buffer."""
    dt = torch.bfloat16 if CUDA else torch.float32
    q = torch.randn(1, 4, 32).to(DEV, dt)
    k = torch.randn(1, 2, 96, 32).to(DEV, dt)
    v = torch.randn(1, 2, 96, 32).to(DEV, dt)
    stacked = (torch.rand(3, 2, 1, 96) < 0.5).to(DEV)
    stacked[..., -1] = True
    valid = stacked[1:2, :, 0]
    torch.testing.assert_close(slot_decode_attention(q, k, v, valid).float(),
                               reference_slot_decode(q, k, v, valid.contiguous()).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("B,HQ,HK,C,per_sm", [(1, 4, 1, 4096, 16), (2, 8, 2, 1000, 2), (1, 3, 3, 70, 1)])
def test_every_split_plan_gives_the_reference(B, HQ, HK, C, per_sm):
    """The split plan (programs per SM: 1 split, a few, over 32 splits: the merge's blocks of 32) changes only the
    float rounding of the merge."""
    from kvsqueeze.kernels.split_kv import _sm_count, _split_plan

    g = torch.Generator().manual_seed(C + per_sm)
    dt = torch.bfloat16 if CUDA else torch.float32
    D = 32
    q = torch.randn(B, HQ, D, generator=g).to(DEV, dt)
    k = torch.randn(B, HK, C, D, generator=g).to(DEV, dt)
    v = torch.randn(B, HK, C, D, generator=g).to(DEV, dt)
    valid = (torch.rand(B, HK, C, generator=g) < 0.5).to(DEV)
    valid[..., -1] = True
    n_splits = _split_plan(B * HK, C, 64, _sm_count(q.device), per_sm)[0]
    if per_sm == 16:  # the merge's blocks of 32 splits are all exercised
        assert n_splits > 32
    out = slot_decode_attention(q, k, v, valid, programs_per_sm=per_sm)
    tol = 2e-2 if dt == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), reference_slot_decode(q, k, v, valid).float(), atol=tol, rtol=tol)
