"""Offloaded decoding, side by side (issue 13, item 5): transformers' offloaded DynamicCache against kvsqueeze's
selection on the GPU and offloaded to CPU memory, with AttentionPredictor's prefetch and with Quest on demand.

    python bench/gpu_offload.py --lengths 32768,131072 --json offload.json     # the issue's rows (H200)
    python bench/gpu_offload.py --quick                                        # tiny shapes on the CPU, seconds

A random-initialised model with Llama-3.1-8B's shapes (bf16 on the GPU; `gpu_decode.py`'s builder, no download).
The prompt (random ids) is prefilled in chunks (`--chunk`), then one token per step is decoded greedily, `--warmup`
untimed steps and `--steps` timed ones (CUDA events; ms/token is the median step).

Rows (`--rows` picks a subset by name):
  hf-offloaded          transformers' DynamicCache(offloading=True): every layer's KV in CPU memory, each layer's
                        whole KV copied to the GPU for its step (full attention)
  kvsq-gpu:ap           kvsqueeze, the whole cache on the GPU, each step attending to --budget tokens chosen by
  kvsq-gpu:quest        AttentionPredictor / Quest (the reference the offloaded rows must equal)
  kvsq-offload:ap       the sparse layers' KV in (pinned) CPU memory, fixed GPU frames for the budget's pages; the
                        next step's pages predicted and copied on a side stream during the current step
  kvsq-offload:quest    the same store, pages fetched on demand once the step's query is known (no prefetch)
  kvsq-static:quest     kvsqueeze's static decode step (one CUDA graph, runtime/static.py) with Quest, the whole
                        cache on the GPU, the selected pages read in place by the Triton page kernel
  kvsq-static-mapped:quest  the same step with the sparse layers' KV in mapped host memory (storage/mapped.py):
                        the page kernel reads every selected page over the host link in place, no copies, no
                        page table (`from_cache(..., offload="cpu", page_frames=False)`; the prefill runs on the
                        GPU, shared with kvsq-static:quest, then the cache is copied out: the peak column includes
                        that prefill; `CompressedCache(offload="cpu")` prefills without ever holding the whole KV
                        on the GPU, slower)
  kvsq-static-offload:quest  the same, with device page frames (storage/frames.py, the default): each step copies
                        only the selected pages its frames do not hold from the step before (page table on the
                        device, one CUDA graph)
  kvsq-static:ap        the static step with AttentionPredictor (selection/static_attention_predictor.py), on the
  kvsq-static-offload:ap  GPU / offloaded with page frames: the pages it predicts from the history change little
                        from step to step, so few cross the link
  kvsq-static-prefetch:ap  offloaded with page frames and AttentionPredictor's cross-token prefetch
                        (`from_cache(..., prefetch=True)`): each layer's next pages predicted right after its
                        attention and copied on a side CUDA stream while the step goes on (joined at its end)

Budgets: --budget-per-length (default 32768:2048,131072:4096, the issue's goals), else --budget. The random model
has no trained predictor: AttentionPredictor runs its CNN initialised to the history heuristic
(`PredictorNet.init_blend`; the CNN's cost does not depend on its weights).

Columns: ms/token (the median step), mean (AttentionPredictor's calibration steps, every 5th, count there); moved = host -> device bytes per decoded token (offloaded rows: the store's counters over every
step, warm-up included; hf-offloaded: every layer's KV once per step, an estimate from its cache size;
static offloaded rows: `StaticCompressedCache.offload_stats()`, every step since the conversion, warm-up
included; kvsq-static-mapped: every selected page of the host layers, read over the link in place); hit = pages
a step needed that were already on the GPU (prefetched, or kept from the step before); GPU KV = key / value bytes
held on the GPU after the last step (hf-offloaded: not counted by transformers, shown as '-'; static rows: plus
Quest's page metadata, printed after a '+'); host KV = bytes in
CPU memory; peak = max GPU memory allocated over the row (weights and prefill included); same = whether the
offloaded row's tokens equal those of the kvsq-gpu row with the same selector (the rows must agree exactly).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)

from transformers import DynamicCache  # noqa: E402

import kvsqueeze as kq  # noqa: E402
from kvsqueeze.compat import cache_kwargs  # noqa: E402
from kvsqueeze.runtime.generate import decode_step, prefill  # noqa: E402
from kvsqueeze.runtime.static import StaticCompressedCache, StaticDecoder  # noqa: E402
from kvsqueeze.selection import AttentionPredictor, PredictorNet, Quest  # noqa: E402

import gpu_decode  # noqa: E402
from _table import attempt, peak_gb, write_json  # noqa: E402
from gpu_decode import (TINY, add_bound_option, add_topk_option, bench_target, build_model, hf_prefill,  # noqa: E402
                        kv_bytes_of, set_bound, set_topk, timed)

ROWS = ("hf-offloaded", "kvsq-gpu:ap", "kvsq-offload:ap", "kvsq-gpu:quest", "kvsq-offload:quest", "kvsq-static:quest",
        "kvsq-static-mapped:quest", "kvsq-static-offload:quest", "kvsq-static:ap", "kvsq-static-offload:ap",
        "kvsq-static-prefetch:ap")


def budget_for(length: int, args) -> int:
    for item in args.budget_per_length.split(","):
        if item.strip():
            n, _, b = item.partition(":")
            if int(n) == length:
                return int(b)
    return args.budget


def selector_for(kind: str, budget: int):
    if kind == "quest":
        return Quest(budget)
    return AttentionPredictor(budget, predictor=PredictorNet().init_blend(0.75, noise=0.0))


def run_row(name, model, ids, args, device, budget):
    """One row: a dict of its measures (and the decoded tokens, for the equality column)."""
    toks: list[int] = []
    if name == "hf-offloaded":
        cache = DynamicCache(config=model.config, offloading=True)
        with torch.no_grad():
            tok = hf_prefill(model, cache, ids, args.chunk).argmax(-1)

        def step():
            nonlocal tok
            out = model(input_ids=tok[:, None], **cache_kwargs(model, cache), use_cache=True)
            tok = out.logits[:, -1].argmax(-1)

        with torch.no_grad():
            ms = timed(step, args.warmup, args.steps, device)
        kv = kv_bytes_of(cache)
        return dict(ms=ms, moved_per_token=kv, hit_rate=None, gpu_kv=None, host_kv=kv, tokens=None)
    kind, _, sel_name = name.partition(":")
    selector = selector_for(sel_name, budget)
    if kind.startswith("kvsq-static"):
        return static_row(kind, model, ids, args, device, selector)
    cache = kq.CompressedCache(model, None, selector=selector, offload="cpu" if kind == "kvsq-offload" else None,
                               offload_latency=args.latency if device.type != "cuda" else 0.0)
    with torch.no_grad():
        tok = prefill(model, cache, ids, args.chunk).argmax(-1)

    def step():
        nonlocal tok
        tok = decode_step(model, cache, tok).argmax(-1)
        toks.append(tok)

    with torch.no_grad():
        ms = timed(step, args.warmup, args.steps, device)
    st = cache.stats()
    out = dict(ms=ms, gpu_kv=st.device_kv_bytes, host_kv=st.host_kv_bytes, moved_per_token=0, hit_rate=None,
               tokens=torch.stack(toks).tolist())
    if cache.offload_tier:
        o = cache.offload_stats()
        out.update(moved_per_token=o["bytes_per_token"], hit_rate=o["hit_rate"], pages_per_token=o["pages_per_token"],
                   prefetch_pages=o["prefetch_pages"], demand_pages=o["demand_pages"], full_fetches=o["full_fetches"])
    return out


_PREFILLED: dict = {}  # (length, budget) -> (the eager Quest cache after the prefill, its first token)


def static_row(kind, model, ids, args, device, selector):
    """A static-step row: the eager Quest cache prefilled on the GPU (once per length, shared by both static rows),
    copied into the static cache (for kvsq-static-offload with the sparse layers in mapped host memory,
    `from_cache(..., offload="cpu")`), decoded by the compiled `StaticDecoder`."""
    import torch._dynamo

    wall = {}  # seconds per phase (stderr and the JSON row: where a row's minutes go, compilation included)
    t0 = time.perf_counter()
    key = (ids.shape[-1], selector.budget, type(selector).__name__)
    if key not in _PREFILLED:  # one prefill (on the GPU) for the static rows of a length and selector
        _PREFILLED.clear()
        cache = kq.CompressedCache(model, None, selector=selector)
        with torch.no_grad():
            _PREFILLED[key] = cache, prefill(model, cache, ids, args.chunk).argmax(-1)
        _sync(device)
        wall["prefill_s"] = time.perf_counter() - t0
    cache, tok = _PREFILLED[key]
    t0 = time.perf_counter()
    offload = "cpu" if kind in ("kvsq-static-offload", "kvsq-static-mapped", "kvsq-static-prefetch") else None
    framed = kind in ("kvsq-static-offload", "kvsq-static-prefetch")
    static = StaticCompressedCache.from_cache(cache, args.warmup + args.steps + gpu_decode.PROFILE_STEPS + 1,
                                              offload=offload,
                                              page_frames=(args.frames if args.frames != 1 else True)
                                              if framed else False, prefetch=kind == "kvsq-static-prefetch")
    _sync(device)
    wall["from_cache_s"] = time.perf_counter() - t0
    torch._dynamo.reset()  # one compiled step per cache
    compile_kw = dict(compile=True) if device.type == "cuda" else dict(compile=True, backend="aot_eager")
    dec = StaticDecoder(model, static, **compile_kw)
    toks: list[torch.Tensor] = []

    def step():
        nonlocal tok
        tok = dec(tok)[1]
        toks.append(tok)

    t0 = time.perf_counter()
    step()  # the first step compiles (and captures) the step: counted as a warm-up step
    _sync(device)
    wall["first_step_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ms = timed(step, max(args.warmup - 1, 0), args.steps, device)
    wall["steps_s"] = time.perf_counter() - t0
    print("   " + ", ".join(f"{k} {v:.1f}" for k, v in wall.items()), file=sys.stderr, flush=True)
    st = static.stats()
    out = dict(ms=ms, gpu_kv=st.device_kv_bytes, gpu_meta=static.pages.nbytes(), host_kv=st.host_kv_bytes,
               moved_per_token=0, hit_rate=None, tokens=torch.stack(toks).tolist(), **wall)
    if offload:
        o = static.offload_stats()
        out.update(moved_per_token=o["bytes_per_token"], hit_rate=o["hit_rate"], pages_per_token=o["pages_per_token"],
                   prefetched_pages=o["prefetched"])
        if static.frames is not None and static.frames.prefetching:  # what moved ahead: the table has no column
            print(f"   prefetched {o['prefetched']} pages ahead over {o['decode_steps']} steps "
                  f"({o['prefetched'] / o['decode_steps']:.1f} per token, counted in moved/tok)", file=sys.stderr,
                  flush=True)
    return out


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--lengths", default="32768,131072", help="Context lengths, comma-separated.")
    ap.add_argument("--budget-per-length", default="32768:2048,131072:4096",
                    help="length:budget pairs (tokens a decoding step attends to).")
    ap.add_argument("--budget", type=int, default=2048, help="Budget for lengths not in --budget-per-length.")
    ap.add_argument("--steps", type=int, default=32, help="Timed decoding steps per row.")
    ap.add_argument("--warmup", type=int, default=4, help="Untimed steps first.")
    ap.add_argument("--chunk", type=int, default=4096, help="Prefill chunk (tokens).")
    ap.add_argument("--rows", default="", help=f"Only these rows (comma-separated; of {', '.join(ROWS)}).")
    ap.add_argument("--latency", type=float, default=0.0,
                    help="Simulated seconds per host -> device copy off CUDA (--quick: a slow link on the CPU).")
    ap.add_argument("--frames", type=float, default=1.0,
                    help="kvsq-static-offload and kvsq-static-prefetch: device page frames per page a step selects "
                         "(>= 1; more keep recent pages resident).")
    ap.add_argument("--json", default=None, help="Write the rows to this JSON file.")
    ap.add_argument("--profile", type=int, default=0,
                    help="Trace N more steps per row and print the GPU kernels by time (gpu_decode.kernel_profile).")
    ap.add_argument("--ap-cnn", choices=("torch", "fused", "auto", "slab"), default=None,
                    help="AttentionPredictor rows: the static step's CNN kernels (static_attention_predictor.CNN; "
                         "slab: fused, with predictor_cnn.SLAB, one program per slab).")
    add_topk_option(ap)
    add_bound_option(ap)
    ap.add_argument("--quick", action="store_true", help="Tiny shapes on the CPU (checks the script end to end).")
    args = ap.parse_args(argv)
    set_topk(args.topk)
    set_bound(args.bound)
    if args.ap_cnn is not None:
        from kvsqueeze.selection import static_attention_predictor

        static_attention_predictor.CNN = "fused" if args.ap_cnn == "slab" else args.ap_cnn
        if args.ap_cnn == "slab":
            from kvsqueeze.kernels import predictor_cnn

            predictor_cnn.SLAB = True
    if args.frames < 1:
        print(f"error: --frames must be >= 1, got {args.frames}", file=sys.stderr)
        return 2
    gpu_decode.PROFILE_STEPS = args.profile  # read by gpu_decode.timed
    target = bench_target(args.quick, dict(TINY, num_hidden_layers=4))
    if target is None:
        return 2
    device, dtype, shapes = target
    if args.quick:
        lengths = [int(x) for x in (args.lengths if args.lengths != "32768,131072" else "512").split(",")]
        args.steps, args.warmup, args.chunk = min(args.steps, 6), min(args.warmup, 2), min(args.chunk, 256)
        args.budget = min(args.budget, 96)
    else:
        lengths = [int(x) for x in args.lengths.split(",")]
    names = list(ROWS)
    if args.rows:
        want = [r.strip() for r in args.rows.split(",") if r.strip()]
        bad = [w for w in want if w not in ROWS]
        if bad:
            print(f"error: unknown row {bad[0]!r}; rows: {', '.join(ROWS)}", file=sys.stderr)
            return 2
        names = [r for r in ROWS if r in want]
    model = build_model(shapes, device, dtype, "sdpa")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model: Llama-3.1-8B shapes{' (tiny: --quick)' if args.quick else ''}, {dtype}; weights "
          f"{weight_bytes / 1e9:.2f} GB; {args.warmup} warm-up + {args.steps} timed steps", flush=True)
    print(f"{'context':>8} {'budget':>6} {'row':<26} {'ms/tok':>8} {'mean':>7} {'moved/tok':>10} {'hit':>6} {'GPU KV GB':>9} "
          f"{'host KV GB':>10} {'peak GB':>8} {'same':>5}")
    rows_out = []
    for length in lengths:
        budget = budget_for(length, args)
        gen = torch.Generator().manual_seed(length)
        ids = torch.randint(0, shapes["vocab_size"], (1, length), generator=gen).to(device)
        ref_tokens = {}
        for name in names:
            row = {"context": length, "budget": budget, "row": name}
            if name == "hf-offloaded" and device.type != "cuda":  # transformers offloads to and from CUDA only
                row["skipped"] = "needs CUDA"
                print(f"{length:>8} {budget:>6} {name:<26} skipped: transformers' offloading needs CUDA", flush=True)
                rows_out.append(row)
                continue
            r = attempt(lambda: run_row(name, model, ids, args, device, budget), row, rows_out,
                        f"{length:>8} {budget:>6} {name:<26}", device)
            if r is None:
                continue
            ms = r.pop("ms")
            kind, _, sel = name.partition(":")
            if kind in ("kvsq-gpu", "kvsq-static"):
                ref_tokens[kind, sel] = r["tokens"]
            same = None
            ref_kind = {"kvsq-offload": "kvsq-gpu", "kvsq-static-offload": "kvsq-static",
                        "kvsq-static-mapped": "kvsq-static", "kvsq-static-prefetch": "kvsq-static"}.get(kind)
            if (ref_kind, sel) in ref_tokens:
                same = r["tokens"] == ref_tokens[ref_kind, sel]
            peak = peak_gb(device)
            row.update({k: v for k, v in r.items() if k != "tokens"}, ms_per_token=statistics.median(ms),
                       ms_min=min(ms), ms_mean=statistics.fmean(ms), peak_gb=peak, same_tokens=same)
            rows_out.append(row)
            hit = "-" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.1f}%"
            gpu = "-" if r["gpu_kv"] is None else f"{r['gpu_kv'] / 1e9:.3f}"
            if r.get("gpu_meta"):
                gpu += f"+{r['gpu_meta'] / 1e9:.3f}"
            print(f"{length:>8} {budget:>6} {name:<26} {row['ms_per_token']:8.2f} {row['ms_mean']:7.2f} "
                  f"{r['moved_per_token'] / 1e6:8.2f}MB {hit:>6} {gpu:>9} {r['host_kv'] / 1e9:10.3f} {peak:8.2f} "
                  f"{'-' if same is None else ('yes' if same else 'NO'):>5}", flush=True)
    write_json(args.json, args, rows_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
