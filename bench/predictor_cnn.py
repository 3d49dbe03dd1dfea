"""The static AttentionPredictor's CNN per decoding step on the GPU: torch's convolutions (cuDNN) against the fused
Triton kernel (kernels/predictor_cnn.py), for the slabs and the strip one step computes per sparse layer.

    python bench/predictor_cnn.py                          # H200: under a minute
    python bench/predictor_cnn.py --tokens 131072 --layers 30

Per sparse layer a step runs the CNN over a 7-row slab and a 6-row slab of P = tokens / 16 pages (rows unpadded)
and over a 64-row strip of 7 columns (columns unpadded; the step runs it transposed, as 7 rows of 64 columns with
the rows unpadded, and so does this bench), for b * q_heads = 32 images (Llama-3.1-8B). This captures `--layers`
such layers (own inputs each) in one CUDA graph per variant and replays it: us per step (median of `--reps`), and
the largest difference from the torch result. Variants: torch (float32 convolutions, cuDNN's default TF32), fused
with float32 products ("ieee"), fused with TF32 products, each fused one with the per-row kernel (`_cnn_rows`)
and the slab kernel (`_cnn_slab`: every output row of a slab in one program, conv1 built once per row; untimed
until this bench runs it). Needs CUDA (one error line, exit 2, otherwise).
"""

from __future__ import annotations

import argparse
import sys

import torch

from _table import graph_us  # bench/, the script's own folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768, help="Context tokens (P = tokens / 16 pages).")
    ap.add_argument("--layers", type=int, default=30, help="Sparse layers per step.")
    ap.add_argument("--images", type=int, default=32, help="b * q_heads.")
    ap.add_argument("--reps", type=int, default=30, help="Timed replays (the median).")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench/predictor_cnn.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from kvsqueeze.kernels.predictor_cnn import predictor_cnn, reference_predictor_cnn
    from kvsqueeze.selection import PredictorNet

    dev = torch.device("cuda")
    torch.manual_seed(0)
    net = PredictorNet().to(dev)
    w = (net.conv1.weight.detach(), net.conv1.bias.detach(), net.conv2.weight.detach(), net.conv2.bias.detach(),
         net.conv3.weight.detach()[0, :, 0].contiguous())
    P, N, L = args.tokens // 16, args.images, args.layers
    shapes = [((N, 7, P), False, True), ((N, 6, P), False, True), ((N, 7, 64), False, True)]
    inputs = []
    for _ in range(L):
        layer = []
        for shape, rows, cols in shapes:
            ok = torch.rand(*shape, device=dev) < 0.9
            layer.append(((torch.rand(*shape, device=dev) ** 4) * ok, ok, rows, cols))
        inputs.append(layer)
    variants = {
        "torch": lambda x, ok, r, c: reference_predictor_cnn(x, ok, *w, rows=r, cols=c),
        "fused ieee": lambda x, ok, r, c: predictor_cnn(x, ok, *w, rows=r, cols=c, precision="ieee", kernel="rows"),
        "fused tf32": lambda x, ok, r, c: predictor_cnn(x, ok, *w, rows=r, cols=c, precision="tf32", kernel="rows"),
        "slab ieee": lambda x, ok, r, c: predictor_cnn(x, ok, *w, rows=r, cols=c, precision="ieee", kernel="slab"),
        "slab tf32": lambda x, ok, r, c: predictor_cnn(x, ok, *w, rows=r, cols=c, precision="tf32", kernel="slab"),
    }
    ref = [variants["torch"](*a) for a in inputs[0]]
    print(f"{L} layers, {N} images, P = {P} pages: per step, the CNN of every sparse layer")
    for name, fn in variants.items():
        diff = max((fn(*a) - r).abs().max().item() for a, r in zip(inputs[0], ref))
        us = graph_us(lambda fn=fn: [fn(*a) for layer in inputs for a in layer], args.reps)
        print(f"{name:>11}: {us:9.1f} us per step; max |diff| from torch {diff:.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
