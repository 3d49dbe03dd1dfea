"""Decode speed on the GPU, side by side: transformers' caches vs kvsqueeze's eager and static (compiled) paths.

    python bench/gpu_decode.py --lengths 4096,32768 --batch 1 --json decode.json
    python bench/gpu_decode.py --quick            # tiny shapes on the CPU: the script end to end, in seconds

A random-initialised model with Llama-3.1-8B's config (hidden 4096, 32 layers, 32 query / 8 kv heads, head_dim
128, intermediate 14336, vocab 128256), built on the GPU in bf16 (no download; random weights do not change the
time of a step). For each context length the prompt (random ids) is prefilled in chunks (`--chunk`, kvsqueeze's
chunked prefill for its rows; transformers' rows run the same chunks through their own cache), then one token per
row is decoded `--warmup` times (compilation and CUDA-graph capture happen there) and `--steps` more, each step
timed with CUDA events; ms/token is the median step.

Rows (`--rows` picks a subset by name):
  hf-dynamic                  transformers, eager, DynamicCache (full)
  hf-static-compiled          transformers, StaticCache + torch.compile(mode="reduce-overhead", fullgraph) (full)
  kvsq-eager:M                kvsqueeze's eager loop over a CompressedCache (M = full, knorm, snapkv, quest, ap, kivi2)
  kvsq-static:M[/kernel]      kvsqueeze's static cache, the step compiled (CUDA graphs): M = full, knorm, snapkv,
                              adakv (AdaKV over SnapKV), streaming (StreamingLLM evicting at every decoding step),
                              knorm-decode (K-norm evicting at every decoding step), quest (the full cache with
                              Quest selection at `--budget` tokens: pages chosen on the device, attention over
                              them only), ap (the full cache with AttentionPredictor selection at `--budget`
                              tokens: sink 64 + predicted pages + local 64, the paper's CNN at its blend init (random
                              weights do not change the time), history and prediction on the device, a full
                              calibration row every 5th step, written eagerly after the compiled step; ms_mean in
                              the JSON and "mean" on its line count those steps, the median does not); kernel = each of
                              `--static-kernels` (sdpa: torch's fused attention over the kv-head groups; matmul:
                              two batched products per group; triton: split-KV flash-decoding over the slots, for
                              quest over the selected pages read in place; sdpa / matmul gather the pages first;
                              q/k/v and gate/up run as one GEMV each (StaticDecoder's default on CUDA); a kernel
                              with "+nofuse", e.g. triton+nofuse, runs them as separate GEMVs)
  kvsq-static:S               KIVI storage in the static step (issue 12 item 2): S = kivi2, kivi4 (KIVI-2 / -4 over
                              the full cache), knorm+kivi2 (K-norm's prefill eviction, then KIVI-2); the attention is
                              the fused Triton kernel over the packed buffers (the default kernel of a static KIVI
                              cache on CUDA; the dequantizing torch reference on the CPU); KV bytes = packed codes,
                              scales, zeros and residual at the static capacity
Compressed rows keep 1/`--factor` of the context (compression_ratio 1 - 1/factor; streaming and knorm-decode: a budget of
length/factor tokens). Quest rows hold the full cache (their KV GB counts all of it; their bandwidth limit only what
a step reads: the `--budget` selected slots, the dense layers and the page metadata); `--quick` lowers the budget to a quarter of
the context and keeps only layer 0 dense, so that the selection runs.

Columns: ms/token, tokens/s (batch / ms), peak GPU memory (max allocated over the row, the weights and the prefill included), KV bytes held
(the cache's key and value tensors: a static cache holds its full capacity), the bandwidth limit = (weight bytes +
KV bytes a step reads) / `--hbm-gbps` (4200 GB/s: the H200's measured copy rate, read + write), and the fraction
of that limit reached (limit / ms). A step reads every byte it holds, except with decode-time selection (static
quest and ap rows): there it reads the dense layers' slots, each sparse layer's budget of pages and the
selector's own buffers (Quest's page metadata, AttentionPredictor's history), `step_read_bytes`; the JSON keeps
both (`kv_bytes`, `read_bytes`).

Time: each compiled row compiles its step (about a minute for 32 layers; rows of the same shapes hit inductor's
cache), and one device command may run 10 minutes: split a full run, e.g. `--lengths 4096` then `--lengths 32768`,
or `--rows hf-static-compiled,kvsq-static` and `--static-kernels sdpa,matmul` to compare the two kernels. Weight bytes count every parameter (as issue 12's anchor:
16.06 GB for 8B in bf16), though a step reads one row of the input embedding.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402

import kvsqueeze as kq  # noqa: E402
from kvsqueeze.kernels import topk  # noqa: E402
from kvsqueeze.compat import cache_kwargs  # noqa: E402
from kvsqueeze.runtime.generate import decode_step, prefill  # noqa: E402
from kvsqueeze.runtime.static import StaticCompressedCache, StaticDecoder  # noqa: E402

from _table import attempt, peak_gb, write_json  # noqa: E402  (bench/, the script's own folder)

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                max_position_embeddings=131072)
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=101, max_position_embeddings=4096)
EAGER_METHODS = ("full", "knorm", "snapkv", "quest", "ap", "kivi2")
STATIC_METHODS = ("full", "knorm", "snapkv", "adakv", "streaming", "knorm-decode", "quest", "ap")
KIVI_STATIC_METHODS = ("kivi2", "kivi4", "knorm+kivi2")  # one row each, the static KIVI cache's default kernel


def build_model(cfg_kwargs: dict, device: torch.device, dtype: torch.dtype, attn: str):
    cfg = LlamaConfig(attn_implementation=attn, **cfg_kwargs)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def storage_for(name: str):
    """(method name, layer factory or None): "kivi2" -> ("full", kivi(2)), "knorm+kivi4" -> ("knorm", kivi(4)),
    any other name -> (name, None)."""
    base, _, quant = name.rpartition("+")
    if not base and quant.startswith("kivi"):
        base = "full"
    if base and quant.startswith("kivi") and quant[4:].isdigit():
        from kvsqueeze.quant import kivi

        return base, kivi(int(quant[4:]))
    return name, None


def method_for(name: str, length: int, factor: float):
    compression_ratio = 1.0 - 1.0 / factor
    budget = max(8, int(length / factor))
    if name in ("full", "quest", "ap"):  # quest, ap: the full cache, selection by the cache's selector (cache_for)
        return kq.get_method("full")
    if name == "knorm":
        return kq.get_method("knorm", compression_ratio=compression_ratio)
    if name == "snapkv":
        return kq.get_method("snapkv", compression_ratio=compression_ratio)
    if name == "adakv":
        return kq.get_method("adakv:snapkv", compression_ratio=compression_ratio)
    if name == "streaming":
        return kq.get_method("streaming_llm", budget=budget, compression_interval=1)
    if name == "knorm-decode":
        return kq.get_method("knorm", budget=budget, compression_interval=1)
    raise SystemExit(f"error: unknown method {name!r}")


def cache_for(model, mname: str, length: int, args):
    """The eager CompressedCache of a kvsqueeze row: `method_for`'s method; for quest (ap), Quest
    (AttentionPredictor) selection at `args.budget` tokens, layers 0-1 dense (under --quick: a quarter of the
    context in whole pages, layer 0 dense)."""
    selector = None
    if mname in ("quest", "ap"):
        from kvsqueeze.selection import AttentionPredictor, PredictorNet, Quest

        budget, dense = args.budget, (0, 1)  # layers 0-1 dense, as both papers
        if args.quick:  # tiny model: 2 layers, a short context
            # (AttentionPredictor: at least sink 16 + local 16 + one predicted page)
            budget, dense = max(32 if mname == "quest" else 48, min(budget, length // 4 // 16 * 16)), (0,)
        if mname == "quest":
            selector = Quest(budget, dense_layers=dense)
        else:  # the paper's CNN, blend init (no checkpoint needed: the weights do not change the time)
            selector = AttentionPredictor(budget, predictor=PredictorNet().init_blend(), dense_layers=dense)
    mname, layer_factory = storage_for(mname)  # kivi2, knorm+kivi2, ...: KIVI storage
    kw = {} if layer_factory is None else {"layer_factory": layer_factory}
    return kq.CompressedCache(model, method_for(mname, length, args.factor), selector=selector, **kw)


def bench_target(quick: bool, tiny: dict | None = None):
    """(device, dtype, shapes) of a GPU bench: the CPU, float32 and `tiny` (default TINY) under --quick, else CUDA,
    bfloat16 and Llama-3.1-8B's shapes; None (after one error line on stderr) when --quick is off and torch sees
    no CUDA GPU."""
    if quick:
        return torch.device("cpu"), torch.float32, TINY if tiny is None else tiny
    if not torch.cuda.is_available():
        print("error: no CUDA GPU (use --quick for the CPU check)", file=sys.stderr)
        return None
    return torch.device("cuda"), torch.bfloat16, LLAMA_8B


class Clock:
    """Per-step timing: CUDA events on the GPU (read after the last step: no sync per step), a host clock on the
    CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def steps_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [1000 * (b - a) for a, b in zip(self.marks, self.marks[1:])]


