"""Evaluation harness: sweeps over methods x compression_ratios x tasks x samples with one prefill per sample, a
resumable SQLite results store, and a static HTML report. See docs/evaluation.md."""

from .frontier import frontier, pareto_mask
from .sizes import bytes_16, full_kv_bytes_16, kv_bytes_16
from .store import ResultStore, code_version, error_notes, summary_table
from .sweep import Pair, SweepResult, make_pairs, method_params, run_sweep

__all__ = ["Pair", "ResultStore", "SweepResult", "bytes_16", "code_version", "error_notes", "frontier",
           "full_kv_bytes_16", "kv_bytes_16", "make_pairs", "method_params", "pareto_mask", "run_sweep",
           "summary_table"]
