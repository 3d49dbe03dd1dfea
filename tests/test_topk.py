"""The top-k kernel (kernels/topk.py): the k largest of each row in increasing order, ties at the k-th value to the
lowest indices, against torch.topk. The kernel runs on CUDA, or on the CPU under Triton's interpreter
(TRITON_INTERPRET=1); the fallback and the argument checks everywhere."""

import os

import pytest
import torch

from kvsqueeze.kernels.split_kv import triton
from kvsqueeze.kernels.topk import kernel_applies, reference_topk_increasing, topk_increasing

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
kernel_runs = pytest.mark.skipif(triton is None or (not CUDA and os.environ.get("TRITON_INTERPRET") != "1"),
                                 reason="needs triton (not in the CPU venv), and CUDA or TRITON_INTERPRET=1")


def _rule(x: torch.Tensor, k: int) -> torch.Tensor:
    """The kernel's rule in plain torch, one row at a time: the k largest, ties to the lowest index (a stable
    descending sort), NaN as -inf, increasing order."""
    x = torch.nan_to_num(x.float(), nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices
    return order[..., :k].sort(dim=-1).values


def _rows(seed: int, rows: int, P: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(rows, P, generator=g)
    if ties:  # few distinct values, infinities, NaN, both zeros
        x = (x * 6).floor() / 6 - 0.5
        x[0, ::7] = float("-inf")
        x[-1, 3::11] = float("inf")
        x[:, 5::13] = -0.0
        x[:, 2::17] = 0.0
        x[1 % rows, 1::19] = float("nan")
    return x


@kernel_runs
@pytest.mark.parametrize("P,k", [(8200, 256), (2048, 128), (1000, 37), (37, 37), (16, 1), (300, 299)])
@pytest.mark.parametrize("ways,tile", [(2, 2048), (4, 256), (16, 64)])
def test_kernel_equals_the_rule(P, k, ways, tile):
    for ties in (False, True):
        x = _rows(P + k + ways, 3, P, ties).to(DEV)
        got = topk_increasing(x, k, ways=ways, tile=tile)
        assert got.shape == (3, k) and got.dtype == torch.long
        torch.testing.assert_close(got.cpu(), _rule(x.cpu(), k), rtol=0, atol=0)


@kernel_runs
def test_kernel_takes_bf16_and_batched_shapes_and_equals_torch_topk_without_ties():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 8, 3000, generator=g).to(DEV)  # (b, kv heads, pages): distinct values
    got = topk_increasing(x, 96)
    assert got.shape == (2, 8, 96)
    torch.testing.assert_close(got.cpu(), reference_topk_increasing(x.cpu(), 96), rtol=0, atol=0)
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(topk_increasing(xb, 96).cpu(), _rule(xb.cpu(), 96), rtol=0, atol=0)


def test_fallback_and_errors():
    x = torch.randn(4, 50)
    if not kernel_applies(x):
        torch.testing.assert_close(topk_increasing(x, 5), reference_topk_increasing(x, 5))
    with pytest.raises(ValueError, match="outside"):
        topk_increasing(x, 51)
    with pytest.raises(ValueError, match="outside"):
        topk_increasing(x, 0)
    with pytest.raises(ValueError, match="power of two"):
        topk_increasing(x, 3, ways=3)
    with pytest.raises(ValueError, match="tile"):
        topk_increasing(x, 3, tile=100)


def test_rule_helper_breaks_ties_to_the_lowest_index():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, float("nan")]])
    assert _rule(x, 2).tolist() == [[1, 2]]
    assert _rule(x, 4).tolist() == [[1, 2, 3, 4]]


@kernel_runs
def test_kernel_at_the_infinities():
    """The search starts on the finite range: k within the +inf scores, k reaching into the -inf ones, no finite
    score at all."""
    x = torch.full((4, 300), float("-inf"))
    x[0, 10:20] = torch.arange(10.0)  # 10 finite, k = 15 takes 5 of the -inf scores (the lowest indices)
    x[1, 50:55] = float("inf")  # k = 15 > 5 +inf: the rest from the finite ones
    x[1, 100:200] = torch.rand(100)
    x[2, 7::30] = float("inf")  # 10 +inf, k = 15: 5 from -inf
    x[3, ::2] = float("inf")  # 150 +inf >= k: the first 15 of them
    for k in (1, 15, 300):
        got = topk_increasing(x.to(DEV), k).cpu()
        torch.testing.assert_close(got, _rule(x, k), rtol=0, atol=0)
