"""Per-chunk cost of a chunked prefill into a compressed cache, the reference path and kvsqueeze's side by side (CPU).

    python bench/prefill_chunks.py --length 16384 --chunk 512          # K-norm 8x + KIVI-2, 2 layers of 8B's heads
    python bench/prefill_chunks.py --length 2048 --chunk 128 --layers 1 # seconds

A random Llama with Llama-3.1-8B's attention shapes (32 query / 8 kv heads, head_dim 128) and a tiny hidden size
(`--hidden`, `--layers`), so that what a chunk costs beyond the attention shows. The same prompt is prefilled in
chunks of `--chunk` tokens into a K-norm cache (compression_ratio 1 - 1/`--factor`) with KIVI-2 storage, twice:

  reference   every chunk attends through the model's kernel with the layer's (chunk x stored) mask and the stored
              keys repeated per query head (`attention.SPLIT_CHUNKS = False`), every eviction re-quantizes every
              kept token (`QuantStore.keep_whole_groups = False`) and K-norm re-scores the old slots from their
              dequantized keys (`CompressedCache.hold_static_scores = False`): the path before issue 12's prefill
              work
  kvsqueeze   the defaults: mask-free split attention (`attention.chunk_attention`), whole quantized groups kept as
              they are by an eviction, K-norm's scores held from when each slot was new

Per variant: ms per chunk over the first chunks (after the first) and the last 10%, their ratio (per-chunk cost
growth), the attention's share of the last chunks and what the chunks cost outside it (host clock around the
wrapped kernel or `chunk_attention`), tokens quantized per chunk at the end (`KIVIStore._compress`: the reference
re-quantizes every kept token), old slots dropped per eviction at the end (slots stored before the chunk: K-norm
over full precision drops a few; re-scored from 2-bit keys it dropped about half), the largest tensor a late chunk
allocates (a TorchDispatchMode over its forward: the reference's keys repeated per query head), slots kept and KV
bytes held. The last logits of the two variants are compared (max abs difference), and each with K-norm's over
full-precision storage (the same prompt). `--json` writes the rows.

Measured (2 cores shared, 1 thread; 16384 tokens, chunks of 512, 2 layers):
  variant    ms first  ms last  growth  attn share  ms out first  ms out last  quantized/chunk  old dropped  largest MB
  reference     455.0   1354.9    2.98       78.3%         193.9        294.6             1952        437.1        38.0
  kvsqueeze     399.3   1068.5    2.68       75.0%         151.0        266.7              896         13.2         9.5
  last logits vs K-norm over full precision: reference 0.918, kvsqueeze 0.341 (max |logit| 0.94)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import kvsqueeze as kq  # noqa: E402
from kvsqueeze.compat import cache_kwargs  # noqa: E402
from kvsqueeze.quant import kivi  # noqa: E402
from kvsqueeze.quant.base import QuantStore  # noqa: E402
from kvsqueeze.quant.kivi import KIVIStore  # noqa: E402
from kvsqueeze.runtime import attention  # noqa: E402
from kvsqueeze.storage.layer import CompressedLayer  # noqa: E402


class LargestTensor(TorchDispatchMode):
    """The bytes of the largest tensor any op returns inside the block (transients included)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):  # a view (expand, slice): no allocation
            return out
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.untyped_storage().nbytes())
        return out


