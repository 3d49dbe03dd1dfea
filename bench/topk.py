"""Times the page choice of the static selectors on the GPU: torch.topk + an index sort against the top-k kernels
(kernels/topk.py: algo "search", "sample" and "split"; the default "auto" takes split from 4096 scores on) over
their search widths, warps, tiles, samples and segments.

    python bench/topk.py                                   # H200: well under a minute
    python bench/topk.py --cases 8x8200:256 --ways 2,4,8,16 --warps 4,8,16 --tiles 1024,4096 --json topk.json
    python bench/topk.py --algos search,sample --samples 512,1024,2048 --ways 8,16 --warps 4,8 --tiles 1024,2048
    python bench/topk.py --algos sample,split --samples 2048 --segments 256,512,1024 --ways 8 --warps 4,8 --tiles 1024

A case RxP:k is R rows (batch x kv heads: 8 for Llama-3.1-8B at batch 1) of P page scores, k kept: 8x8200:256 is
Quest's budget 4096 at 128k in pages of 16 (the static cache's capacity adds the decoded tokens' pages, so P is
not a power of two), 8x2056:128 its budget 2048 at 32k. Each row captures `--layers` calls (one per layer, own
scores each) in one CUDA graph and replays it: us per step for all layers (median of `--reps` replays, CUDA
events). Scores look like Quest's: a softmax over the pages (distinct, positive), -inf for the last 8 pages (not
written yet) and +inf for one (the page being written). Before timing, every variant's output is checked against
the rule (the k largest, increasing, ties to the lowest index) on those scores and on rows with ties and
infinities: "ok" or the number of rows that differ. A "sample" or "split" variant is also checked on rows made to take its
full-row fallback (equal scores; the largest on the sample's positions), and prints how many rows took the
fallback (`fallback q/t/a`: of the Quest-like rows of the first layer, of the tie rows, of those made to: q should
be 0, a the rows made to when the row is longer than the buffer). Needs CUDA (one error line, exit 2,
otherwise).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from _table import graph_us, int_list, name_list, write_json  # noqa: E402  (bench/, the script's own folder)

from kvsqueeze.kernels.topk import (ALGOS, reference_topk_increasing, sample_fallbacks, sample_plan,  # noqa: E402
                                   topk_increasing)


def _rule(x: torch.Tensor, k: int) -> torch.Tensor:
    x = torch.nan_to_num(x.float(), nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k].sort(dim=-1).values


def _adversarial(x: torch.Tensor, k: int, sample: int) -> torch.Tensor:
    """Rows of x on which the sample kernel must take its fallback (where the row is longer than its sample): row 0
    equal scores (with one +inf and a few -inf: the compacted scores overflow the buffer unless it holds the row),
    odd rows the largest scores on the sample's positions (fewer than k reach the pivot unless k is within the
    pivot's sample rank); the other rows as x."""
    x = x.clone()
    S, ra, _, _ = sample_plan(x.shape[-1], k, sample)
    P = x.shape[-1]
    x[0] = 0.5
    x[0, ::11] = float("-inf")
    x[0, 3] = float("inf")
    if P > S:
        pick = torch.arange(S, device=x.device) * P // S
        x[1::2, pick] = 2.0 + torch.rand(S, device=x.device)
    return x


