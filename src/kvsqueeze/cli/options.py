"""Command-line options and value parsers shared by the commands (`cli/main.py`, `cli/evaluation.py`,
`cli/recommend.py`): one definition each, below every command module, so commands never import each other."""

from __future__ import annotations

import click

from ..errors import KVSqueezeError


def _ratio(ctx, param, value):
    if value is not None and not (0.0 <= value < 1.0):
        raise click.BadParameter(f"must be in [0, 1), got {value}")
    return value


def method_options(f):
    """--method, --compression-ratio (alias --ratio), --budget, --exempt-layers, --compression-interval (shared by
    generate and eval commands)."""
    f = click.option("--compression-interval", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Also compress every N decoding steps, holding the budget (0: prefill only).")(f)
    f = click.option("--exempt-layers", default="", help="Comma-separated layer indices never compressed.")(f)
    f = click.option("--budget", type=click.IntRange(min=1), default=None,
                     help="Absolute number of tokens kept per layer (instead of --compression-ratio).")(f)
    f = click.option("--compression-ratio", "--ratio", "compression_ratio", type=float, default=0.5,
                     show_default=True, callback=_ratio,
                     help="Fraction of tokens removed (kvpress's compression_ratio; 0.75 keeps a quarter).")(f)
    f = click.option("--method", default="tova", show_default=True,
                     help="Method name (see `kvsqueeze methods`); wrappers take a scorer: adakv:tova, pyramidkv:knorm; "
                          "parameters in parentheses after the name: 'minicache(t=0.3,start_layer=20)'. "
                          "TOVA is the default: the strongest question-agnostic method of the README's passkey table "
                          "(question-agnostic SnapKV keeps no needle there).")(f)
    return f


def build_method(method: str, compression_ratio: float, budget: int | None, exempt_layers: str,
                 compression_interval: int):
    from ..methods import get_method

    try:
        exempt = tuple(int(x) for x in exempt_layers.split(",") if x.strip())
    except ValueError:
        raise KVSqueezeError(f"--exempt-layers must be comma-separated integers, got {exempt_layers!r}") from None
    return get_method(method, compression_ratio=compression_ratio, budget=budget, exempt_layers=exempt,
                      compression_interval=compression_interval)


def select_spec(text: str) -> str:
    """One --select value -> 'none' or its canonical spec (`selection.canonical_selector`: options sorted, defaults
    dropped). Raises KVSqueezeError for an unknown selector or a malformed spec."""
    from ..selection import SELECTORS, canonical_selector, parse_selector

    name = parse_selector(text)[0]
    if name == "none":
        return "none"
    if name not in SELECTORS:
        raise KVSqueezeError(f"unknown --select {text!r}; choose from: none, {', '.join(SELECTORS)} (options as "
                             f"NAME(option=value, ...))")
    return canonical_selector(text)


def _floats(text: str, what: str, lo: float, hi: float, hi_open: bool) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KVSqueezeError(f"{what} must be comma-separated numbers, got {text!r}") from None
    bad = [v for v in vals if not (lo <= v < hi if hi_open else lo <= v <= hi)]
    if bad or not vals:
        raise KVSqueezeError(f"{what} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {text!r}")
    return vals


def _quants(text: str) -> list[str | None]:
    """--quant: comma-separated schemes ('none' for full-precision storage), each checked by parse_quant."""
    from ..quant import parse_quant

    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise KVSqueezeError("--quant is empty (use 'none' for full-precision storage)")
    out = []
    for n in names:
        q = parse_quant(n)
        out.append(None if q is None else q.name)
    return list(dict.fromkeys(out))


def offload_option(f):
    """--offload (generate, eval, sweep): where the KV of the layers a --select selector makes sparse lives."""
    return click.option(
        "--offload", type=click.Choice(["none", "cpu", "disk"]), default="none", show_default=True,
        help="Where the KV of every layer the --select selector makes sparse lives. cpu: host memory (pinned on "
             "CUDA). disk: memory-mapped files under $TMPDIR, for KV beyond CPU memory, behind a CPU cache of "
             "pages per layer (LeoAM's GPU-CPU-disk tiers; generate --cpu-cache sets its size). Either way the "
             "device keeps fixed frames for the selector's budget of pages, and only pages not already there are "
             "copied each step: AttentionPredictor prefetches the next step's pages (with disk, the ones the CPU "
             "cache lacks are read in the background); Quest and LeoAM fetch on demand. "
             "generate --compile (cpu only): the compiled static step reads host memory directly and copies the "
             "pages its device frames lack at the start of each layer's attention; with --prefetch "
             "(attention_predictor) it copies each layer's next pages during the step instead. "
             "Needs --select; with --quant kivi-<bits> the host holds KIVI's packed storage (the bytes --quant "
             "holds on the device) and the frames dequantized pages; that runs eagerly only (not with --compile), "
             "and the other --quant schemes are refused with --offload. "
             "Answers equal on-device selection. "
             "On a CPU device it only simulates the tiers (host memory is the device's memory).")(f)