PROFILE_STEPS = 0  # --profile: steps traced after the timed ones (0: none)
PROFILE_TOP = 14  # --profile-top: kernels listed per profiled row


def add_topk_option(ap) -> None:
    """`--topk`: the static selectors' page choice (kernels/topk.py): "kernel" (its default `ALGO`), one of its
    kernels by name, or "torch" (torch.topk + an index sort)."""
    ap.add_argument("--topk", choices=("kernel", "auto", *topk.ALGOS, "torch"), default="kernel",
                    help=f"The static selectors' page choice: the top-k kernel (kernels/topk.py; default algo "
                         f"{topk.ALGO}), one of its algos, or torch.topk + sort.")


def add_bound_option(ap) -> None:
    """`--bound`: the form of Quest's page bound in the static step (kernels/page_bound.py PRODUCTS)."""
    ap.add_argument("--bound", choices=("sum", "products"), default=None,
                    help="Quest's page bound kernel: the elementwise sum or two tensor-core products (default: "
                         "kernels/page_bound.py PRODUCTS).")


def set_bound(choice: str | None) -> None:
    """Apply `--bound` to kernels/page_bound.py for the whole run."""
    if choice is not None:
        from kvsqueeze.kernels import page_bound

        page_bound.PRODUCTS = choice == "products"


