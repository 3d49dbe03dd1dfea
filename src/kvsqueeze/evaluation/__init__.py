"""Evaluation harness: sweeps over methods x ratios x tasks x samples with one prefill per sample, a resumable
SQLite results store, and a static HTML report. See docs/evaluation.md."""

from .store import ResultStore, code_version, summary_table
from .sweep import Pair, SweepResult, make_pairs, method_params, run_sweep

__all__ = ["Pair", "ResultStore", "SweepResult", "code_version", "make_pairs", "method_params", "run_sweep",
           "summary_table"]
