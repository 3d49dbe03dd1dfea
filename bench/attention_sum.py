"""Times attention summed over the queries on the GPU, the prefill scores' core: the float32 chunks
(`attention_probs.attention_chunks`, the rule) against the two-pass Triton kernel (kernels/attention_sum.py).

    python bench/attention_sum.py                                  # H200: well under a minute
    python bench/attention_sum.py --cases 64x32768,4096x32768 --layers 8 --json attention_sum.json

A case WxN is W queries (SnapKV's window: 64; H2O's chunk: up to 4096) against N keys with Llama-3.1-8B's heads
(32 query / 8 kv heads, head_dim 128), bf16, batch 1, causal by position (the queries are the last W of the N
positions). Each variant runs `--layers` times (own inputs per layer, so the keys come from HBM as in a prefill)
between two CUDA events, eagerly (the chunks are a Python loop): ms per layer (median of `--reps`), and the
largest relative difference of the kernel's sums from the chunks'. Needs CUDA (one error line, exit 2, otherwise).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from _table import write_json  # noqa: E402  (bench/, the script's own folder)

from kvsqueeze.kernels.attention_probs import attention_chunks  # noqa: E402
from kvsqueeze.kernels.attention_sum import attention_sum_kernel  # noqa: E402


def _case(spec: str) -> tuple[int, int]:
    try:
        w, n = (int(x) for x in spec.split("x"))
    except ValueError:
        raise SystemExit(f"error: a case is WxN (e.g. 64x32768), got {spec!r}") from None
    if not 1 <= w <= n:
        raise SystemExit(f"error: case {spec!r} needs 1 <= W <= N")
    return w, n


def _chunks(q, k, **kw):
    return sum(c.probs.sum(2) for c in attention_chunks(q, k, **kw))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="64x32768,64x131072,4096x32768", help="WxN, comma-separated.")
    ap.add_argument("--layers", type=int, default=8, help="Calls per timing (one per layer, own inputs).")
    ap.add_argument("--reps", type=int, default=5, help="Timed repetitions per variant.")
    ap.add_argument("--json", default=None, help="Write the rows to this JSON file.")
    args = ap.parse_args(argv)
    cases = [_case(c) for c in args.cases.split(",")]
    if not torch.cuda.is_available():
        print("error: bench/attention_sum.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    hq, hk, d, scale = 32, 8, 128, 128 ** -0.5
    rows = []
    print(f"Llama-3.1-8B heads, bf16, batch 1; ms per layer (median of {args.reps} x {args.layers} layers)")
    for w, n in cases:
        qs = [torch.randn(1, hq, w, d, device=dev, dtype=torch.bfloat16) for _ in range(args.layers)]
        ks = [torch.randn(1, hk, n, d, device=dev, dtype=torch.bfloat16) for _ in range(args.layers)]
        qp = torch.arange(n - w, n, device=dev)[None]
        kp = torch.arange(n, device=dev).expand(1, hk, n)
        kw = dict(scaling=scale, q_positions=qp, k_positions=kp)
        ref = _chunks(qs[0], ks[0], **kw)
        diff = ((attention_sum_kernel(qs[0], ks[0], **kw) - ref).abs().max() / ref.abs().max()).item()
        for name, fn in (("float32 chunks", _chunks), ("two-pass kernel", attention_sum_kernel)):
            fn(qs[0], ks[0], **kw)  # compile / warm up
            times = []
            for _ in range(args.reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for q, k in zip(qs, ks):
                    fn(q, k, **kw)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / args.layers)
            ms = statistics.median(times)
            print(f"  {w:>5} x {n:<7} {name:<16} {ms:8.3f} ms per layer"
                  + (f"   max rel. diff {diff:.1e}" if name.startswith("two") else ""))
            rows.append(dict(queries=w, keys=n, variant=name, ms_per_layer=ms, max_rel_diff=diff))
        del qs, ks
        torch.cuda.empty_cache()
    write_json(args.json, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
