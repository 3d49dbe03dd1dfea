"""The `kvsqueeze` command line. A user's mistake prints one `error:` line and exits 2, with no traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..devices import (device_map_device, device_map_option, device_options, resolve_attn, resolve_device,
                       resolve_device_map, resolve_dtype)
from ..errors import KVSqueezeError
from ..models import DEFAULT_MODEL, MODELS
from .options import build_method, method_options, offload_option, select_spec


def config_values(ctx, path) -> dict:
    """The command's parameter values with those of the JSON file `path` filling every option not given on the
    command line (click's DEFAULT source); file values are checked by the options' own types and callbacks.
    KVSqueezeError for a missing / malformed file, an unknown key, or a value the option refuses."""
    from click.core import ParameterSource

    from ..evaluation.recommend import read_config

    file_vals = read_config(path)
    params = {p.name: p for p in ctx.command.params}
    out = dict(ctx.params)
    for k, v in file_vals.items():
        if k not in params:
            raise KVSqueezeError(f"config file {path}: `{ctx.command.name}` has no option {k!r}")
        if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None):
            continue  # given explicitly: the command line wins
        p = params[k]
        try:
            val = None if v is None else p.type_cast_value(ctx, v)
            if p.callback is not None:
                val = p.callback(ctx, p, val)
        except click.BadParameter as e:
            raise KVSqueezeError(f"config file {path}: {k}: {e.format_message()}") from None
        out[k] = val
    return out


class Group(click.Group):
    """Turn KVSqueezeError, and click's own usage errors of a command (a bad option value, an unknown option), into
    one line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KVSqueezeError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except click.UsageError as e:
            sub = e.ctx.command_path.split()[1:] if e.ctx is not None else []
            cmd = " ".join(["kvsqueeze", *sub])
            msg = " ".join(e.format_message().split())
            click.echo(f"error: {msg} (see `{cmd} --help`)", err=True)
            sys.exit(2)


@click.group(cls=Group)
@click.version_option(package_name="kvsqueeze")
def main():
    """kvsqueeze: compress the KV cache of HF transformers models for long-context inference."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # keep the output to what kvsqueeze says
    hf_logging.disable_progress_bar()


@main.command()
def methods():
    """List every compression method (--method), quantized storage scheme (--quant) and decode-time selector
    (--select), one line each: name, option, class and summary."""
    from ..methods import METHODS, PrecisionSplit, for_storage
    from ..quant import SCHEMES, parse_quant
    from ..selection import SELECTORS

    rows = [(name, "--method", f"{cls.__name__}: {cls.summary}") for name, cls in METHODS.items()]
    for name, text in SCHEMES.items():
        qspec = parse_quant(name)
        scorer = for_storage(None, qspec)  # the method a scheme runs when none is given (MiKV, ZipCache)
        if scorer is not None:
            text += f" (method: {type(scorer).__name__}"
            if qspec.importance == "zipcache":  # a --method given is composed, never replaced
                text += f"; with --method M: {PrecisionSplit.__name__}, M's scores pick the high-precision tokens"
            text += ")"
        rows.append((name, "--quant", text))
    import inspect

    for name, cls in SELECTORS.items():
        opts = [k for k, p in inspect.signature(cls.__init__).parameters.items() if p.kind is p.KEYWORD_ONLY]
        rows.append((name, "--select", f"{cls.__name__}: {cls.summary} (options: {name}({'=..., '.join(opts)}=...))"))
    width = max(len(r[0]) for r in rows)
    for name, option, text in rows:
        click.echo(f"{name:<{width}}  {option:<8}  {text}")


def _method_defaulted(config) -> bool:
    """Whether `--method` was left at its default (neither on the command line nor in the --config file)."""
    ctx = click.get_current_context()
    if ctx.get_parameter_source("method") != click.core.ParameterSource.DEFAULT:
        return False
    if config is not None:
        from ..evaluation.recommend import read_config

        return "method" not in read_config(config)
    return True


@main.command()
def models():
    """List the model aliases (any HF hub id or local directory works too)."""
    for name, spec in MODELS.items():
        click.echo(f"{name:<14}  {spec.description}  [{spec.install}]")


@main.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model alias, HF hub id or local directory.")
@method_options
@click.option("--context-file", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Text file holding the long context.")
@click.option("--question", required=True, help="The question asked after the compressed context.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--chunk-size", type=click.IntRange(min=1), default=None,
              help="Prefill the context in chunks of this many tokens (bounds peak memory).")
@click.option("--query-aware", is_flag=True, help="Compress context and question together (default: question-agnostic).")
@click.option("--quant", default="none", show_default=True,
              help="Store the kept tokens quantized: kivi-2, kivi-4, gear-4, mikv-8-2 (the method's evicted tokens "
                   "at 2 bits), zipcache-4-2 (the --method's top tokens at 4 bits, the rest at 2; without --method, "
                   "ZipCache's saliency picks them); with --method full, quantization only. With --compile: "
                   "kivi-2 and kivi-4 only.")
@click.option("--select", "select", default="none",
              show_default=True, help="Decode-time selection (none, quest, attention_predictor, leoam; options as "
              "NAME(option=value, ...), e.g. 'leoam(max_chunk=4,refine=4)'): each decoding step attends only to "
              "--select-budget of "
              "the stored tokens: quest (pages ranked by a bound of q.k from per-page key min/max), "
              "attention_predictor (a small CNN predicts the next step's attention; needs `kvsqueeze "
              "train-predictor` first), leoam (LeoAM's variable-sized chunks of pages, judged by min/max key "
              "abstracts, then the best chunks' pages by their own bounds; docs/offload.md).")
@click.option("--select-budget", type=click.IntRange(min=32), default=512, show_default=True,
              help="Tokens each decoding step attends to with --select, in whole pages of 16 consecutive tokens "
                   "(rounded down to a multiple of 16; at least two pages).")
@offload_option
@device_options
@device_map_option
@click.option("--compile", "compiled", is_flag=True,
              help="Decode over a fixed-capacity copy of the compressed cache with one compiled step "
                   "(torch.compile; CUDA graphs on a GPU). Full-precision or KIVI storage (--quant kivi-2 / kivi-4, "
                   "the fused KIVI kernel on a GPU); --select quest or attention_predictor "
                   "(pages chosen on the device), with --offload cpu too; decode-time eviction only for streaming_llm "
                   "and knorm. On a CPU the first step compiles for minutes.")
@click.option("--page-frames", "page_frames", type=click.FloatRange(min=1.0), default=None,
              help="With --compile --offload cpu: device page frames per offloaded layer, as a ratio of the pages a "
                   "step reads (default 1; 2 keeps twice as many, so fewer pages cross the link per step).")
@click.option("--prefetch", "prefetch", is_flag=True,
              help="With --compile --offload cpu --select attention_predictor: copy each layer's next pages from "
                   "host memory during the step, on a side CUDA stream (AttentionPredictor's cross-token prefetch).")
@click.option("--cpu-cache", "cpu_cache", type=click.IntRange(min=0), default=None,
              help="With --offload disk: pages of the CPU cache per offloaded layer (shared by its rows and kv heads) "
                   "between the memory-mapped files and the device frames (default 4 x the pages a step reads per kv "
                   "head, budget // 16 + 1; 0: none, the operating system's page cache).")
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON file of these options (e.g. from `kvsqueeze recommend --config FILE`); options given "
                   "on the command line override it.")
def generate(model, method, compression_ratio, budget, exempt_layers, compression_interval, context_file, question,
             max_new_tokens, chunk_size, query_aware, quant, select, select_budget, offload, device, dtype,
             attn_implementation, device_map, compiled, page_frames, prefetch, cpu_cache, config):
    """Compress a context, answer a question, report the KV memory kept."""
    if config is not None:
        v = config_values(click.get_current_context(), config)
        model, method, compression_ratio, budget, exempt_layers, compression_interval = (
            v["model"], v["method"], v["compression_ratio"], v["budget"], v["exempt_layers"],
            v["compression_interval"])
        max_new_tokens, chunk_size, query_aware = v["max_new_tokens"], v["chunk_size"], v["query_aware"]
        quant, select, select_budget = v["quant"], v["select"], v["select_budget"]
        device, dtype = v.get("device", device), v.get("dtype", dtype)
        attn_implementation, compiled = v.get("attn_implementation", attn_implementation), v.get("compiled", compiled)
        offload = v.get("offload", offload)
        device_map = v.get("device_map", device_map)
    attn = resolve_attn(attn_implementation)
    dmap = resolve_device_map(device_map, device)
    select = select_spec(select)
    if dmap is not None and compiled:
        raise KVSqueezeError("--compile decodes on one device: drop --device-map (or --compile) for a split model")
    if select == "none" and click.get_current_context().get_parameter_source("select_budget") == \
            click.core.ParameterSource.COMMANDLINE:
        raise KVSqueezeError("--select-budget is the budget of --select (quest, attention_predictor, leoam): give "
                             "--select "
                             "too, or drop --select-budget")
    if offload != "none" and select == "none":
        raise KVSqueezeError("--offload needs --select (quest, attention_predictor or leoam): without a selector every "
                             "decoding step attends to every token, so every token would travel each step")
    if offload != "none" and quant != "none":
        if compiled:
            raise KVSqueezeError("--compile does not read a quantized host tier: --quant with --offload decodes "
                                 "eagerly (drop --compile)")
        from ..quant import parse_quant
        from ..quant.offload import host_tier_for_layers

        host_tier_for_layers(parse_quant(quant).layer_factory)  # KIVI only: one line for the other schemes
    if offload == "disk" and compiled:
        raise KVSqueezeError("--compile offloads to cpu only (host memory its step reads); --offload disk decodes "
                             "eagerly: drop --compile")
    if compiled and quant != "none" and not quant.lower().startswith("kivi"):
        raise KVSqueezeError(f"--compile decodes full-precision or KIVI caches (StaticKIVI); --quant {quant} decodes "
                             "eagerly: drop --compile, or use --quant kivi-2 / kivi-4")
    if page_frames is not None and not (compiled and offload == "cpu"):
        raise KVSqueezeError("--page-frames sets the compiled step's device page frames: give --compile --offload cpu "
                             "too, or drop --page-frames")
    if prefetch and not (compiled and offload == "cpu" and select.partition("(")[0] == "attention_predictor"):
        raise KVSqueezeError("--prefetch copies AttentionPredictor's next pages during the compiled step: give "
                             "--compile --offload cpu --select attention_predictor, or drop --prefetch")
    if cpu_cache is not None and offload != "disk":
        raise KVSqueezeError("--cpu-cache sits in front of the disk tier: give --offload disk too, or drop --cpu-cache")
    if not context_file.exists():
        raise KVSqueezeError(f"context file not found: {context_file}")
    context = context_file.read_text(errors="replace")
    if not context.strip():
        raise KVSqueezeError(f"the context file {context_file} is empty")
    selector = None
    if select != "none":
        from ..selection import get_selector

        # the static step takes whole pages (the eager one attends to budget // 16 pages)
        budget_sel = select_budget - select_budget % 16 if compiled else select_budget
        selector = get_selector(select, budget_sel)
    m = build_method(method, compression_ratio, budget, exempt_layers, compression_interval)
    from ..methods import method_label

    label = method_label(m)  # the method as asked (its parameters), before any storage wraps it
    from ..models import load_model
    from ..quant import parse_quant
    from ..runtime.generate import generate_answer

    qspec = parse_quant(quant)
    if qspec is not None:
        from ..methods import for_storage

        if qspec.importance == "zipcache" and _method_defaulted(config):
            # no --method given: ZipCache's own saliency picks the high-precision tokens (with the budget asked)
            m = build_method("zipcache", compression_ratio, budget, exempt_layers, compression_interval)
        m = for_storage(m, qspec)
    if dmap is None:
        dev = resolve_device(device)
        mdl, tok = load_model(model, dtype=resolve_dtype(dtype, dev), device=str(dev), attn_implementation=attn)
    else:  # split over the devices by transformers / accelerate
        mdl, tok = load_model(model, dtype=resolve_dtype(dtype, device_map_device(dmap)), attn_implementation=attn,
                              device_map=dmap)
    res = generate_answer(mdl, tok, context, question, m, max_new_tokens=max_new_tokens, chunk_size=chunk_size,
                          query_aware=query_aware, layer_factory=qspec.layer_factory if qspec else None,
                          selector=selector, static=compiled, compile=compiled, offload=offload,
                          page_frames=True if page_frames is None else page_frames, offload_cpu_cache=cpu_cache,
                          prefetch=prefetch)
    click.echo(res.answer)
    click.echo(f"method: {m.describe() if m.describe() not in label else label}{f'; quant: {quant}' if qspec else ''}"
               f"{f'; decode-time selection: {selector.describe()}' if selector else ''}"
               f"{f'; KV offloaded to {offload}' if offload != 'none' else ''}"
               f"{'; decoded over the static cache, step compiled' if compiled else ''}; "
               f"context: {res.n_context_tokens} tokens")
    click.echo(res.stats.line())
    if res.decode_stats is not None and res.offload is not None:  # the static copy adds the device page frames
        ratio = 1.0 if page_frames is None else page_frames
        click.echo(f"while decoding (static cache, capacity {res.decode_stats.tokens_stored[0]} slots, page frames "
                   f"{ratio:g}x the pages a step reads): {res.decode_stats.device_kv_bytes / 2**20:.2f} MiB of KV on "
                   f"the device (page frames included), {res.decode_stats.host_kv_bytes / 2**20:.2f} MiB in host "
                   f"memory")
    if res.offload is not None:
        o = res.offload
        if "prefetch_pages" in o:  # the eager store: the line above is the prefill's, before any page frame
            where = "in memory-mapped files on disk" if offload == "disk" else "in host memory"
            click.echo(f"while decoding: {o['device_kv_bytes'] / 2**20:.2f} MiB of KV on the device (page frames "
                       f"included), {o['host_kv_bytes'] / 2**20:.2f} MiB {where}")
            hit = "no decoding step: none" if o["hit_rate"] != o["hit_rate"] else f"{100 * o['hit_rate']:.1f}%"
            click.echo(f"offload: {hit} of the pages needed were already on the device "
                       f"(prefetched, or kept from the step before); "
                       f"{o['pages_per_token']:.1f} pages (of 16 tokens, per layer and kv head) = "
                       f"{o['bytes_per_token'] / 1024:.1f} KiB moved per token; over the {o['decode_steps']} "
                       f"steps: {o['prefetch_pages']} pages prefetched, {o['demand_pages']} on demand")
            if offload == "disk":  # the third tier: the CPU cache between the files and the device frames
                cached = o["cpu_cache_hit_rate"]
                hit = "no page travelled" if cached != cached else f"{100 * cached:.1f}% of the pages that travelled"
                click.echo(f"disk: {o['disk_pages_per_token']:.1f} pages, {o['disk_bytes_per_token'] / 1024:.1f} KiB "
                           f"read from the files per token ({o['disk_prefetch_pages']} pages read ahead over the run); "
                           f"CPU cache ({o['cpu_cache_bytes'] / 2**20:.2f} MiB): {hit} came from it")
        else:  # the static step's device frames
            warm = o["hit_rate_after_first"]
            ahead = (f" ({o['prefetched']} pages over the {o['decode_steps']} steps copied a step ahead, during "
                     f"the step before)") if prefetch else ""
            click.echo(f"offload: {100 * warm:.1f}% of the pages a step needed were already in the device frames "
                       f"(steps after the first; {100 * o['hit_rate']:.1f}% with the first, whose frames start "
                       f"empty); {o['pages_per_token']:.1f} pages (of 16 tokens, per layer and kv head) = "
                       f"{o['bytes_per_token'] / 1024:.1f} KiB moved per token{ahead}")
    click.echo(f"time: {res.seconds:.2f} s (prefill + question + {max_new_tokens} new tokens at most"
               f"{', compiling the step included' if compiled else ''})")


@main.group()
def calibrate():
    """Calibrate model-specific data for a method."""


def _calibration_texts(text_dir: Path | None) -> list[str] | None:
    """The .txt files of `text_dir` (None: the text shipped with kvsqueeze); KVSqueezeError when it has none."""
    if text_dir is None:
        return None
    texts = [p.read_text(errors="replace") for p in sorted(text_dir.glob("*.txt"))]
    if not texts:
        raise KVSqueezeError(f"no .txt files in {text_dir}")
    return texts


def _calibrate(name: str, model: str, text_dir: Path | None, n_seq: int, seq_len: int) -> None:
    """`kvsqueeze calibrate <name>`: calibrate (`runtime.calibration.CALIBRATED[name]`) on the texts of
    `text_dir`, replacing what was kept for the model, and say where it went."""
    from ..models import load_model
    from ..runtime.calibration import CALIBRATED

    kind = CALIBRATED[name]
    texts = _calibration_texts(text_dir)
    mdl, tok = load_model(model)
    data = kind.calibrate(mdl, tok, texts, n_seq=n_seq, seq_len=seq_len)
    path = kind.save(mdl, data)
    click.echo(f"{kind.title} {tuple(data.shape)} saved to {path}")


def _calibration_options(seq_len: int):
    """The options of every `kvsqueeze calibrate` command; `seq_len` is the default window length."""
    options = [
        click.option("--model", default=DEFAULT_MODEL, show_default=True),
        click.option("--text-dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
                     help="Directory of .txt files to calibrate on (default: the text shipped with kvsqueeze)."),
        click.option("--n-seq", type=click.IntRange(min=1), default=8, show_default=True),
        click.option("--seq-len", type=click.IntRange(min=64), default=seq_len, show_default=True),
    ]

    def decorate(fn):
        for option in reversed(options):  # listed in --help in this order
            fn = option(fn)
        return fn

    return decorate


@calibrate.command("qfilters")
@_calibration_options(seq_len=1024)
def calibrate_qfilters(model, text_dir, n_seq, seq_len):
    """Compute Q-Filters (SVD of post-RoPE queries) and store them as safetensors."""
    _calibrate("qfilters", model, text_dir, n_seq, seq_len)


@calibrate.command("prefixkv")
@_calibration_options(seq_len=512)
def calibrate_prefixkv(model, text_dir, n_seq, seq_len):
    """Compute PrefixKV's per-layer importance profiles (offline prefix configuration) and store them."""
    _calibrate("prefixkv", model, text_dir, n_seq, seq_len)


# Further command groups register here.
from .selection import register_selection; register_selection(main)  # noqa: E402, E702
from .evaluation import register as register_evaluation; register_evaluation(main)  # noqa: E402, E702
from .recommend import register_recommend; register_recommend(main)  # noqa: E402, E702

if __name__ == "__main__":  # pragma: no cover
    main()
