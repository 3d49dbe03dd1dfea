"""The top-k kernel (kernels/topk.py) against torch.topk: the k largest of each row, increasing, ties at the k-th
value to the lowest indices, +-inf, rows that are not a power of two. Runs on CUDA, or on the CPU under Triton's
interpreter (TRITON_INTERPRET=1); the argument check and the fallback run everywhere."""

import os

import pytest
import torch

from kvsqueeze.kernels import topk as tk

CUDA = torch.cuda.is_available()
KERNEL = tk.triton is not None and (CUDA or os.environ.get("TRITON_INTERPRET") == "1")
DEV = "cuda" if CUDA else "cpu"
on_kernel = pytest.mark.skipif(not KERNEL, reason="triton on CUDA or TRITON_INTERPRET=1 needed")


def _expected(x: torch.Tensor, k: int) -> torch.Tensor:
    """The rule with ties to the lowest index: a stable sort of the negated values."""
    order = torch.sort(-x.double(), dim=-1, stable=True).indices[..., :k]
    return order.sort(dim=-1).values


@on_kernel
@pytest.mark.parametrize("P,k", [(8192, 256), (1000, 7), (37, 37), (16, 1), (300, 299)])
def test_topk_increasing_matches_a_stable_sort(P, k):
    g = torch.Generator().manual_seed(P + k)
    x = torch.randn(6, P, generator=g)
    x[1, : P // 2] = float("-inf")  # non-live pages
    x[2, P // 3] = float("inf")  # the current page
    x[3] = torch.randint(0, 4, (P,), generator=g).float()  # many ties at the threshold
    x[4] = -x[4].abs() - 1  # negative keys only
    x[5, : P // 2] = 0.0
    x[5, 0] = -0.0
    got = tk.topk_increasing(x.to(DEV), k).cpu()
    assert torch.equal(got, _expected(x, k))


@on_kernel
def test_topk_increasing_keeps_leading_shape_and_strides():
    x = torch.randn(2, 3, 512, 4).transpose(-1, -2)  # (2, 3, 4, 512), not contiguous
    got = tk.topk_increasing(x.to(DEV), 20).cpu()
    assert got.shape == (2, 3, 4, 20)
    assert torch.equal(got, _expected(x, 20))


def test_topk_increasing_refuses_k_out_of_range_and_falls_back_on_long_rows():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="outside"):
        tk.topk_increasing(x, 0)
    with pytest.raises(ValueError, match="outside"):
        tk.topk_increasing(x, 11)
    long_row = torch.randn(1, tk.MAX_ROW + 1)
    torch.testing.assert_close(tk.topk_increasing(long_row, 5), _expected(long_row, 5))
