"""Sweep speed: one shared prefill per sample vs one prefill per (method, compression_ratio) pair, same answers.

    python bench/sweep_vs_reprefill.py --model smollm2-135m --length 2048 --samples 3

Runs the grid methods x compression_ratios (default 6 x 4) over passkey samples three ways:
  re-prefill   `generate_answer` for every pair (what a sweep without prefill sharing does);
  shared       `run_sweep`: one `record_prefill` per sample, every pair compressed from it, answers decoded for
               `--batch-size` caches at a time (a comma-separated list runs one shared sweep per size);
  shared, b=1  the same, answers decoded one pair at a time (exactly `greedy_decode`).
  kvpress      with `--kvpress-python PYTHON` (kvpress 0.5.5's venv): NVIDIA kvpress's own per-press loop on the
               same samples (`bench/peer_kvpress.py run --time`: its pipeline, one prefill per press and
               compression_ratio), over `--kvpress-presses` (default: the grid's methods that kvpress has, with
               ExpectedAttention for Q-Filters, which kvpress 0.5.5 cannot load offline) at the same
               compression_ratios; only its pipeline calls are timed (not its model load, nor one warm-up call).
Prints the wall time of each, the compression_ratios, and whether every answer is identical to the re-prefill one
(kvpress: how many of its answers equal kvsqueeze's for the same method and compression_ratio, for reference).
Exit status 1 when a kvsqueeze answer differs. Nothing is stored. Timings on a shared CPU are noisy: the runs are
interleaved per sample (each sample is timed under all protocols back to back) to limit the effect of load changes.

Offline, on one machine (the model in kvsqueeze's cache, e.g. after one `kvsqueeze eval`; kvpress's venv made with
`python3 -m venv /tmp/kvpress-venv && /tmp/kvpress-venv/bin/pip install torch==2.13.0 kvpress==0.5.5 gguf`):

    HF_HUB_OFFLINE=1 .venv/bin/python bench/sweep_vs_reprefill.py --length 2048 --samples 2 --threads 2 \
        --skip-unbatched --kvpress-python /tmp/kvpress-venv/bin/python
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import kvsqueeze as kq
import kvsqueeze.runtime.attention as attention_mod
from kvsqueeze.evaluation.sweep import make_pairs, run_sweep
from kvsqueeze.methods import split_methods
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
    ap.add_argument("--batch-size", default="8",
                    help="caches per batched answer decode; a comma-separated list (e.g. 8,24) times each")
    ap.add_argument("--answer-attention", default="runs",
                    help="the shared runs' answer-batch attention: runs (row by row over each row's slots), masked "
                         "(one masked batch), or runs,masked to time both")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--skip-unbatched", action="store_true", help="skip the shared, b=1 run")
    ap.add_argument("--kvpress-python", default=None,
                    help="python of kvpress 0.5.5's venv: also time kvpress's per-press loop on the same samples")
    ap.add_argument("--kvpress-presses", default="streaming_llm,snapkv,pyramidkv,tova,knorm,expected_attention",
                    help="kvpress presses (bench/peer_kvpress.py names), each at every compression_ratio")
    ap.add_argument("--model-dir", default=None,
                    help="the model's safetensors directory kvpress loads (default: kvsqueeze's cache copy)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    model, tok = kq.load_model(a.model)
    samples = build_samples(tok, a.tasks, TaskConfig(length=a.length, samples=a.samples))
    methods = split_methods(a.methods)  # commas inside name(key=value,...) stay
    compression_ratios = [float(r) for r in a.compression_ratios.split(",")]
    pairs = make_pairs(methods, compression_ratios)
    from kvsqueeze.runtime.calibration import prepare

    for p in pairs:
        prepare(p.method, model)  # Q-Filters calibration (first use) is not part of either timing
    print(f"{a.model}, {len(samples)} samples of ~{a.length} tokens ({a.tasks}), {len(methods)} methods x "
          f"{len(compression_ratios)} compression_ratios = {len(pairs)} pairs; torch threads "
          f"{torch.get_num_threads()}", flush=True)

    batch_sizes = [int(x) for x in str(a.batch_size).split(",") if x.strip()]
    runs = {"re-prefill": dict(share_prefill=False, batch_size=1)}
    modes = [m.strip() for m in a.answer_attention.split(",") if m.strip()]
    if not modes or set(modes) - {"runs", "masked"}:
        sys.exit(f"error: --answer-attention takes runs, masked or both, not {a.answer_attention!r}")
    for bs in batch_sizes:
        for mode in modes:
            label = f"shared, b={bs}" + (f" ({mode})" if len(modes) > 1 else "")
            runs[label] = dict(share_prefill=True, batch_size=bs, _row_by_row=mode == "runs")
    if not a.skip_unbatched:
        runs["shared, b=1"] = dict(share_prefill=True, batch_size=1)
    times = {k: 0.0 for k in runs}
    answers = {k: {} for k in runs}
    kvp = {"seconds": 0.0, "n_configs": 0, "answers": {}, "per_config": {}}
    if a.kvpress_python:
        times["kvpress loop"] = 0.0
        peer = _peer_module()
        from kvsqueeze.models import cache_dir

        model_dir = a.model_dir or str(cache_dir() / "models" / a.model)
        tmp = tempfile.mkdtemp(prefix="kvsq-bench-")
    for i, s in enumerate(samples):
        for name, kw in runs.items():
            kw = dict(kw)
            attention_mod.ROW_BY_ROW = kw.pop("_row_by_row", True)
            t0 = time.perf_counter()
            r = run_sweep(model, tok, [s], pairs, None, model_name=a.model, progress=False, keep_answers=True,
                          code_version="bench", **kw)
            times[name] += time.perf_counter() - t0
            answers[name].update(r.answers)
        if a.kvpress_python:
            out = _kvpress_time(a, peer, tok, s, model_dir, tmp, compression_ratios)
            times["kvpress loop"] += out["total"]
            kvp["n_configs"] = out["n_configs"]
            kvp["answers"].update(out["answers"])
            for k, v in out["seconds"].items():
                kvp["per_config"][k] = kvp["per_config"].get(k, 0.0) + v
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
    if a.kvpress_python:
        n_cfg = kvp["n_configs"] * len(samples)
        best = min((k for k in runs if k.startswith("shared")), key=lambda k: times[k])
        agree, compared = _kvpress_agreement(ref, kvp["answers"])
        print(f"| kvpress loop ({kvp['n_configs']} configurations: {a.kvpress_presses} x "
              f"{len(compression_ratios)} compression_ratios) | {times['kvpress loop']:.1f} | "
              f"{times['kvpress loop'] / max(n_cfg, 1):.2f} | per pair: kvsqueeze shared is "
              f"{(times['kvpress loop'] / max(n_cfg, 1)) / (times[best] / n_pairs):.1f}x "
              f"faster ({best}) | {agree}/{compared} equal to kvsqueeze's (same method) |")
        print("\nkvpress seconds per configuration (all samples): " + ", ".join(
            f"{k} {v:.1f}" for k, v in kvp["per_config"].items()))
    examples = list(ref.items())[:3]
    print("\nexample answers:", "; ".join(f"{k[2]} r={k[4]}: {v!r}" for k, v in examples))
    if not ok:
        for name in runs:
            for k, v in ref.items():
                if answers[name][k] != v:
                    print(f"DIFF {name} {k[0]} {k[1]} {k[2]} r={k[4]}: {answers[name][k]!r} vs re-prefill {v!r}")
    print("answers identical:", "yes" if ok else "NO")
    return 0 if ok else 1


def _peer_module():
    spec = importlib.util.spec_from_file_location("peer_kvpress", Path(__file__).resolve().parent / "peer_kvpress.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _kvpress_time(a, peer, tok, sample, model_dir: str, tmp: str, compression_ratios: list[float]) -> dict:
    """kvpress's per-press loop on one sample, in its own venv (`peer_kvpress.py run --time`): its KVPRESS_TIMES."""
    path = os.path.join(tmp, "sample.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps(peer.sample_rows(tok, [sample], 0, a.model)[0], ensure_ascii=False) + "\n")
    cmd = [a.kvpress_python, str(Path(__file__).resolve().parent / "peer_kvpress.py"), "run", path, "--time",
           "--model-dir", model_dir, "--model-name", a.model, "--presses", a.kvpress_presses,
           "--compression-ratios", ",".join(str(r) for r in compression_ratios),
           "--threads", str(a.threads or __import__("torch").get_num_threads())]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # kvpress's venv has its own transformers: nothing of kvsqueeze's environment
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("KVPRESS_TIMES ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"error: kvpress timing failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    for x in proc.stdout.splitlines():
        if x.endswith(": error: ") or ": error:" in x:
            print("kvpress:", x)
    return json.loads(line[len("KVPRESS_TIMES "):])


KVPRESS_NAMES = {"streaming_llm": "streaming_llm", "snapkv": "snapkv", "pyramidkv": "pyramidkv", "tova": "tova",
                 "knorm": "knorm"}


def _kvpress_agreement(ref: dict, kv_answers: dict) -> tuple[int, int]:
    """(equal, compared): kvpress's answers against kvsqueeze's re-prefill answers of the same method and
    compression_ratio (for reference only: the two tools implement some rules differently)."""
    agree = compared = 0
    for (task, sid, method, _params, ratio), ans in ref.items():
        press = KVPRESS_NAMES.get(method)
        other = kv_answers.get(f"{task}|{sid}|{press}|{float(ratio)}") if press else None
        if other is not None:
            compared += 1
            agree += other == ans
    return agree, compared


if __name__ == "__main__":
    sys.exit(main())
