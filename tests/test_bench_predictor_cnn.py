"""bench/predictor_cnn.py: without CUDA one error line and exit 2 (with CUDA it times the variants: not a test)."""

import pytest
import torch

from conftest import assert_needs_cuda, run_bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_predictor_cnn_bench_refuses_without_cuda_in_one_line():
    assert_needs_cuda(run_bench("predictor_cnn", timeout=300), "predictor_cnn")
