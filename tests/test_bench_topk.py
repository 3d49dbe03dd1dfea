"""bench/topk.py: without CUDA one error line and exit 2; a malformed case is one error line too; with CUDA a row
per (case, variant), every variant equal to the rule."""

import json

import torch

from conftest import assert_needs_cuda, run_bench


def test_topk_bench_runs_or_refuses_in_one_line(tmp_path):
    out = tmp_path / "rows.json"
    r = run_bench("topk", "--cases", "8x512:32", "--ways", "2,16", "--warps", "4", "--tiles", "256", "--layers", "2",
                  "--reps", "3", "--json", str(out))
    if not torch.cuda.is_available():
        return assert_needs_cuda(r, "topk")
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3  # torch + 2 widths
    assert all(row["us_per_step"] > 0 and row["rows_differ"] == 0 for row in rows)


def test_topk_bench_rejects_a_malformed_case():
    r = run_bench("topk", "--cases", "8x512")  # checked before the CUDA check
    assert r.returncode != 0 and "Traceback" not in r.stderr and "RxP:k" in r.stderr
