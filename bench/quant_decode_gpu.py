"""Decode attention over a quantized KV cache on the GPU: fused Triton KIVI kernel vs dequantize-then-sdpa vs
fp16 sdpa vs transformers' QuantizedCache (optimum-quanto backend), for an 8B-shaped layer stack.

    python bench/quant_decode_gpu.py --context 32768 --layers 32 --hq 32 --hk 8 --d 128

Weights never matter here: one decode step's attention is q (B, 32, 1, 128) against every layer's cache; keys and
values are random fp16 with a few outlier channels (as real keys have), the same data for every variant.
Checks first (fresh random inputs, several shapes): the Triton kernel against the reference (dequantize with
torch, then fp32 attention), relative error ||out - ref|| / ||ref||, and that no output is NaN. Timing: CUDA
events around one step over all layers, warm-up, then the median (and min) over `--reps` repetitions, eager
(Python launches included) and replayed from a CUDA graph (GPU time only); the GB/s column is the KV bytes held
over the best of the two.

Variants (per decode step, all layers):
  fp16 sdpa (HF)        F.scaled_dot_product_attention(q, K, V, enable_gqa=True), what a model with sdpa runs
  fp16 sdpa (GQA rows)  the group's query heads as query rows of their kv head (fused kernels apply)
  KIVI-b ref            kvsqueeze's reference path: dequantize the packed store (torch) + cat residual + sdpa
  KIVI-b triton         the fused kernel (kernels/kivi_decode.py) over the packed store and residual
  KIVI-b step           append the new token (flushes a 32-token group every 32 steps) + fused kernel
  quanto int-b step     transformers' QuantizedCache layer update (dequantizes the whole cache, re-quantizes it
                        every residual_length steps) + sdpa; mean over a whole residual cycle
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from kvsqueeze.quant import kivi  # noqa: E402
from kvsqueeze.kernels.kivi_decode import gqa_decode_sdpa, kivi_decode_attention  # noqa: E402


def rand_kv(b, hk, n, d, device, gen):
    k = torch.randn(b, hk, n, d, device=device, generator=gen)
    k[..., : max(1, d // 32)] *= 8.0  # outlier channels in keys
    v = torch.randn(b, hk, n, d, device=device, generator=gen)
    return k.half(), v.half()


class Timer:
    """CUDA events on the GPU (a host clock on the CPU, for dry runs of this script under TRITON_INTERPRET=1)."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()

    def __enter__(self):
        if self.cuda:
            self.s, self.e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.s.record()
        else:
            self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.e.record()
            self.e.synchronize()
            self.ms = self.s.elapsed_time(self.e)
        else:
            self.ms = 1000 * (time.perf_counter() - self.t)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn, reps: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        with Timer() as t:
            fn()
        times.append(t.ms)
    return statistics.median(times), min(times)


CHECK_SHAPES = [  # b, hq, hk, d, n, bits
    (1, 32, 8, 128, 4096 + 45, 2), (1, 32, 8, 128, 4096 + 45, 4), (2, 32, 8, 128, 1000, 2), (1, 14, 2, 64, 777, 4),
    (3, 8, 8, 128, 20, 2), (1, 32, 8, 128, 70, 8), (1, 28, 4, 128, 32768 + 7, 2),
]


def graph_ms(fn, reps: int, warmup: int) -> tuple[float, float] | None:
    """The same step captured in a CUDA graph and replayed: GPU time without Python launch overhead."""
    if not torch.cuda.is_available():
        return None
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    sync()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    out = time_ms(g.replay, reps, warmup)
    del g
    return out


def check(device, shapes=CHECK_SHAPES) -> list[dict]:
    """Kernel vs reference on fresh random inputs, several shapes (incl. empty quantized part, ragged tails)."""
    rows = []
    gen = torch.Generator(device=device).manual_seed(1)
    for b, hq, hk, d, n, bits in shapes:
        k, v = rand_kv(b, hk, n, d, device, gen)
        layer = kivi(bits=bits)()
        layer.append(k, v)
        layer.commit()
        st = layer.store
        q = torch.randn(b, hq, 1, d, device=device, generator=gen).half()
        store = st.segments[0] if st.segments else None
        kf, vf = layer.keys.float(), layer.values.float()  # dequantized storage + residual
        g = hq // hk
        ref = torch.softmax((q.float() @ kf.repeat_interleave(g, 1).transpose(-1, -2)) * d**-0.5, -1) @ \
            vf.repeat_interleave(g, 1)
        out = kivi_decode_attention(q, store, st.residual_keys, st.residual_values)
        sync()
        err = float((out.float() - ref).norm() / ref.norm())
        rows.append(dict(shape=f"b{b} hq{hq} hk{hk} d{d} n{n} {bits}-bit", quantized=st.n_compressed,
                         rel_err=err, nan=bool(out.isnan().any())))
    return rows


