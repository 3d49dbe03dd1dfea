"""Times the split-KV decode kernels' split plans on the GPU (programs per SM x block of slots x warps).

Two kernels: the slot kernel (evicted caches, every slot read) and the page kernel (Quest's selected pages read in
place). Their default plan (`split_kv.PROGRAMS_PER_SM`, block 64, 4 warps) was chosen from this table.

    python bench/split_plan.py                                       # H200: about a minute
    python bench/split_plan.py --slots 4096,16384 --per-sm 1,2,3 --block-n 32,64 --warps 4 --json plans.json

Each row captures `--layers` launches (one per layer, each over its own buffers, so that the KV comes from HBM as
in a decoding step) in one CUDA graph and replays it: us per step for all layers (median of `--reps` replays,
CUDA events), the KV bytes the kernels read per step, GB/s, and the largest difference from the torch reference
(float32 softmax; bf16 outputs). Shapes: Llama-3.1-8B's attention (32 query / 8 kv heads, head_dim 128), bf16,
batch `--batch`. Slot rows: C slots per layer, 7 of 8 valid (32k context cut 8x: 4096 slots; 128k cut 8x: 16384;
32k full: 32768). Page rows: `--pages` selected pages of 16 slots out of 131072 (Quest's budget 4096 at 128k).
Needs CUDA (one error line, exit 2, otherwise).

Merging the splits inside the split kernel (the last program of each (row, kv head) merging, found by an atomic
ticket) was measured here too, twelfth session, and was slower in every plan (docs/gpu.md); it was removed.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from _table import graph_us  # bench/, the script's own folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--slots", default="4096,16384,32768", help="Slot rows: slots per layer, comma-separated.")
    ap.add_argument("--pages", type=int, default=256, help="Page rows: selected pages (16 slots each) per step; "
                                                           "0: no page rows.")
    ap.add_argument("--per-sm", default="1,2,3,4", help="Programs per SM, comma-separated.")
    ap.add_argument("--block-n", default="32,64,128", help="Slots per block, comma-separated.")
    ap.add_argument("--warps", default="4", help="Warps per program, comma-separated.")
    ap.add_argument("--layers", type=int, default=32, help="Launches per step (one per layer, own buffers each).")
    ap.add_argument("--batch", type=int, default=1, help="Rows (sequences) per launch.")
    ap.add_argument("--reps", type=int, default=50, help="Timed replays of the step's CUDA graph (the median).")
    ap.add_argument("--json", default=None, help="Write the rows to this JSON file.")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench/split_plan.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from kvsqueeze.kernels.page_decode import page_decode_attention, reference_page_decode
    from kvsqueeze.kernels.slot_decode import reference_slot_decode, slot_decode_attention
    from kvsqueeze.kernels.split_kv import _sm_count, _split_plan

    dev = torch.device("cuda")
    B, HQ, HK, D, L, page = args.batch, 32, 8, 128, args.layers, 16
    ints = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731
    g = torch.Generator(device=dev).manual_seed(0)
    cases = [("slots", c) for c in ints(args.slots)] + ([("pages", 131072)] if args.pages else [])
    rows = []
    print(f"{'kernel':6} {'C':>7} {'sel':>6} {'per SM':>6} {'block':>5} {'warps':>5} {'splits':>6} {'us/step':>9} "
          f"{'GB/s':>7} {'diff':>8}")
    for kind, C in cases:
        qs = [torch.randn(B, HQ, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(L)]
        ks = [torch.randn(B, HK, C, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(L)]
        vs = [torch.randn(B, HK, C, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(L)]
        valid = torch.rand(B, HK, C, device=dev, generator=g) < 7 / 8
        valid[..., -1] = True
        sel = C
        if kind == "pages":
            sel = args.pages * page
            pages = torch.stack([torch.randperm(C // page, device=dev, generator=g)[:args.pages]
                                 for _ in range(B * HK)]).view(B, HK, -1).to(torch.int32)
            ref = reference_page_decode(qs[0], ks[0], vs[0], valid, pages, page)
        else:
            ref = reference_slot_decode(qs[0], ks[0], vs[0], valid)

        def run(i, **plan):
            if kind == "pages":
                return page_decode_attention(qs[i], ks[i], vs[i], valid, pages, page, **plan)
            return slot_decode_attention(qs[i], ks[i], vs[i], valid, **plan)

        read = L * B * HK * sel * D * 2 * 2  # keys and values, bf16
        for per_sm in ints(args.per_sm):
            for block_n in ints(args.block_n):
                for warps in ints(args.warps):
                    plan = dict(programs_per_sm=per_sm, block_n=block_n, num_warps=warps)
                    splits = _split_plan(B * HK, sel, block_n, _sm_count(dev), per_sm)[0]
                    diff = (run(0, **plan).float() - ref.float()).abs().max().item()
                    us = graph_us(lambda: [run(i, **plan) for i in range(L)], args.reps)
                    row = dict(kernel=kind, C=C, selected=sel, splits=splits, us_per_step=round(us, 1),
                               gbps=round(read / us / 1e3, 1), diff=diff, **plan)
                    rows.append(row)
                    print(f"{kind:6} {C:7d} {sel:6d} {per_sm:6d} {block_n:5d} {warps:5d} {splits:6d} {us:9.1f} "
                          f"{row['gbps']:7.1f} {diff:8.1e}", flush=True)
        qs = ks = vs = None  # free this case's buffers before the next
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