def add_kivi_options(ap) -> None:
    """`--kivi-kernel`, `--kivi-maxnreg`, `--kivi-per-sm`: the static KIVI step's fused kernel and its launch
    (kernels/kivi_decode.py FOLD, MAXNREG / FOLDED_MAXNREG, PER_SM / FOLDED_PER_SM; bench/kivi_kernels.py times
    them alone)."""
    ap.add_argument("--kivi-kernel", choices=("split", "folded"), default=None,
                    help="The static KIVI step's kernel (default: kernels/kivi_decode.py FOLD).")
    ap.add_argument("--kivi-maxnreg", type=int, default=None, help="Its register cap per thread (0: none).")
    ap.add_argument("--kivi-per-sm", type=int, default=None, help="Its programs per SM.")


def set_kivi(args) -> None:
    """Apply the `add_kivi_options` flags to kernels/kivi_decode.py for the whole run."""
    from kvsqueeze.kernels import kivi_decode

    if args.kivi_kernel is not None:
        kivi_decode.FOLD = args.kivi_kernel == "folded"
    if args.kivi_maxnreg is not None:  # either kernel's
        kivi_decode.MAXNREG = kivi_decode.FOLDED_MAXNREG = args.kivi_maxnreg or None
    if args.kivi_per_sm is not None:
        kivi_decode.PER_SM = kivi_decode.FOLDED_PER_SM = args.kivi_per_sm


