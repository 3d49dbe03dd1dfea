"""bench/topk.py: without CUDA one error line and exit 2; a malformed case or algo is one error line too; with CUDA
a row per (case, variant), every variant (the three kernels) equal to the rule."""

import json

import torch

from conftest import assert_needs_cuda, run_bench


def test_topk_bench_runs_or_refuses_in_one_line(tmp_path):
    out = tmp_path / "rows.json"
    r = run_bench("topk", "--cases", "8x512:32", "--ways", "2,16", "--warps", "4", "--tiles", "256", "--layers", "2",
                  "--reps", "3", "--algos", "search", "--json", str(out))
    if not torch.cuda.is_available():
        return assert_needs_cuda(r, "topk")
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3  # torch + 2 widths
    assert all(row["us_per_step"] > 0 and row["rows_differ"] == 0 for row in rows)


def test_topk_bench_times_every_algo(tmp_path):
    out = tmp_path / "rows.json"
    r = run_bench("topk", "--cases", "8x3000:64", "--ways", "8", "--warps", "4", "--tiles", "1024", "--layers", "2",
                  "--reps", "3", "--algos", "search,sample,split", "--samples", "256,1024", "--segments", "512",
                  "--json", str(out))
    if not torch.cuda.is_available():
        return assert_needs_cuda(r, "topk")
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["variant"].split()[0] for row in rows] == ["torch", "kernel", "sample", "sample", "split", "split"]
    assert all(row["us_per_step"] > 0 and row["rows_differ"] == 0 for row in rows)
    assert rows[1]["fallback_rows"] is None
    assert all(row["fallback_rows"][0] == 0 for row in rows[2:])  # Quest-like rows: no fallback


def test_topk_bench_rejects_a_malformed_algo():
    r = run_bench("topk", "--algos", "search,radix")  # checked before the CUDA check
    assert r.returncode != 0 and "Traceback" not in r.stderr and "--algos" in r.stderr


def test_topk_bench_rejects_a_malformed_case():
    r = run_bench("topk", "--cases", "8x512")  # checked before the CUDA check
    assert r.returncode != 0 and "Traceback" not in r.stderr and "RxP:k" in r.stderr


def test_topk_bench_rejects_a_segment_that_is_not_a_power_of_two():
    r = run_bench("topk", "--algos", "split", "--segments", "100")  # checked before the CUDA check
    assert r.returncode != 0 and "Traceback" not in r.stderr and "--segments" in r.stderr
