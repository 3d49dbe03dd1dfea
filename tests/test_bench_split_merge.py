"""bench/split_merge.py: without CUDA one error line and exit 2; with CUDA a row per (case, plan, merge), the fused
merge's output close to the second kernel's, and the lock left zeroed (exit 0)."""

import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "bench", "split_merge.py")


def test_split_merge_bench_runs_or_refuses_in_one_line(tmp_path):
    out = tmp_path / "rows.json"
    args = [sys.executable, SCRIPT, "--slots", "1024", "--pages", "8", "--per-sm", "1,4", "--layers", "2",
            "--reps", "3", "--json", str(out)]
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, "..", "src"))
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    if not torch.cuda.is_available():
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.strip() == "error: bench/split_merge.py needs a CUDA GPU"
        return
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * 2 * 2  # (slots, pages) x 2 plans x (kernel2, fused)
    assert all(row["us_per_step"] > 0 and row["diff"] < 5e-2 for row in rows)