def set_topk(choice: str) -> None:
    """Apply `--topk` to kernels/topk.py for the whole run."""
    topk.KERNEL = choice != "torch"
    if choice in ("auto", *topk.ALGOS):
        topk.ALGO = choice


def timed(step, warmup: int, steps: int, device) -> list[float]:
    """Run `step()` warmup times, then `steps` times with a mark between steps; the per-step ms. With
    `--profile N`, N more steps are traced and their kernels summarised (`kernel_profile`)."""
    for _ in range(warmup):
        step()
    clock = Clock(device)
    clock.mark()
    for _ in range(steps):
        step()
        clock.mark()
    ms = clock.steps_ms()
    if PROFILE_STEPS:
        kernel_profile(step, PROFILE_STEPS, device, PROFILE_TOP)
    return ms


def kernel_profile(step, n: int, device, top: int = 14):
    """Trace `n` steps with torch.profiler and print, per step: the number of GPU kernels, their summed time (us),
    and the `top` kernels by time (calls and us per step). Kernels replayed from CUDA graphs are included (CUPTI
    records them). Off CUDA it prints the CPU operators instead."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        if cuda:
            torch.cuda.synchronize()
    kinds = (torch.autograd.DeviceType.CUDA,) if cuda else (torch.autograd.DeviceType.CPU,)
    per: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type in kinds and (cuda or e.cpu_parent is None):
            per.setdefault(e.name, []).append(e.time_range.elapsed_us())
    total = sum(sum(v) for v in per.values()) / n
    count = sum(len(v) for v in per.values()) / n
    print(f"{'':>8}   profile ({n} steps): {count:.0f} {'kernels' if cuda else 'top-level ops'} per step, "
          f"{total:.0f} us of {'kernel' if cuda else 'op'} time per step", flush=True)
    for name, v in sorted(per.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"{'':>8}     {sum(v) / n:9.1f} us {len(v) / n:6.1f}x  {name[:110]}", flush=True)


def kv_bytes_of(cache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def hf_prefill(model, cache, ids, chunk):
    logits = None
    for s in range(0, ids.shape[1], chunk):
        logits = model(input_ids=ids[:, s:s + chunk], **cache_kwargs(model, cache), use_cache=True,
                       logits_to_keep=1).logits[:, -1]
    return logits


def step_read_bytes(static) -> int | None:
    """Bytes of KV (and selector state) one static step reads where decode-time selection runs (the cache's
    `pages`, a StaticQuest or StaticAttentionPredictor): a dense layer's whole slot buffers, a sparse layer's
    `k_pages` pages of `page` slots each, plus the selector's buffers (`nbytes`: Quest's page metadata,
    AttentionPredictor's history). None without selection (a step then reads every byte held)."""
    sel = getattr(static, "pages", None)
    if sel is None:
        return None
    s = static.slots
    total = sel.nbytes()
    for i in range(s.n_layers):
        held = sum(t.numel() * t.element_size() for t in (s.keys[i], s.values[i]))
        total += held if not sel.sparse(i) else held * min(1.0, sel.k_pages * sel.page / s.capacity)
    return int(total)


