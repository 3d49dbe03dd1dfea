"""The fused predictor CNN kernel (kernels/predictor_cnn.py) against the torch convolutions it replaces: the
static AttentionPredictor's slabs (no row padding), strips (no column padding) and whole histories, masked cells,
widths that are not a multiple of the block. Runs on CUDA, or on the CPU under Triton's interpreter
(TRITON_INTERPRET=1)."""

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from kvsqueeze.kernels.predictor_cnn import predictor_cnn, reference_predictor_cnn  # noqa: E402
from kvsqueeze.selection import PredictorNet  # noqa: E402

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CUDA or TRITON_INTERPRET=1 needed")
DEV = "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("rows,cols,S,W", [(False, True, 7, 37), (False, True, 6, 64), (True, False, 9, 7),
                                           (True, True, 8, 20)])
def test_fused_cnn_equals_the_convolutions(rows, cols, S, W):
    torch.manual_seed(S * W)
    net = PredictorNet()
    w1, b1 = net.conv1.weight.detach(), net.conv1.bias.detach()
    w2, b2 = net.conv2.weight.detach(), net.conv2.bias.detach()
    w3 = net.conv3.weight.detach()[0, :, 0]
    g = torch.Generator().manual_seed(W)
    ok = torch.rand(5, S, W, generator=g) < 0.8
    x = (torch.rand(5, S, W, generator=g) ** 4) * ok
    args = [t.to(DEV) for t in (x, ok, w1, b1, w2, b2, w3)]
    got = predictor_cnn(*args, rows=rows, cols=cols, block_w=16)
    want = reference_predictor_cnn(*args, rows=rows, cols=cols)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
