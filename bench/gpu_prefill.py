"""Chunked prefill on the GPU at long contexts: time and peak memory, kvsqueeze's compressed caches vs full caches.

    python bench/gpu_prefill.py --lengths 32768,131072 --json prefill_128k.json
    python bench/gpu_prefill.py --lengths 1048576 --rows kvsq:knorm+kivi2,kvsq:knorm --json prefill_1m.json
    python bench/gpu_prefill.py --quick          # tiny shapes on the CPU: the script end to end, in seconds

The model is bench/gpu_decode.py's (`build_model`): a random-initialised Llama-3.1-8B config (32 layers, 32 query /
8 kv heads, head_dim 128) in bf16 on the GPU, no download. The prompt (random ids, batch 1) is prefilled in chunks
of `--chunk` tokens (kvsqueeze's `prefill`: the cache compressed after every chunk; transformers' DynamicCache
takes the same chunks), each chunk timed with CUDA events (read once at the end of the row).

Rows (`--rows` picks a subset by name or prefix):
  kvsq:knorm          K-norm at `--factor` x (compression_ratio 1 - 1/factor), full-precision storage
  kvsq:knorm+kivi2    the same with KIVI-2 storage (`layer_factory=kivi(2)`, CLI `--quant kivi-2`)
  kvsq:snapkv         SnapKV at `--factor` x (its scoring reads the chunk's last queries' attention)
  kvsq:full           kvsqueeze's cache, nothing evicted (the reference of the scoring overhead)
  hf-dynamic          transformers' DynamicCache (full)
A full row is skipped, with a note, where its KV (2 * layers * kv_heads * head_dim * length * 2 bytes: 137 GB at
1M tokens for 8B) with the weights and `--headroom-gb` would not fit the GPU's memory.

Columns: total seconds, ms per 1k prompt tokens over the whole prefill and over the last 10% of the chunks (the
marginal cost at that length: the chunk's attention over the kept cache grows with what is kept), peak GPU memory
(`torch.cuda.max_memory_allocated`, reset per row; weights included) and the KV bytes the cache holds at the end.
After the table: the scoring overhead per length, SnapKV's and K-norm's prefill time over kvsqueeze's full cache's
(issue 12's goal: SnapKV at 32k within 5%). Rows free their caches between them (one model for all rows); before
the table every row prefills 2 chunks untimed (`--no-warmup` skips it).

`--decode N` then decodes N tokens greedily through the row's cache (kvsqueeze's eager step, `decode_step`; two
untimed first), the median ms per token in the `decode ms` column: issue 12's "prefill 1M into 8x + KIVI-2, then
decode". With `--decode-static` the tokens go through kvsqueeze's static step instead
(`StaticCompressedCache.from_cache` of the prefilled cache, `StaticDecoder` compiled with CUDA graphs, its default
kernels on CUDA; under `--quick` torch's `aot_eager` backend): its first two (compiling) steps untimed, as
`bench/gpu_decode.py`'s static rows. `--report-every K` prints the elapsed seconds every K chunks (one host sync
each), so a run cut short by a time limit still shows how far it got and at what marginal cost.

Two readings of the overhead: with chunks shorter than the context, a compressed row's later chunks attend to the
kept cache only, so it can be faster than the full cache (negative overhead: eviction saves more than scoring
costs); with `--chunk` equal to the length (one chunk, compressed once at the end) both rows run the same attention
and the difference is the scoring and eviction alone.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from tqdm import tqdm  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import kvsqueeze as kq  # noqa: E402
from kvsqueeze.compat import cache_kwargs  # noqa: E402
from kvsqueeze.kernels import attention_sum  # noqa: E402

from _table import attempt, peak_gb, write_json  # noqa: E402
from gpu_decode import Clock, bench_target, build_model, cache_for, kv_bytes_of  # noqa: E402
from kvsqueeze.runtime.generate import decode_step  # noqa: E402

ROWS = ("kvsq:knorm", "kvsq:knorm+kivi2", "kvsq:snapkv", "kvsq:full", "hf-dynamic")
FULL_ROWS = ("kvsq:full", "hf-dynamic")


def full_kv_bytes(cfg: dict, length: int, itemsize: int) -> int:
    """Bytes of a full cache of `length` tokens (keys and values, every layer)."""
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * length * itemsize


@torch.no_grad()
def run_row(name: str, model, ids: torch.Tensor, args, device,
            decode: int = 0, report_every: int = 0) -> tuple[list[float], int, dict]:
    """Prefill `ids` (1, length) in chunks through the row's cache, then `decode` greedy steps: (seconds per chunk,
    KV bytes held at the end, {"decode_ms": median ms per decoded token, "decode_tokens": the timed tokens} or
    {}). `report_every` > 0 prints the elapsed seconds every that many chunks."""
    length = ids.shape[1]
    if name == "hf-dynamic":
        cache = DynamicCache(config=model.config)
    else:
        cache = cache_for(model, name.partition(":")[2], length, args)
    clock = Clock(device)
    starts = range(0, length, args.chunk)
    bar = tqdm(starts, desc=f"{length} {name}", unit="chunk", leave=False, mininterval=2.0,
               disable=args.no_progress)
    block = cache.prefill() if isinstance(cache, kq.CompressedCache) else contextlib.nullcontext()
    every = report_every
    t0 = time.perf_counter()
    with block:
        clock.mark()
        for i, s in enumerate(bar):
            logits = model(input_ids=ids[:, s:s + args.chunk], **cache_kwargs(model, cache), use_cache=True,
                           logits_to_keep=1).logits[:, -1]
            clock.mark()
            if every and (i + 1) % every == 0:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                print(f"{'':>8}   {name}: {s + args.chunk} of {length} tokens in {time.perf_counter() - t0:.1f} s",
                      flush=True)
    bar.close()
    seconds = [ms / 1e3 for ms in clock.steps_ms()]
    decoded: dict = {}
    if decode > 0:
        step = decode_stepper(model, cache, logits.argmax(-1), decode, device, getattr(args, "decode_static", False),
                              args.quick)
        for _ in range(2):  # untimed: the decode path's first calls (the static step compiles there)
            step()
        dclock = Clock(device)
        dclock.mark()
        toks = []
        for _ in range(decode):
            toks.append(step().clone())  # a CUDA-graph replay overwrites its outputs
            dclock.mark()
        decoded = {"decode_ms": statistics.median(dclock.steps_ms()), "decode_tokens": torch.cat(toks).tolist()}
    kv = kv_bytes_of(cache) if name == "hf-dynamic" else cache.stats().kv_bytes
    del cache
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds, kv, decoded


def decode_stepper(model, cache, tok: torch.Tensor, decode: int, device, static: bool, quick: bool):
    """A function decoding one greedy token per call from `tok` (1,) on top of the prefilled `cache`: kvsqueeze's
    eager step, or (`static`) the compiled static step over `StaticCompressedCache.from_cache(cache)` with room for
    the 2 untimed and `decode` timed tokens (DynamicCache rows: eager only)."""
    if not static or not isinstance(cache, kq.CompressedCache):
        state = {"tok": tok}

        def step():
            state["tok"] = decode_step(model, cache, state["tok"]).argmax(-1)
            return state["tok"]
        return step
    from kvsqueeze.runtime.static import StaticCompressedCache, StaticDecoder

    torch._dynamo.reset()  # one compiled step per cache (as bench/gpu_decode.py)
    opts = {"backend": "aot_eager"} if quick else {"mode": "reduce-overhead"}
    dec = StaticDecoder(model, StaticCompressedCache.from_cache(cache, decode + 3), compile=True, **opts)
    state = {"tok": tok}

    def step():
        state["tok"] = dec(state["tok"])[1]
        return state["tok"]
    return step


def row_names(args) -> list[str]:
    if not args.rows:
        return list(ROWS)
    want = [r.strip() for r in args.rows.split(",") if r.strip()]
    rows = [r for r in ROWS if any(r == w or r.startswith(w) for w in want)]
    unknown = [w for w in want if not any(r == w or r.startswith(w) for r in ROWS)]
    if unknown:
        raise SystemExit(f"error: unknown rows {', '.join(unknown)} (rows: {', '.join(ROWS)})")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--lengths", default="32768,131072,1048576", help="Context lengths, comma-separated.")
    ap.add_argument("--chunk", type=int, default=4096, help="Prefill chunk (tokens).")
    ap.add_argument("--factor", type=float, default=8.0, help="Compression factor of the compressed rows.")
    ap.add_argument("--rows", default="", help=f"Only these rows (names or prefixes): {', '.join(ROWS)}.")
    ap.add_argument("--headroom-gb", type=float, default=8.0,
                    help="Memory a full row needs beyond weights and its KV (activations, a layer's transient).")
    ap.add_argument("--attn", default="sdpa", help="The model's attention implementation (sdpa or eager).")
    ap.add_argument("--attention-sum", choices=("kernel", "torch"), default="kernel",
                    help="Attention-based scores' sum over queries: the two-pass kernel (kernels/attention_sum.py) "
                         "or the float32 chunks.")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="Skip the untimed prefill of 2 chunks per row before the table.")
    ap.add_argument("--decode", type=int, default=0,
                    help="Greedy tokens decoded after each row's prefill (eager step; median ms per token).")
    ap.add_argument("--decode-static", action="store_true",
                    help="Decode through kvsqueeze's compiled static step (from the prefilled cache), not the "
                         "eager one.")
    ap.add_argument("--report-every", type=int, default=0,
                    help="Print the elapsed seconds every this many chunks (0: never).")
    ap.add_argument("--no-progress", action="store_true", help="No tqdm bar over the chunks.")
    ap.add_argument("--json", default=None, help="Write the rows to this JSON file.")
    ap.add_argument("--quick", action="store_true", help="Tiny shapes on the CPU (checks the script end to end).")
    args = ap.parse_args(argv)
    if args.decode < 0 or args.report_every < 0:
        ap.error("--decode and --report-every take a count >= 0")
    names = row_names(args)
    attention_sum.KERNEL = args.attention_sum == "kernel"
    target = bench_target(args.quick)
    if target is None:
        return 2
    device, dtype, shapes = target
    if args.quick:
        lengths = [int(x) for x in (args.lengths if args.lengths != "32768,131072,1048576" else "512,1024").split(",")]
        args.chunk = min(args.chunk, 64)
        args.headroom_gb = 0.0
        torch.set_num_threads(1)  # tiny ops: threads contending with other jobs cost more than they give
    else:
        lengths = [int(x) for x in args.lengths.split(",")]
        memory = torch.cuda.get_device_properties(device).total_memory
    model = build_model(shapes, device, dtype, args.attn)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if args.quick:  # a pretend device: the full rows fit up to 768 tokens (so that --quick shows a skipped row)
        memory = weight_bytes + full_kv_bytes(shapes, 768, 4)
    itemsize = torch.empty((), dtype=dtype).element_size()
    print(f"model: Llama-3.1-8B shapes{' (tiny: --quick)' if args.quick else ''}, {dtype}, {args.attn}, batch 1; "
          f"weights {weight_bytes / 1e9:.2f} GB; chunks of {args.chunk}; compressed rows {args.factor:g}x", flush=True)
    print(f"{'context':>8} {'row':<18} {'seconds':>8} {'ms/1k':>8} {'ms/1k last10%':>13} {'peak GB':>8} "
          f"{'KV GB':>8}" + (f" {'decode ms':>10}" + (" (static step)" if args.decode_static else " (eager step)")
                             if args.decode else ""), flush=True)
    if args.warmup:  # every row's kernels run once untimed (the first row otherwise pays CUDA's and cuBLAS's set-up)
        ids0 = torch.randint(0, shapes["vocab_size"], (1, min(lengths[0], 2 * args.chunk))).to(device)
        for name in names:
            run_row(name, model, ids0, args, device)
        del ids0
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows_out: list[dict] = []
    for length in lengths:
        gen = torch.Generator().manual_seed(length)
        ids = torch.randint(0, shapes["vocab_size"], (1, length), generator=gen).to(device)
        for name in names:
            row = {"context": length, "row": name, "chunk": args.chunk}
            need = weight_bytes + full_kv_bytes(shapes, length, itemsize) + args.headroom_gb * 1e9
            if name in FULL_ROWS and need > memory:
                row["skipped"] = (f"full KV {full_kv_bytes(shapes, length, itemsize) / 1e9:.1f} GB + weights + "
                                  f"headroom > {memory / 1e9:.0f} GB of device memory" if not args.quick else
                                  "--quick's pretend device holds a full cache of 768 tokens at most (so that the "
                                  "skip shows)")
                rows_out.append(row)
                print(f"{length:>8} {name:<18} skipped: {row['skipped']}", flush=True)
                continue
            res = attempt(lambda: run_row(name, model, ids, args, device, args.decode, args.report_every), row,
                          rows_out, f"{length:>8} {name:<18}", device)
            if res is None:
                continue
            sec, kv, decoded = res
            n_last = max(1, len(sec) // 10)
            last_tokens = length - args.chunk * (len(sec) - n_last)
            total = sum(sec)
            row.update(seconds=total, ms_per_1k=total / length * 1e6,
                       ms_per_1k_last10=sum(sec[-n_last:]) / last_tokens * 1e6, peak_gb=peak_gb(device),
                       kv_bytes=kv, chunks=len(sec), weight_bytes=weight_bytes)
            if decoded:
                static = args.decode_static and name != "hf-dynamic"  # a DynamicCache decodes eagerly
                row.update(decoded, decode_steps=args.decode, decode_static=static)
            rows_out.append(row)
            print(f"{length:>8} {name:<18} {total:8.2f} {row['ms_per_1k']:8.1f} {row['ms_per_1k_last10']:13.1f} "
                  f"{row['peak_gb']:8.2f} {kv / 1e9:8.3f}" + (f" {decoded['decode_ms']:10.2f}" if decoded else ""),
                  flush=True)
        del ids
    by = {(r["context"], r["row"]): r for r in rows_out if "seconds" in r}
    for length in lengths:
        ref = by.get((length, "kvsq:full"))
        if ref is None:
            continue
        for name in ("kvsq:snapkv", "kvsq:knorm"):
            r = by.get((length, name))
            if r is not None:
                r["overhead_vs_full"] = r["seconds"] / ref["seconds"] - 1.0
                print(f"scoring overhead at {length}: {name} {r['overhead_vs_full']:+.1%} of kvsq:full's prefill time",
                      flush=True)
    write_json(args.json, args, rows_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