def run(model, ids, chunk: int, factor: float, reference: bool, bits: int) -> dict:
    attention.SPLIT_CHUNKS = not reference
    QuantStore.keep_whole_groups = not reference
    kq.CompressedCache.hold_static_scores = not reference
    quantized: list[int] = []
    compress = KIVIStore._compress

    def counting(self, k, v):
        quantized[-1] += k.shape[-2]
        return compress(self, k, v)

    KIVIStore._compress = counting
    dropped: list[float] = []  # per eviction: slots stored before the forward that it drops (mean over heads)
    keep = CompressedLayer.keep

    def watching(self, idx, visible=None, plan=None):
        old = self.positions < self.cumulative_length - self.n_new
        dropped.append(float(old.sum(-1).float().mean() - old.gather(2, idx).sum(-1).float().mean()))
        return keep(self, idx, visible, plan)

    CompressedLayer.keep = watching
    times, attn = [], []
    inner, split = attention.sdpa_attention_forward, attention.chunk_attention

    def clocked(fn):
        def call(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                attn[-1] += time.perf_counter() - t0
        return call

    attention.sdpa_attention_forward, attention.chunk_attention = clocked(inner), clocked(split)
    cache = kq.CompressedCache(model, kq.get_method("knorm", compression_ratio=1 - 1 / factor),
                               layer_factory=kivi(bits) if bits else None)
    logits = None
    n_chunks = -(-ids.shape[1] // chunk)
    largest = 0
    try:
        with torch.no_grad(), cache.prefill():
            for i, s in enumerate(range(0, ids.shape[1], chunk)):
                quantized.append(0)
                attn.append(0.0)
                watch = LargestTensor() if i == n_chunks - 2 else contextlib.nullcontext()
                with watch:
                    t0 = time.perf_counter()
                    out = model(input_ids=ids[:, s:s + chunk], **cache_kwargs(model, cache), use_cache=True,
                                logits_to_keep=1)
                    times.append(time.perf_counter() - t0)
                if isinstance(watch, LargestTensor):
                    largest = watch.bytes
                logits = out.logits[:, -1]
    finally:
        KIVIStore._compress = compress
        CompressedLayer.keep = keep
        attention.sdpa_attention_forward, attention.chunk_attention = inner, split
        attention.SPLIT_CHUNKS = True
        QuantStore.keep_whole_groups = True
        kq.CompressedCache.hold_static_scores = True
    n = len(times)
    first = slice(1, 1 + max(1, min(3, n // 10)))
    last = slice(n - max(1, n // 10), n)

    def mean(xs):
        return sum(xs) / len(xs)

    t_first, t_last = mean(times[first]), mean(times[last])
    return dict(variant="reference" if reference else "kvsqueeze", chunks=n, ms_first=1e3 * t_first,
                ms_last=1e3 * t_last, growth=t_last / t_first, attention_share_last=mean(attn[last]) / t_last,
                ms_last_outside_attention=1e3 * (t_last - mean(attn[last])),
                ms_first_outside_attention=1e3 * (t_first - mean(attn[first])),
                quantized_last=mean(quantized[last]) / len(cache.layers), kept=cache.layers[0].n_stored,
                largest_tensor_mb=largest / 2**20,
                old_dropped_last=mean(dropped[-len(cache.layers) * (last.stop - last.start):]),
                kv_bytes=cache.stats().kv_bytes, logits=logits)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--factor", type=float, default=8.0)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      max_position_embeddings=max(4096, args.length), attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, args.length), generator=torch.Generator().manual_seed(0))
    rows = [run(model, ids, args.chunk, args.factor, ref, args.bits) for ref in (True, False)]
    dense = run(model, ids, args.chunk, args.factor, False, 0)["logits"]  # K-norm over full-precision storage
    diff = (rows[0]["logits"] - rows[1]["logits"]).abs().max().item()
    for r in rows:
        r["logit_diff_vs_fp"] = (r["logits"] - dense).abs().max().item()
    print(f"K-norm {args.factor:g}x + KIVI-{args.bits}, {args.length} tokens in chunks of {args.chunk}, "
          f"{args.layers} layers (32 q / 8 kv heads, head_dim 128), CPU {args.threads} thread(s)")
    print(f"{'variant':<10} {'chunks':>6} {'ms first':>9} {'ms last':>9} {'growth':>7} {'attn share':>10} "
          f"{'ms out first':>12} {'ms out last':>11} {'quantized/chunk':>15} {'old dropped':>11} {'largest MB':>10} "
          f"{'kept':>6} "
          f"{'KV bytes':>10}")
    for r in rows:
        print(f"{r['variant']:<10} {r['chunks']:>6} {r['ms_first']:9.1f} {r['ms_last']:9.1f} {r['growth']:7.2f} "
              f"{r['attention_share_last']:10.1%} {r['ms_first_outside_attention']:12.1f} "
              f"{r['ms_last_outside_attention']:11.1f} {r['quantized_last']:15.0f} {r['old_dropped_last']:11.1f} "
              f"{r['largest_tensor_mb']:10.1f} "
              f"{r['kept']:>6} {r['kv_bytes']:>10}")
    print(f"last logits, max |reference - kvsqueeze| = {diff:.3g} (of max |logit| "
          f"{rows[0]['logits'].abs().max().item():.3g}); max |variant - K-norm over full-precision storage|: "
          + ", ".join(f"{r['variant']} {r['logit_diff_vs_fp']:.3g}" for r in rows))
    if args.json:
        for r in rows:
            r.pop("logits")
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "logit_diff": diff}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
