"""bench/probe_side_stream.py: without CUDA one error line and exit 2; with CUDA it times every row (or names the
error of a row this torch cannot compile) and ends with its go / no-go line."""

import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "bench", "probe_side_stream.py")


def test_probe_runs_or_refuses_in_one_line():
    args = [sys.executable, SCRIPT, "--mb", "4", "--matmuls", "2", "--reps", "3"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if not torch.cuda.is_available():
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.strip() == "error: this probe needs a CUDA GPU"
        return
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("device:") and lines[-1].startswith("compiled:")
    assert sum(("ms" in ln or "error:" in ln) for ln in lines[1:-1]) == 6  # 3 versions x (eager, compiled)