def run_row(name, model, ids, args, device, compile_opts):
    """One row: returns (per-step ms, KV bytes held, KV bytes a step reads or None for all held)."""
    b, length = ids.shape
    total_steps = args.warmup + args.steps + PROFILE_STEPS
    if name == "hf-dynamic":
        cache = DynamicCache(config=model.config)
        tok = hf_prefill(model, cache, ids, args.chunk).argmax(-1)

        def step():
            nonlocal tok
            tok = model(input_ids=tok[:, None], **cache_kwargs(model, cache), use_cache=True).logits[:, -1].argmax(-1)

        with torch.no_grad():
            ms = timed(step, args.warmup, args.steps, device)
        return ms, kv_bytes_of(cache), None
    if name == "hf-static-compiled":
        cache = StaticCache(config=model.config, max_cache_len=length + total_steps + 1)
        tok = hf_prefill(model, cache, ids, args.chunk).argmax(-1)
        pos = torch.full((b, 1), length, dtype=torch.long, device=device)

        def fwd(t, p):
            out = model(input_ids=t[:, None], position_ids=p, **cache_kwargs(model, cache), use_cache=True)
            return out.logits[:, -1].argmax(-1)

        fn = torch.compile(fwd, fullgraph=True, **compile_opts)

        def step():
            nonlocal tok
            tok = fn(tok, pos).clone()
            pos.add_(1)

        with torch.no_grad():
            ms = timed(step, args.warmup, args.steps, device)
        return ms, kv_bytes_of(cache), None
    kind, _, spec = name.partition(":")
    mname, _, kernel = spec.partition("/")
    cache = cache_for(model, mname, length, args)
    first = prefill(model, cache, ids, args.chunk)
    if kind == "kvsq-eager":
        tok = first.argmax(-1)

        def step():
            nonlocal tok
            tok = decode_step(model, cache, tok).argmax(-1)

        with torch.no_grad():
            ms = timed(step, args.warmup, args.steps, device)
        return ms, cache.stats().kv_bytes, None
    static = StaticCompressedCache.from_cache(cache, total_steps + 1)
    del cache
    torch._dynamo.reset()  # one compiled step per cache (see runtime/static.py); keeps the recompile limit away
    kernel, _, extra = kernel.partition("+")
    if extra not in ("", "nofuse"):
        raise SystemExit(f"error: unknown kernel option {extra!r} in {name!r} (kernel+nofuse: separate projections)")
    dec = StaticDecoder(model, static, compile=args.compile_static, kernel=kernel or None,
                        fuse_projections=False if extra == "nofuse" else None, **compile_opts)
    tok = first.argmax(-1)

    def step():
        nonlocal tok
        tok = dec(tok)[1]

    ms = timed(step, args.warmup, args.steps, device)
    return ms, static.stats().kv_bytes, step_read_bytes(static)


