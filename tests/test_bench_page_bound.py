"""bench/page_bound.py: without CUDA one error line and exit 2; malformed settings are one error line too; with
CUDA a row per (pages, variant), every kernel variant equal to the rule."""

import json

import torch

from conftest import assert_needs_cuda, run_bench


def test_page_bound_bench_runs_or_refuses_in_one_line(tmp_path):
    out = tmp_path / "rows.json"
    r = run_bench("page_bound", "--pages", "300", "--blocks", "16,64", "--warps", "4", "--layers", "2", "--reps", "3",
                  "--json", str(out))
    if not torch.cuda.is_available():
        return assert_needs_cuda(r, "page_bound")
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3  # torch + 2 blocks
    assert all(row["us_per_step"] > 0 and row["max_rel_diff"] < 1e-4 for row in rows)


def test_page_bound_bench_rejects_malformed_settings():
    for args in (("--blocks", "24"), ("--warps", "x"), ("--pages", "0")):  # checked before the CUDA check
        r = run_bench("page_bound", *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error:"), args
