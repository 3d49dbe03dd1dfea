"""bench/split_plan.py: without CUDA one error line and exit 2; with CUDA a row per (case, plan), each close to the
torch reference."""

import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "bench", "split_plan.py")


def test_split_plan_bench_runs_or_refuses_in_one_line(tmp_path):
    out = tmp_path / "rows.json"
    args = [sys.executable, SCRIPT, "--slots", "1024", "--pages", "8", "--per-sm", "1,4", "--block-n", "64",
            "--layers", "2", "--reps", "3", "--json", str(out)]
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, "..", "src"))
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    if not torch.cuda.is_available():
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.strip() == "error: bench/split_plan.py needs a CUDA GPU"
        return
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * 2  # (slots, pages) x 2 plans
    assert all(row["us_per_step"] > 0 and row["diff"] < 5e-2 for row in rows)
