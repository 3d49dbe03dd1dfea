"""Sweep speed: one shared prefill per sample vs one prefill per (method, compression_ratio) pair, same answers.

    python bench/sweep_vs_reprefill.py --model smollm2-135m --length 2048 --samples 3

Runs the grid methods x compression_ratios (default 6 x 4) over passkey samples three ways:
  re-prefill   `generate_answer` for every pair (what a sweep without prefill sharing does);
  shared       `run_sweep`: one `record_prefill` per sample, every pair compressed from it, answers decoded for
               `--batch-size` caches at a time;
  shared, b=1  the same, answers decoded one pair at a time (exactly `greedy_decode`).
Prints the wall time of each, the compression_ratios, and whether every answer is identical to the re-prefill one.
Exit status 1 when an answer differs. Nothing is stored. Timings on a shared CPU are noisy: the runs are interleaved
per sample (each sample is timed under all protocols back to back) to limit the effect of load changes.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import kvsqueeze as kq
from kvsqueeze.evaluation.sweep import make_pairs, run_sweep
from kvsqueeze.tasks import TaskConfig, build_samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--tasks", default="passkey")
    ap.add_argument("--methods", default="streaming_llm,snapkv,pyramidkv,tova,knorm,qfilters")
    ap.add_argument("--compression-ratios", "--ratios", default="0.25,0.5,0.75,0.875",
                    help="comma-separated fractions of tokens removed (kvpress's compression_ratio)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--skip-unbatched", action="store_true", help="skip the shared, b=1 run")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    model, tok = kq.load_model(a.model)
    samples = build_samples(tok, a.tasks, TaskConfig(length=a.length, samples=a.samples))
    methods = [m.strip() for m in a.methods.split(",")]
    compression_ratios = [float(r) for r in a.compression_ratios.split(",")]
    pairs = make_pairs(methods, compression_ratios)
    from kvsqueeze.runtime.calibration import prepare

    for p in pairs:
        prepare(p.method, model)  # Q-Filters calibration (first use) is not part of either timing
    print(f"{a.model}, {len(samples)} samples of ~{a.length} tokens ({a.tasks}), {len(methods)} methods x "
          f"{len(compression_ratios)} compression_ratios = {len(pairs)} pairs; torch threads "
          f"{torch.get_num_threads()}", flush=True)

    runs = {"re-prefill": dict(share_prefill=False, batch_size=1),
            f"shared, b={a.batch_size}": dict(share_prefill=True, batch_size=a.batch_size)}
    if not a.skip_unbatched:
        runs["shared, b=1"] = dict(share_prefill=True, batch_size=1)
    times = {k: 0.0 for k in runs}
    answers = {k: {} for k in runs}
    for i, s in enumerate(samples):
        for name, kw in runs.items():
            t0 = time.perf_counter()
            r = run_sweep(model, tok, [s], pairs, None, model_name=a.model, progress=False, keep_answers=True,
                          code_version="bench", **kw)
            times[name] += time.perf_counter() - t0
            answers[name].update(r.answers)
        print(f"sample {i + 1}/{len(samples)}: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()), flush=True)

    ref = answers["re-prefill"]
    ok = True
    print()
    print(f"| protocol | wall time (s) | per pair (s) | speed-up vs re-prefill | answers identical |")
    print(f"|---|---|---|---|---|")
    n_pairs = len(pairs) * len(samples)
    for name in runs:
        same = sum(answers[name][k] == v for k, v in ref.items())
        ok &= same == len(ref)
        print(f"| {name} | {times[name]:.1f} | {times[name] / n_pairs:.2f} | "
              f"{times['re-prefill'] / times[name]:.1f}x | {same}/{len(ref)} |")
    examples = list(ref.items())[:3]
    print("\nexample answers:", "; ".join(f"{k[2]} r={k[4]}: {v!r}" for k, v in examples))
    if not ok:
        for name in runs:
            for k, v in ref.items():
                if answers[name][k] != v:
                    print(f"DIFF {name} {k[0]} {k[1]} {k[2]} r={k[4]}: {answers[name][k]!r} vs re-prefill {v!r}")
    print("answers identical:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
