"""bench/split_plan.py: without CUDA one error line and exit 2; with CUDA a row per (case, plan), each close to the
torch reference."""

import json

import torch

from conftest import assert_needs_cuda, run_bench


def test_split_plan_bench_runs_or_refuses_in_one_line(tmp_path):
    out = tmp_path / "rows.json"
    r = run_bench("split_plan", "--slots", "1024", "--pages", "8", "--per-sm", "1,4", "--block-n", "64", "--layers",
                  "2", "--reps", "3", "--json", str(out))
    if not torch.cuda.is_available():
        return assert_needs_cuda(r, "split_plan")
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * 2  # (slots, pages) x 2 plans
    assert all(row["us_per_step"] > 0 and row["diff"] < 5e-2 for row in rows)
