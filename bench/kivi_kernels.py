"""Times the fused KIVI decode kernels of the static step on the GPU (kernels/kivi_decode.py: the split kernel and
the folded one, `fold=True`) over their launch settings, against the fp16 slot kernel over the same context.

    python bench/kivi_kernels.py                                   # H200: about a minute
    python bench/kivi_kernels.py --context 32768 --bits 2 --kernels split,folded --maxnreg 0,168,128 \\
        --per-sm 2,3,4 --stages 0,1 --json kivi_kernels.json

A case is Llama-3.1-8B's decode step at batch 1: query (1, 32, 128) bf16 over 8 kv heads, `--context` tokens
quantized by `quant.packing.quantize` (KIVI: keys per channel in groups of 32 tokens, values per token in groups
of 32 channels, codes packed along tokens) plus a residual of 31 full-precision tokens. `--layers` calls (one per
layer, own buffers each: nothing stays in L2) are captured in one CUDA graph and replayed: us per step (median of
`--reps` replays), us per call, and the bytes each call reads per second (codes, scales, zeros, residual). Every
variant is checked first against attention over the dequantized tensors (relative error of the output). The fp16
row is `slot_decode_attention` over the same context in bf16 (what the static step runs for a full cache). Needs
CUDA (one error line, exit 2, otherwise).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from _table import graph_us, int_list, name_list, write_json  # noqa: E402  (bench/, the script's own folder)

from kvsqueeze.kernels.kivi_decode import kivi_decode_static  # noqa: E402
from kvsqueeze.kernels.slot_decode import slot_decode_attention  # noqa: E402
from kvsqueeze.quant.packing import PER_CHANNEL, PER_TOKEN, quantize  # noqa: E402

KERNELS = ("split", "folded")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--context", default="32768", help="Quantized tokens per kv head, comma-separated.")
    ap.add_argument("--bits", default="2", help="KIVI bits (2, 4), comma-separated.")
    ap.add_argument("--kernels", default="split,folded", help=f"Kernels: {', '.join(KERNELS)}.")
    ap.add_argument("--maxnreg", default="0,168,128", help="Register caps per thread (0: the compiler's choice).")
    ap.add_argument("--per-sm", default="2,3,4", help="Programs per SM of the split plan.")
    ap.add_argument("--warps", default="4", help="Warps per program.")
    ap.add_argument("--stages", default="0", help="Software-pipelining stages (0: Triton's default, 3).")
    ap.add_argument("--layers", type=int, default=32, help="Calls per step (one per layer).")
    ap.add_argument("--reps", type=int, default=30, help="Timed replays per variant.")
    ap.add_argument("--json", default=None, help="Write the rows to this JSON file.")
    args = ap.parse_args(argv)
    try:
        contexts = int_list(args.context, "--context", minimum=32)
        bits_list = int_list(args.bits, "--bits")
        caps = int_list(args.maxnreg, "--maxnreg", minimum=0)
        per_sm = int_list(args.per_sm, "--per-sm")
        warps = int_list(args.warps, "--warps", pow2=True)
        stages = int_list(args.stages, "--stages", minimum=0)
        kernels = name_list(args.kernels, "--kernels", KERNELS)
        if any(b not in (2, 4) for b in bits_list):
            raise ValueError(f"--bits takes 2 and 4, got {args.bits!r}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: bench/kivi_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    B, HQ, HK, D, G, NR = 1, 32, 8, 128, 32, 31
    rows = []
    print(f"{args.layers} calls per step; us per step (median of {args.reps} CUDA graph replays)")
    for n in contexts:
        n = n // G * G
        q = torch.randn(B, HQ, D, device=dev, generator=g).bfloat16()
        nq, nr = torch.tensor([n], device=dev), torch.tensor([NR], device=dev)
        # fp16 reference row: the slot kernel over n + NR bf16 slots
        kv16 = [(torch.randn(B, HK, n + NR, D, device=dev, generator=g).bfloat16(),
                 torch.randn(B, HK, n + NR, D, device=dev, generator=g).bfloat16()) for _ in range(args.layers)]
        valid = torch.ones(B, HK, n + NR, dtype=torch.bool, device=dev)
        nbytes16 = 2 * kv16[0][0].numel() * 2
        us = graph_us(lambda: [slot_decode_attention(q, k, v, valid) for k, v in kv16], args.reps)
        per = us / args.layers
        print(f"  n={n:<7} fp16 slot kernel (bf16 cache)                 {us:9.1f} us per step {per:8.2f} per call "
              f"{nbytes16 / per / 1e3:8.0f} GB/s", flush=True)
        rows.append(dict(context=n, bits=16, variant="fp16 slot kernel", us_per_step=us, us_per_call=per,
                         gb_per_s=nbytes16 / per / 1e3, rel_err=0.0))
        kv16 = None  # free before the quantized layers
        for bits in bits_list:
            layers = []
            for _ in range(args.layers):
                k = torch.randn(B, HK, n, D, device=dev, generator=g)
                k[..., :4] *= 8  # outlier key channels
                v = torch.randn(B, HK, n, D, device=dev, generator=g)
                kq = quantize(k, bits, PER_CHANNEL, G, pack_along="token")
                vq = quantize(v, bits, PER_TOKEN, G, pack_along="token")
                kr = torch.randn(B, HK, NR + 1, D, device=dev, generator=g).bfloat16()
                vr = torch.randn(B, HK, NR + 1, D, device=dev, generator=g).bfloat16()
                layers.append((kq, vq, kr, vr))
            kq, vq, kr, vr = layers[0]
            keys = torch.cat([kq.dequantize(), kr[:, :, :NR].float()], 2).repeat_interleave(HQ // HK, 1)
            vals = torch.cat([vq.dequantize(), vr[:, :, :NR].float()], 2).repeat_interleave(HQ // HK, 1)
            ref = torch.softmax(torch.einsum("bhd,bhnd->bhn", q.float(), keys) * D ** -0.5, -1)
            ref = torch.einsum("bhn,bhnd->bhd", ref, vals)
            del keys, vals
            nbytes = sum(t.numel() * t.element_size() for t in (kq.codes, kq.scale, kq.zero, vq.codes, vq.scale,
                                                                 vq.zero)) + 2 * NR * HK * D * 2

            def call(lay, kernel, cap, pps, w, st):
                kq, vq, kr, vr = lay
                return kivi_decode_static(q, kq.codes, kq.scale, kq.zero, vq.codes, vq.scale, vq.zero, kr, vr, nq,
                                          nr, bits, G, G, num_warps=w, programs_per_sm=pps,
                                          fold=kernel == "folded", maxnreg=cap, num_stages=st or None)

            for kernel, cap, pps, w, st in itertools.product(kernels, caps, per_sm, warps, stages):
                name = f"KIVI-{bits} {kernel} maxnreg={cap or '-'} per_sm={pps} warps={w} stages={st or '-'}"
                try:
                    out = call(layers[0], kernel, cap, pps, w, st)
                    err = float((out.float() - ref).norm() / ref.norm())
                    us = graph_us(lambda: [call(lay, kernel, cap, pps, w, st) for lay in layers], args.reps)
                except Exception as e:  # report and keep going
                    print(f"  n={n:<7} {name}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                per = us / args.layers
                print(f"  n={n:<7} {name:<57} {us:9.1f} us per step {per:8.2f} per call "
                      f"{nbytes / per / 1e3:8.0f} GB/s  rel. err {err:.1e}", flush=True)
                rows.append(dict(context=n, bits=bits, variant=name, kernel=kernel, maxnreg=cap, per_sm=pps,
                                 warps=w, stages=st, us_per_step=us, us_per_call=per, gb_per_s=nbytes / per / 1e3,
                                 rel_err=err))
            layers = None
            torch.cuda.empty_cache()
    write_json(args.json, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