def row_names(args) -> list[str]:
    rows = ["hf-dynamic", "hf-static-compiled"] + [f"kvsq-eager:{m}" for m in EAGER_METHODS]
    kernels = [k for k in args.static_kernels.split(",") if k.strip()]
    rows += [f"kvsq-static:{m}/{k}" for m in STATIC_METHODS for k in kernels]
    rows += [f"kvsq-static:{m}" for m in KIVI_STATIC_METHODS]
    if args.rows:
        want = [r.strip() for r in args.rows.split(",") if r.strip()]
        rows = [r for r in rows if any(r == w or r.startswith(w + "/") or r.startswith(w + ":") for w in want)]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--lengths", default="4096,32768", help="Context lengths, comma-separated.")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--factor", type=float, default=8.0, help="Compression factor of the compressed rows.")
    ap.add_argument("--budget", type=int, default=4096, help="Quest rows: tokens attended per step (a multiple "
                                                             "of 16; issue 12's goal: 4096).")
    ap.add_argument("--steps", type=int, default=32, help="Timed decoding steps per row.")
    ap.add_argument("--warmup", type=int, default=5, help="Untimed steps first (compilation, graph capture).")
    ap.add_argument("--chunk", type=int, default=4096, help="Prefill chunk (tokens).")
    ap.add_argument("--hbm-gbps", type=float, default=4200.0, help="Memory bandwidth of the bound, GB/s.")
    ap.add_argument("--rows", default="", help="Only these rows (names or prefixes: hf-dynamic, kvsq-static:knorm, "
                                                "kvsq-eager, ...); default: all.")
    ap.add_argument("--static-kernels", default="matmul", help="Attention kernels of the static rows (sdpa, matmul, "
                                                              "eager, triton; comma-separated to compare).")
    ap.add_argument("--no-compile-static", dest="compile_static", action="store_false",
                    help="Run the static rows' step uncompiled.")
    ap.add_argument("--attn", default="sdpa", help="The model's attention implementation (sdpa or eager).")
    ap.add_argument("--inductor-tuning", action="store_true",
                    help="gpt-fast's inductor settings: coordinate-descent tuning of the generated kernels (longer "
                         "compiles).")
    ap.add_argument("--compile-mode", default="reduce-overhead",
                    help="torch.compile mode of the compiled rows on CUDA (reduce-overhead, max-autotune).")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="After timing each row, trace N more steps and print its kernels per step (count, us, top "
                         "kernels).")
    ap.add_argument("--profile-top", type=int, default=14, metavar="K",
                    help="With --profile: list the K kernels that take the most time per step (default 14).")
    ap.add_argument("--json", default=None, help="Write the rows to this JSON file.")
    add_topk_option(ap)
    add_bound_option(ap)
    add_kivi_options(ap)
    ap.add_argument("--quick", action="store_true", help="Tiny shapes on the CPU (checks the script end to end).")
    args = ap.parse_args(argv)
    global PROFILE_STEPS, PROFILE_TOP
    PROFILE_STEPS, PROFILE_TOP = args.profile, args.profile_top
    set_topk(args.topk)
    set_bound(args.bound)
    set_kivi(args)

    target = bench_target(args.quick)
    if target is None:
        return 2
    device, dtype, shapes = target
    if args.quick:
        lengths = [int(x) for x in (args.lengths if args.lengths != "4096,32768" else "256").split(",")]
        args.steps, args.warmup, args.chunk = min(args.steps, 3), min(args.warmup, 2), min(args.chunk, 128)
        compile_opts = {"backend": "aot_eager"}  # no C++ toolchain needed, seconds to compile
    else:
        lengths = [int(x) for x in args.lengths.split(",")]
        compile_opts = {"mode": args.compile_mode}
        if args.inductor_tuning:
            import torch._inductor.config as inductor_config

            inductor_config.coordinate_descent_tuning = True
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    model = build_model(shapes, device, dtype, args.attn)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows_out = []
    names = row_names(args)
    print(f"model: Llama-3.1-8B shapes{' (tiny: --quick)' if args.quick else ''}, {dtype}, {args.attn}, "
          f"batch {args.batch}; weights {weight_bytes / 1e9:.2f} GB; bound at {args.hbm_gbps:.0f} GB/s; "
          f"{args.warmup} warm-up + {args.steps} timed steps", flush=True)
    head = f"{'context':>8} {'row':<34} {'ms/tok':>8} {'tok/s':>8} {'peak GB':>8} {'KV GB':>8} {'limit ms':>9} " \
           f"{'of limit':>8}"
    print(head)
    for length in lengths:
        gen = torch.Generator().manual_seed(length)
        ids = torch.randint(0, shapes["vocab_size"], (args.batch, length), generator=gen).to(device)
        for name in names:
            row = {"context": length, "row": name, "batch": args.batch}
            res = attempt(lambda: run_row(name, model, ids, args, device, compile_opts), row, rows_out,
                          f"{length:>8} {name:<34}", device)
            if res is None:
                continue
            ms, kv, read = res
            read = kv if read is None else read
            med = statistics.median(ms)
            limit = (weight_bytes + read) / (args.hbm_gbps * 1e9) * 1e3
            peak = peak_gb(device)
            row.update(ms_per_token=med, ms_min=min(ms), ms_mean=statistics.fmean(ms),
                       tokens_per_s=1000.0 * args.batch / med, peak_gb=peak,
                       kv_bytes=kv, read_bytes=read, weight_bytes=weight_bytes, limit_ms=limit, fraction_of_limit=limit / med)
            rows_out.append(row)
            print(f"{length:>8} {name:<34} {med:8.2f} {row['tokens_per_s']:8.1f} {peak:8.2f} {kv / 1e9:8.3f} "
                  f"{limit:9.2f} {row['fraction_of_limit']:8.1%}"
                  + (f"  mean {row['ms_mean']:.2f}" if ":ap" in name else ""), flush=True)
    write_json(args.json, args, rows_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
