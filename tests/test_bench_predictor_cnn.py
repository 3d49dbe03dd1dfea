"""bench/predictor_cnn.py: without CUDA one error line and exit 2 (with CUDA it times the variants: not a test)."""

import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "bench", "predictor_cnn.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_predictor_cnn_bench_refuses_without_cuda_in_one_line():
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, "..", "src"))
    r = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: bench/predictor_cnn.py needs a CUDA GPU"
