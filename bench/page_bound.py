"""Times Quest's page bound on the GPU (kernels/page_bound.py) over its launch settings, against the two float32
matrix products of the eager rule (`selection.quest.page_scores`).

    python bench/page_bound.py                                     # H200: under a minute
    python bench/page_bound.py --pages 8200,2056 --blocks 16,32,64,128 --warps 2,4,8 --forms sum,products \\
        --json page_bound.json

A case is Llama-3.1-8B's decode step at batch 1: query (1, 32, 128) bf16, page metadata kmin / kmax (1, 8, P,
128) bf16 (P = 8200: 128k tokens in pages of 16 plus the decoded tokens' pages; 2056: 32k). `--layers` calls (one
per sparse layer, own metadata each) are captured in one CUDA graph and replayed (each form: the elementwise sum
as Quest writes it, and the same sum as two tensor-core products, M . q+ + m . q-): us per step (median of
`--reps` replays), us per call, and the metadata read per second (2 P 8 128 2 bytes per call). Every variant is
checked first against the rule in torch (max relative difference). Needs CUDA (one error line, exit 2,
otherwise).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from _table import graph_us, int_list, name_list, write_json  # noqa: E402  (bench/, the script's own folder)

from kvsqueeze.kernels.page_bound import page_bound, reference_page_bound  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--pages", default="8200,2056", help="Pages per (row, kv head), comma-separated.")
    ap.add_argument("--blocks", default="16,32,64,128", help="Pages per program (powers of two).")
    ap.add_argument("--warps", default="2,4,8", help="Warps per program.")
    ap.add_argument("--forms", default="sum,products",
                    help="The kernel's forms: sum (elementwise, the default) and products (two tl.dot).")
    ap.add_argument("--layers", type=int, default=30, help="Calls per step (one per sparse layer).")
    ap.add_argument("--reps", type=int, default=30, help="Timed replays per variant.")
    ap.add_argument("--json", default=None, help="Write the rows to this JSON file.")
    args = ap.parse_args(argv)
    try:
        pages = int_list(args.pages, "--pages")
        blocks = int_list(args.blocks, "--blocks", pow2=True)
        warps = int_list(args.warps, "--warps", pow2=True)
        forms = name_list(args.forms, "--forms", ("sum", "products"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: bench/page_bound.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from kvsqueeze.selection.quest import page_scores

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    print(f"{args.layers} calls per step; us per step (median of {args.reps} CUDA graph replays)")
    for P in pages:
        q = torch.randn(1, 32, 128, device=dev, generator=g).bfloat16()
        meta = []
        for _ in range(args.layers):
            a = torch.randn(1, 8, P, 128, device=dev, generator=g).bfloat16()
            b = a + torch.rand(1, 8, P, 128, device=dev, generator=g).bfloat16()
            meta.append((a, b))
        nbytes = 2 * meta[0][0].numel() * meta[0][0].element_size()
        ref = reference_page_bound(q, *meta[0])
        variants = [("torch: two float32 products (eager rule)",
                     lambda q, a, b: page_scores(q.float(), a.float(), b.float()))]
        variants += [(f"kernel {f} block_p={bp} warps={w}",
                      lambda q, a, b, bp=bp, w=w, f=f: page_bound(q, a, b, bp, w, products=f == "products"))
                     for f in forms for bp in blocks for w in warps if f == "sum" or bp >= 16]
        for name, fn in variants:
            diff = ((fn(q, *meta[0]) - ref).abs().max() / ref.abs().max()).item()
            us = graph_us(lambda fn=fn: [fn(q, a, b) for a, b in meta], args.reps)
            per = us / args.layers
            print(f"  P={P:<6} {name:<42} {us:9.1f} us per step {per:8.2f} per call {nbytes / per / 1e3:8.0f} GB/s"
                  f"  max rel. diff {diff:.1e}", flush=True)
            rows.append(dict(pages=P, variant=name, us_per_step=us, us_per_call=per, gb_per_s=nbytes / per / 1e3,
                             max_rel_diff=diff))
    write_json(args.json, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
