"""bench/attention_sum.py: a malformed case is one error line; without CUDA one error line and exit 2; with CUDA a
row per (case, variant), the kernel close to the chunks."""

import json

import torch

from conftest import assert_needs_cuda, run_bench


def test_attention_sum_bench_runs_or_refuses_in_one_line(tmp_path):
    out = tmp_path / "rows.json"
    r = run_bench("attention_sum", "--cases", "16x300", "--layers", "2", "--reps", "2", "--json", str(out))
    if not torch.cuda.is_available():
        return assert_needs_cuda(r, "attention_sum")
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(row["ms_per_layer"] > 0 and row["max_rel_diff"] < 1e-3 for row in rows)


def test_attention_sum_bench_rejects_a_malformed_case():
    r = run_bench("attention_sum", "--cases", "64")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "WxN" in r.stderr
