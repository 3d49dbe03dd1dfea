"""Can a compiled, CUDA-graphed decode step overlap a host -> device copy with compute? A go / no-go probe for
issue 13's cross-token prefetch in the static step (AttentionPredictor names step t+1's pages during step t; their
copy could run on a side stream while the rest of step t computes).

    python bench/probe_side_stream.py              # H200: ~1 minute
    python bench/probe_side_stream.py --mb 64 --matmuls 40

Three versions of one function, each run eagerly and under `torch.compile(mode="reduce-overhead")` (CUDA graphs):
  serial     compute (a chain of bf16 matrix products), then the copy (pinned host -> device, `--mb` MB), one stream
  overlap    the copy forked onto a side stream with events (record, wait on the side stream, copy, record, and
             the main stream waits before returning), the compute on the main stream meanwhile
  compute    the compute alone; copy alone is timed eagerly
Prints ms per call (CUDA events, median of `--reps`) and whether `overlap` < `serial` under compilation. torch's
user-stream support under reduce-overhead is recent (pytorch/pytorch#180396, fixed by #180497, April 2026): on a
torch without it the compiled overlap row errors, and that line says so. Needs a CUDA GPU (exit 2 otherwise).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch


def _time(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ms = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ms.append(a.elapsed_time(b))
    return statistics.median(ms)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--mb", type=int, default=32, help="Bytes copied host -> device per call, in MB.")
    ap.add_argument("--matmuls", type=int, default=24, help="4096 x 4096 bf16 products per call (the compute).")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: this probe needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    n = args.mb * 2**20 // 2
    src = torch.randn(n, dtype=torch.bfloat16).pin_memory()
    dst = torch.empty(n, dtype=torch.bfloat16, device=dev)
    w = torch.randn(4096, 4096, dtype=torch.bfloat16, device=dev) / 64
    x = torch.randn(16, 4096, dtype=torch.bfloat16, device=dev)
    side = torch.cuda.Stream()
    forked, joined = torch.cuda.Event(), torch.cuda.Event()

    def compute(x):
        for _ in range(args.matmuls):
            x = torch.tanh(x @ w)
        return x

    def serial(x):
        y = compute(x)
        dst.copy_(src, non_blocking=True)
        return y

    def overlap(x):
        forked.record()
        with torch.cuda.stream(side):
            forked.wait()
            dst.copy_(src, non_blocking=True)
            joined.record()
        y = compute(x)
        joined.wait()
        return y

    copy_ms = _time(lambda: dst.copy_(src, non_blocking=True), args.reps)
    print(f"device: {torch.cuda.get_device_name(dev)}; torch {torch.__version__}; copy alone {copy_ms:.3f} ms "
          f"({args.mb} MB, {args.mb * 2**20 / copy_ms / 1e6:.1f} GB/s)")
    rows = {}
    for name, fn in (("compute", compute), ("serial", serial), ("overlap", overlap)):
        for compiled in (False, True):
            label = f"{name:<8} {'compiled (reduce-overhead)' if compiled else 'eager':<27}"
            try:
                f = fn
                if compiled:
                    torch._dynamo.reset()
                    f = torch.compile(fn, mode="reduce-overhead", fullgraph=True)

                def call(f=f, compiled=compiled):
                    if compiled:
                        torch.compiler.cudagraph_mark_step_begin()
                    return f(x)

                rows[name, compiled] = _time(call, args.reps)
                print(f"{label} {rows[name, compiled]:8.3f} ms", flush=True)
            except Exception as e:  # noqa: BLE001 - the probe reports what this torch cannot do
                msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
                print(f"{label}    error: {type(e).__name__}: {msg}", flush=True)
    if ("overlap", True) in rows and ("serial", True) in rows:
        saved = rows["serial", True] - rows["overlap", True]
        print(f"compiled: overlap saves {saved:.3f} ms of the copy's {copy_ms:.3f} ms "
              f"({'go' if saved > 0.5 * copy_ms else 'no-go'} for a side-stream prefetch in the static step)")
    else:
        print("compiled: no overlap row (no-go for a side-stream prefetch in the compiled step on this torch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