def quanto_setup() -> str | None:
    """Import optimum-quanto; route its CUDA unpack to its own torch implementation (the CUDA extension is a
    JIT build of several minutes that the lease cannot afford). Returns None or why it is unavailable."""
    try:
        import importlib

        import optimum.quanto  # noqa: F401
        from transformers.cache_utils import QuantoQuantizedLayer  # noqa: F401

    except Exception as e:
        return f"{type(e).__name__}: {e}"

    def unpack(packed, bits):  # quanto's own torch implementation (library/unpack.py), restated
        per = 8 // bits
        parts = [(packed & (2 ** (bits * (i + 1)) - 1)) >> (bits * i) for i in range(per)]
        return torch.cat(parts).to(torch.uint8)

    try:
        import types

        qcuda = importlib.import_module("optimum.quanto.library.extensions.cuda")
        qcuda.ext._lib = types.SimpleNamespace(unpack=unpack)
    except Exception as e:  # no CUDA extension module: the default (torch) implementation is used anyway
        print(f"note: quanto CUDA extension not patched ({e})")
    return None


def nbytes_deep(t) -> int:
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(nbytes_deep(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hk", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--context", type=int, nargs="+", default=[32768])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-quanto", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time kernel launch settings at the first shape")
    ap.add_argument("--quanto-steps", type=int, default=128, help="steps timed for QuantizedCache (one residual cycle)")
    ap.add_argument("--json", default=None, help="write all numbers here")

    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script (TRITON_INTERPRET=1, tiny sizes)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    import transformers

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "missing"
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
    print(f"{name} | torch {torch.__version__} | triton {tv} | transformers "
          f"{transformers.__version__}", flush=True)
    results = {"checks": [], "timings": []}

    t0 = time.time()
    kernel_ok = True
    try:
        results["checks"] = check(device, CHECK_SHAPES if device.type == "cuda" else [(1, 8, 2, 64, 100, 2)])
    except Exception:  # keep timing the other variants
        import traceback

        traceback.print_exc()
        kernel_ok = False
    print("\nkernel check (Triton vs dequantize + fp32 attention):")
    for r in results["checks"]:
        print(f"  {r['shape']:34s} quantized {r['quantized']:6d}  rel err {r['rel_err']:.2e}  nan {r['nan']}")
    if results["checks"]:
        worst = max(r["rel_err"] for r in results["checks"])
        kernel_ok = worst < 1e-2 and not any(r["nan"] for r in results["checks"])
        print(f"  worst rel err {worst:.2e} ({'PASS' if kernel_ok else 'FAIL'})  [{time.time() - t0:.1f} s]", flush=True)

    why_quanto = None if not args.no_quanto else "disabled"
    if why_quanto is None:
        why_quanto = quanto_setup()
    if why_quanto:
        print(f"QuantizedCache (quanto) not timed: {why_quanto}")

    L, HQ, HK, D = args.layers, args.hq, args.hk, args.d
    scale = D**-0.5
    table = []
    for B in args.batch:
        for N in args.context:
            gen = torch.Generator(device=device).manual_seed(0)
            print(f"\n== batch {B}, context {N}, {L} layers, {HQ} q / {HK} kv heads, head_dim {D} ==", flush=True)
            kv = [rand_kv(B, HK, N, D, device, gen) for _ in range(L)]
            q = torch.randn(B, HQ, 1, D, device=device, generator=gen).half()
            fp16_bytes = sum(k.numel() * 2 * 2 for k, _ in kv)

            def row(name, ms, held, gms=None):
                best = gms if gms is not None else ms
                per_layer_us = 1000 * best[0] / L
                gbps = held / (best[0] / 1000) / 1e9 if held else float("nan")
                table.append(dict(batch=B, context=N, variant=name, median_ms=ms[0] if ms else None,
                                  min_ms=ms[1] if ms else None, graph_ms=gms[0] if gms else None,
                                  us_per_layer=per_layer_us, kv_bytes=held, gbps=gbps))
                eager = f"{ms[0]:8.3f} ms eager (min {ms[1]:.3f})" if ms else f"{'-':>8s}         eager         "
                graph = f"{gms[0]:7.3f} ms graph" if gms else "       -       "
                print(f"  {name:34s} {eager}  {graph}  {per_layer_us:7.1f} us/layer  KV {held / 2**30:6.3f} GiB  "
                      f"{gbps:7.0f} GB/s", flush=True)

            def trow(name, fn, reps, held, graph=True, eager=True):
                try:
                    ms = time_ms(fn, reps, args.warmup) if eager else None
                    gms = graph_ms(fn, reps, args.warmup) if graph else None
                    row(name, ms, held, gms)
                except Exception as e:  # report and keep going
                    print(f"  {name}: failed: {type(e).__name__}: {e}", flush=True)

            trow("fp16 sdpa (HF, enable_gqa)", lambda: [F.scaled_dot_product_attention(
                q, k, v, scale=scale, enable_gqa=True) for k, v in kv], args.reps, fp16_bytes)
            trow("fp16 sdpa (GQA rows)", lambda: [gqa_decode_sdpa(q, k, v, scale) for k, v in kv], args.reps, fp16_bytes)
            for bits in args.bits:
                layers = []
                for k, v in kv:
                    lay = kivi(bits=bits)()
                    lay.append(k, v)
                    lay.commit()
                    layers.append(lay)
                held = sum(lay.kv_nbytes() for lay in layers)
                # the reference path as the model runs it: dequantize + cat + sdpa (without appending)
                trow(f"KIVI-{bits} ref (dequant + sdpa)", lambda: [F.scaled_dot_product_attention(
                    q, lay.store._materialize(0), lay.store._materialize(1), scale=scale, enable_gqa=True)
                    for lay in layers],
                    args.reps, held)
                if not kernel_ok:
                    print("  (Triton variants skipped: the kernel check failed)")
                else:
                    trow(f"KIVI-{bits} triton (fused)", lambda: [lay.store.fused_decode_attention(q, scale) for lay in layers],
                         args.reps, held)
                if kernel_ok and args.sweep and B == args.batch[0] and N == args.context[0]:
                    for fold in (False, True):
                        for bn, nw, pps, ns in ((64, 4, 4, None), (128, 4, 4, None), (128, 8, 4, None),
                                                (64, 8, 4, None), (128, 4, 2, None), (64, 4, 2, None),
                                                (64, 4, 4, 4), (128, 4, 4, 4)):
                            def fused(bn=bn, nw=nw, pps=pps, ns=ns, fold=fold):
                                for lay in layers:
                                    st = lay.store
                                    kivi_decode_attention(q, st.segments[0], st.residual_keys, st.residual_values, scale,
                                                          block_n=bn, num_warps=nw, programs_per_sm=pps,
                                                          num_stages=ns, fold=fold)
                            trow(f"KIVI-{bits} triton {'fold' if fold else 'bcast'} bn{bn} w{nw} p{pps} s{ns or '-'}",
                                 fused, args.reps, held, eager=False)
                k1 = torch.randn(B, HK, 1, D, device=device, generator=gen).half()

                def step():
                    for lay in layers:
                        lay.append(k1, k1)
                        lay.commit()
                        lay.store.fused_decode_attention(q, scale)

                if kernel_ok:
                    trow(f"KIVI-{bits} step (append + fused)", step, max(args.reps, 64), held, graph=False)
                del layers
                torch.cuda.empty_cache()
                if why_quanto is None and B == args.batch[0]:
                    from transformers.cache_utils import QuantoQuantizedLayer

                    try:
                        qlayers = []
                        for k, v in kv:
                            ql = QuantoQuantizedLayer(nbits=bits)  # transformers' defaults: group 64, residual 128
                            ql.update(k, v)
                            qlayers.append(ql)
                        qheld = sum(nbytes_deep(ql._quantized_keys) + nbytes_deep(ql._quantized_values)
                                    for ql in qlayers)

                        def qstep():
                            for ql in qlayers:
                                kk, vv = ql.update(k1, k1)
                                F.scaled_dot_product_attention(q, kk, vv, scale=scale, enable_gqa=True)

                        # one full residual cycle: the flush (re-quantizing everything) is inside the mean
                        for _ in range(3):
                            qstep()
                        sync()
                        ts = []
                        for _ in range(args.quanto_steps):
                            with Timer() as t:
                                qstep()
                            ts.append(t.ms)
                        row(f"quanto int{bits} step (update + sdpa)", (statistics.median(ts), min(ts)), qheld)  # eager
                        table[-1]["mean_ms"] = statistics.mean(ts)
                        print(f"  {'':34s} mean over {len(ts)} steps incl. flushes: {statistics.mean(ts):.3f} ms/step",
                              flush=True)
                        del qlayers
                    except Exception as e:  # report, keep the rest of the run
                        import traceback

                        traceback.print_exc(limit=-4)
                        print(f"  quanto int{bits}: failed: {type(e).__name__}: {e}", flush=True)
                    torch.cuda.empty_cache()
            del kv
            torch.cuda.empty_cache()
    results["timings"] = table
    print("\n| batch | context | variant | eager ms / step | CUDA-graph ms / step | us / layer | KV GiB | GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        extra = f" (mean {r['mean_ms']:.2f})" if "mean_ms" in r else ""
        eager = f"{r['median_ms']:.3f}{extra}" if r["median_ms"] is not None else "-"
        graph = f"{r['graph_ms']:.3f}" if r["graph_ms"] is not None else "-"
        print(f"| {r['batch']} | {r['context']} | {r['variant']} | {eager} | {graph} | {r['us_per_layer']:.1f} | "
              f"{r['kv_bytes'] / 2**30:.3f} | {r['gbps']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
