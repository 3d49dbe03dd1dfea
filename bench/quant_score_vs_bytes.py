"""Score vs KV bytes: eviction only, quantization only, both composed, and transformers' QuantizedCache (quanto).

Passkey retrieval on smollm2-135m (CPU). One uncompressed prefill per sample is recorded and every configuration
is built from it (`PrefillRecord.compress(model, method, layer_factory)`, identical to prefilling with that configuration for a
single-chunk prefill), then the question is appended and the answer decoded greedily on the compressed cache.

    nice .venv/bin/python bench/quant_score_vs_bytes.py --samples 8 --length 2048 --out results/quant_score_vs_bytes.jsonl

Columns: accuracy (the key appears in the answer), KV bytes per context token over all layers as really held
(the model runs in fp32 on CPU: full-precision tensors are fp32; kvsqueeze's scales/zeros are fp16, quanto's are
in the model's dtype), the same bytes counted as if every floating tensor of the model's dtype were fp16 (what
an fp16 deployment would hold), and the compression factor against the full cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def inner_bytes(t) -> tuple[int, int]:
    """(bytes held, bytes if fp32 tensors were fp16) of a tensor, looking inside tensor subclasses (quanto)."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        parts = [inner_bytes(getattr(t, n)) for n in names]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)
    held = t.numel() * t.element_size()
    return held, (t.numel() * 2 if t.dtype == torch.float32 else held)


def cache_bytes(cache) -> tuple[int, int]:
    from kvsqueeze.storage import CompressedLayer
    from kvsqueeze.quant import QuantStore

    held = fp16 = 0
    for layer in cache.layers:
        if isinstance(layer, CompressedLayer) and isinstance(layer.store, QuantStore):
            tensors = list(layer.kv_tensors().values())
        elif isinstance(layer, CompressedLayer):
            tensors = [layer.keys, layer.values]
        else:  # transformers' QuantizedLayer (quanto)
            tensors = [layer._quantized_keys, layer._quantized_values, layer.keys, layer.values]
        for t in tensors:
            if t is not None:
                h, f = inner_bytes(t)
                held, fp16 = held + h, fp16 + f
    return held, fp16


def configs(with_quanto: bool):
    from kvsqueeze.methods import KNorm, MiKV, SnapKV, ZipCacheSaliency
    from kvsqueeze.quant import gear, kivi, mikv, zipcache

    out = [("full", "none", lambda: None, None)]
    for r, x in ((0.5, "2x"), (0.75, "4x"), (0.875, "8x")):
        out.append((f"snapkv {x}", "evict", lambda r=r: SnapKV(compression_ratio=r), None))
        out.append((f"knorm {x}", "evict", lambda r=r: KNorm(compression_ratio=r), None))
    for b in (4, 2):
        out.append((f"kivi-{b}", "quant", lambda: None, kivi(b)))
    for b in (4, 2):
        out.append((f"gear-{b}", "quant", lambda: None, gear(b)))
    out.append(("mikv-8-2 (snapkv 4x picks the 8-bit 25%)", "quant",
                lambda: MiKV(inner=SnapKV(compression_ratio=0.75)), mikv(8, 2)))
    out.append(("zipcache-4-2 (50% salient)", "quant", lambda: ZipCacheSaliency(compression_ratio=0.5), zipcache(4, 2)))
    for r, x, b in ((0.5, "2x", 4), (0.75, "4x", 4), (0.5, "2x", 2), (0.75, "4x", 2)):
        out.append((f"snapkv {x} + kivi-{b}", "both", lambda r=r: SnapKV(compression_ratio=r), kivi(b)))
    out.append(("knorm 2x + kivi-2", "both", lambda: KNorm(compression_ratio=0.5), kivi(2)))
    out.append(("knorm 4x + kivi-2", "both", lambda: KNorm(compression_ratio=0.75), kivi(2)))
    out.append(("knorm 2x + kivi-4", "both", lambda: KNorm(compression_ratio=0.5), kivi(4)))
    if with_quanto:
        for b in (4, 2):
            out.append((f"QuantizedCache quanto int{b}", "hf", b, None))
    return out


def quanto_available() -> str | None:
    try:
        import optimum.quanto  # noqa: F401
        from transformers import QuantizedCache  # noqa: F401
    except Exception as e:  # pragma: no cover
        return f"{type(e).__name__}: {e}"
    return None