def _case(spec: str) -> tuple[int, int, int]:
    try:
        shape, k = spec.split(":")
        r, p = shape.split("x")
        r, p, k = int(r), int(p), int(k)
    except ValueError:
        raise SystemExit(f"error: a case is RxP:k (e.g. 8x8192:256), got {spec!r}") from None
    if not (r >= 1 and 1 <= k <= p):
        raise SystemExit(f"error: case {spec!r} needs R >= 1 and 1 <= k <= P")
    return r, p, k


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="8x8200:256,8x2056:128", help="RxP:k, comma-separated.")
    ap.add_argument("--ways", default="4,8", help="The kernel's search widths (powers of two).")
    ap.add_argument("--warps", default="4,8", help="The kernel's warps per program.")
    ap.add_argument("--tiles", default="1024,2048,4096", help="The kernel's tiles (scores per pass step).")
    ap.add_argument("--algos", default="search",
                    help="The kernels: search, sample, split (the default 'auto' takes split from 4096 scores on).")
    ap.add_argument("--samples", default="1024", help="The sample and split kernels' sample sizes (powers of two).")
    ap.add_argument("--segments", default="512", help="The split kernel's segments (scores per program, powers of two).")
    ap.add_argument("--layers", type=int, default=30, help="Calls per step (one per sparse layer).")
    ap.add_argument("--reps", type=int, default=30, help="Timed replays per variant.")
    ap.add_argument("--json", default=None, help="Write the rows to this JSON file.")
    args = ap.parse_args(argv)
    try:
        cases = [_case(c) for c in args.cases.split(",")]
        ways = int_list(args.ways, "--ways", minimum=2, pow2=True)
        warps = int_list(args.warps, "--warps")
        tiles = int_list(args.tiles, "--tiles", minimum=16, pow2=True)
        samples = int_list(args.samples, "--samples", minimum=16, pow2=True)
        segments = int_list(args.segments, "--segments", minimum=16, pow2=True)
        algos = name_list(args.algos, "--algos", ALGOS)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: bench/topk.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    print(f"{args.layers} calls per step; us per step (median of {args.reps} CUDA graph replays)")
    for R, P, k in cases:
        xs = [torch.softmax(torch.randn(R, P, device=dev, generator=gen) * 3, -1) for _ in range(args.layers)]
        for x in xs:
            x[:, -8:] = float("-inf")
            x[:, -9] = float("inf")
        ties = torch.floor(torch.rand(R, P, device=dev, generator=gen) * 8) / 8
        ties[0, ::5] = float("-inf")
        ties[-1, 1::9] = float("inf")
        # (name, fn, the sample kernel's arguments or None)
        variants = [("torch topk(sorted=False) + sort", reference_topk_increasing, None)]
        if "search" in algos:
            variants += [(f"kernel ways={w} warps={nw} tile={t}",
                          lambda x, k, w=w, nw=nw, t=t: topk_increasing(x, k, w, nw, t, algo="search"), None)
                         for w in ways for nw in warps for t in tiles]
        if "sample" in algos:
            variants += [(f"sample S={sm} ways={w} warps={nw} tile={t}",
                          lambda x, k, w=w, nw=nw, t=t, sm=sm: topk_increasing(x, k, w, nw, t, "sample", sm),
                          dict(ways=w, num_warps=nw, tile=t, sample=sm))
                         for sm in samples for w in ways for nw in warps for t in tiles]
        if "split" in algos:
            variants += [(f"split S={sm} seg={sg} ways={w} warps={nw} tile={t}",
                          lambda x, k, w=w, nw=nw, t=t, sm=sm, sg=sg: topk_increasing(x, k, w, nw, t, "split", sm,
                                                                                       sg),
                          dict(ways=w, num_warps=nw, tile=t, sample=sm, algo="split", segment=sg))
                         for sm in samples for sg in segments for w in ways for nw in warps for t in tiles]
        for name, fn, kw in variants:
            bad = sum(int((fn(x, k) != _rule(x, k)).any(-1).sum()) for x in (xs[0], ties))
            # torch's order of ties is unspecified: its tie rows are compared as value sets
            if name.startswith("torch"):
                bad = int((ties.gather(-1, fn(ties, k)).sort(-1).values
                           != ties.gather(-1, _rule(ties, k)).sort(-1).values).any(-1).sum())
                bad += int((fn(xs[0], k) != _rule(xs[0], k)).any(-1).sum())
            fell = None
            if kw is not None:  # the sample kernel: also rows made to fall back; the rows that did, per set
                adv = _adversarial(xs[0], k, kw["sample"])
                bad += int((fn(adv, k) != _rule(adv, k)).any(-1).sum())
                fell = [int(sample_fallbacks(x, k, **kw)[1].sum()) for x in (xs[0], ties, adv)]
            us = graph_us(lambda fn=fn: [fn(x, k) for x in xs], args.reps)
            check = "ok" if bad == 0 else f"{bad} rows differ"
            extra = "" if fell is None else "  fallback " + "/".join(map(str, fell))
            print(f"  {R}x{P}:{k:<5} {name:<42} {us:9.1f} us per step  {us / args.layers:7.2f} per call  {check}"
                  + extra)
            rows.append(dict(rows=R, pages=P, k=k, variant=name, us_per_step=us, us_per_call=us / args.layers,
                             rows_differ=bad, fallback_rows=fell))
    write_json(args.json, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
