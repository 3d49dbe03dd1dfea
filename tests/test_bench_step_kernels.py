"""bench/step_kernels.py: a bad --layers is one error line and exit 2 (the count itself compiles three steps, about
two minutes: run by hand, see docs/gpu.md)."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "bench", "step_kernels.py")


def test_step_kernels_refuses_one_layer_in_one_line():
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, "..", "src"))
    r = subprocess.run([sys.executable, SCRIPT, "--layers", "1"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: --layers must be at least 2 (layer 0 is dense)"