@torch.no_grad()
def run_one(model, tok, rec, q_ids, kind, method_fn, factory, max_new, eos):
    from kvsqueeze.compat import cache_kwargs
    from kvsqueeze.runtime.generate import greedy_decode

    if kind == "hf":
        from transformers import QuantizedCache

        cache = QuantizedCache(backend="quanto", config=model.config, nbits=method_fn, q_group_size=32,
                               residual_length=32)
        for src, dst in zip(rec.cache.layers, cache.layers):
            dst.update(src.keys, src.values)  # what the prefill's first update does: quantize everything
    else:
        cache = rec.compress(model, method_fn(), factory)
    held, fp16 = cache_bytes(cache)
    logits = model(input_ids=q_ids, **cache_kwargs(model, cache), logits_to_keep=1).logits[:, -1]
    tokens = greedy_decode(model, cache, logits, max_new, eos)
    return tok.decode(tokens, skip_special_tokens=True).strip(), held, fp16


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--only", default="", help="comma-separated names: run only these configurations")
    ap.add_argument("--skip", type=int, default=0, help="skip the first N samples (resume a run)")
    ap.add_argument("--out", type=Path, default=Path("results/quant_score_vs_bytes.jsonl"))
    ap.add_argument("--table-only", action="store_true", help="print the table of an existing --out file")
    args = ap.parse_args(argv)

    if not args.table_only:
        from kvsqueeze import load_model
        from kvsqueeze.runtime.generate import _eos_ids, record_prefill, split_prompt
        from kvsqueeze.tasks.passkey import passkey_samples

        model, tok = load_model(args.model)
        why = quanto_available()
        if why:
            print(f"transformers' QuantizedCache (quanto) skipped: {why}", file=sys.stderr)
        cfgs = configs(why is None)
        if args.only:
            keys = [k.strip() for k in args.only.split(",")]
            cfgs = [c for c in cfgs if c[0] in keys or c[0].split(" (")[0] in keys]
        eos = _eos_ids(model, tok)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        samples = passkey_samples(tok, args.samples, args.length, seed=0)
        with args.out.open("a") as f:
            for i, s in enumerate(samples):
                if i < args.skip:
                    continue
                ctx, q = split_prompt(tok, s.context, s.question, s.answer_prefix)
                t0 = time.perf_counter()
                rec = record_prefill(model, torch.tensor([ctx]))
                print(f"sample {i}: {len(ctx)} context tokens, prefill {time.perf_counter() - t0:.1f} s", flush=True)
                q_ids = torch.tensor([q])
                for name, kind, m, fac in cfgs:
                    t0 = time.perf_counter()
                    ans, held, fp16 = run_one(model, tok, rec, q_ids, kind, m, fac, args.max_new_tokens, eos)
                    ok = any(a in ans for a in s.answers)
                    row = dict(config=name, kind=kind, sample=i, ok=ok, answer=ans, kv_bytes=held, kv_bytes_fp16=fp16,
                               n_ctx=len(ctx), n_layers=model.config.num_hidden_layers, seconds=time.perf_counter() - t0)
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    print(f"  {name:44s} {'ok ' if ok else 'ERR'} {held / len(ctx):9.0f} B/token  {ans!r}", flush=True)
                del rec
    print_table(args.out)


def print_table(path: Path):
    rows = list({(r["config"], r["sample"]): r for r in map(json.loads, path.open())}.values())  # last wins
    order, agg = [], {}
    for r in rows:
        if r["config"] not in agg:
            order.append(r["config"])
            agg[r["config"]] = dict(kind=r["kind"], ok=0, n=0, bpt=0.0, bpt16=0.0)
        a = agg[r["config"]]
        a["ok"] += r["ok"]
        a["n"] += 1
        a["bpt"] += r["kv_bytes"] / r["n_ctx"]
        a["bpt16"] += r["kv_bytes_fp16"] / r["n_ctx"]
    full = agg.get("full")
    full16 = full["bpt16"] / full["n"] if full else None
    print(f"\n{len(rows)} rows from {path}")
    print("\n| configuration | family | passkey acc | KV bytes / context token (held, fp32 model) | "
          "bytes / token as fp16 model | x smaller (fp16) |")
    print("|---|---|---|---|---|---|")
    for c in order:
        a = agg[c]
        n = a["n"]
        b16 = a["bpt16"] / n
        factor = f"{full16 / b16:.2f}x" if full16 else "-"
        print(f"| {c} | {a['kind']} | {a['ok']}/{n} ({100 * a['ok'] / n:.0f}%) | {a['bpt'] / n:,.0f} | {b16:,.0f} | {factor} |")


if __name__ == "__main__":
    main()
