"""`--device`, `--device-map`, `--dtype` and `--attn-implementation` of `generate`, `eval` and `sweep`: parsing,
checking, and the click options; where a model's inputs go and which devices it spans.

`resolve_device("auto")` is `cuda` when a GPU is visible, else `cpu`; `resolve_dtype("auto", device)` is float32
on the CPU and bfloat16 on a GPU that supports it (float16 otherwise). Every mistake (unknown name, CUDA asked for
on a machine without it, a GPU index past the last one) is a `KVSqueezeError`, i.e. one `error:` line, exit 2.
"""

from __future__ import annotations

import click
import torch

from .errors import KVSqueezeError

DEVICES_HELP = "cpu, cuda, cuda:N or auto (cuda when a GPU is visible, else cpu)."
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # transformers' / accelerate's strategies
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")  # what kvsqueeze's attention wrappers can route (runtime/routing.py)


def resolve_device(text: str) -> torch.device:
    """The torch device named by `text` (cpu | cuda | cuda:N | auto), checked against this machine.

    Raises KVSqueezeError for another name, for cuda when torch sees no GPU, or for cuda:N with N >= the number of
    visible GPUs."""
    t = (text or "").strip().lower()
    if t == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if t == "cpu":
        return torch.device("cpu")
    if t == "cuda" or t.startswith("cuda:"):
        idx = None
        if t.startswith("cuda:"):
            try:
                idx = int(t[5:])
            except ValueError:
                raise KVSqueezeError(f"--device must be cpu, cuda, cuda:N or auto, got {text!r}") from None
            if idx < 0:
                raise KVSqueezeError(f"--device must be cpu, cuda, cuda:N or auto, got {text!r}")
        if not torch.cuda.is_available():
            raise KVSqueezeError(f"--device {text}: torch sees no CUDA GPU on this machine (use cpu or auto)")
        if idx is not None and idx >= torch.cuda.device_count():
            raise KVSqueezeError(f"--device {text}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
        return torch.device("cuda", idx) if idx is not None else torch.device("cuda")
    raise KVSqueezeError(f"--device must be cpu, cuda, cuda:N or auto, got {text!r}")


def resolve_device_map(text: str | None, device: str | None = "cpu") -> str | None:
    """--device-map: None for none / empty, else one of `DEVICE_MAPS` (`auto`: transformers' `device_map="auto"`,
    accelerate filling the visible GPUs in order, then CPU memory). `device`: the --device given; a split model
    places itself, so any --device but the default (`cpu`) is refused.

    Raises KVSqueezeError for another name, or for --device-map with an explicit --device other than cpu."""
    t = (text or "").strip().lower()
    if t in ("", "none"):
        return None
    if t not in DEVICE_MAPS:
        raise KVSqueezeError(f"--device-map must be one of none, {', '.join(DEVICE_MAPS)}, got {text!r}")
    if (device or "cpu").strip().lower() != "cpu":
        raise KVSqueezeError(f"--device-map {t} places the model's layers itself: drop --device {device} (a split "
                             "model has no one device)")
    return t


def device_map_device(device_map) -> torch.device:
    """The device whose dtype a model loaded with `device_map` computes in (for `resolve_dtype`): cuda when the
    map can use a GPU (a strategy name with a GPU visible, or a dict naming one), else cpu."""
    if isinstance(device_map, dict):
        gpu = any(torch.device(d if not isinstance(d, int) else f"cuda:{d}").type == "cuda"
                  for d in device_map.values() if d != "disk")
        return torch.device("cuda" if gpu else "cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_devices(model) -> list[torch.device]:
    """The distinct devices a model's parameters and buffers are on (first seen first; `meta`, where accelerate
    keeps offloaded weights, left out), plus the execution devices of accelerate's hooks (`device_map` with CPU or
    disk offload). One device for a model moved with `.to(device)`; several for one split by `device_map`."""
    seen: dict[torch.device, None] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type != "meta":
            seen.setdefault(t.device)
    for m in model.modules():
        dev = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
        if dev is not None:
            seen.setdefault(torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev))
    return list(seen)


def input_device(model) -> torch.device:
    """Where a model's input ids go: its input embeddings' device (the first GPU of a model split by `device_map`;
    an accelerate hook's execution device where the embeddings are offloaded), else its first parameter's."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dev = getattr(getattr(emb, "_hf_hook", None), "execution_device", None)
    if dev is not None:
        return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    w = getattr(emb, "weight", None)
    if isinstance(w, torch.Tensor) and w.device.type != "meta":
        return w.device
    return next(model.parameters()).device


def resolve_dtype(text: str, device: torch.device) -> torch.dtype:
    """The weights' dtype named by `text` (auto | float32 | bfloat16 | float16) for a model on `device`.

    auto: float32 on the CPU (bf16/fp16 matmuls are slow there), bfloat16 on a GPU that supports it, else
    float16. Raises KVSqueezeError for another name."""
    t = (text or "").strip().lower()
    if t not in DTYPES:
        raise KVSqueezeError(f"--dtype must be one of {', '.join(DTYPES)}, got {text!r}")
    if t != "auto":
        return getattr(torch, t)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_attn(text: str) -> str:
    """The attention implementation named by `text` (sdpa | eager: the model's own kernels kvsqueeze wraps;
    flash-attention and others cannot be routed). Raises KVSqueezeError for another name."""
    t = (text or "").strip().lower()
    if t not in ATTN_IMPLEMENTATIONS:
        raise KVSqueezeError(f"--attn-implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {text!r} "
                             "(kvsqueeze routes only transformers' sdpa and eager attention)")
    return t


def device_options(f):
    """--device, --dtype and --attn-implementation (strings; `resolve_device` / `resolve_dtype` / `resolve_attn`
    check them when the command runs)."""
    f = click.option("--attn-implementation", "attn_implementation", default="sdpa", show_default=True,
                     help="The model's attention kernel: sdpa or eager (what kvsqueeze wraps).")(f)
    f = click.option("--dtype", default="auto", show_default=True,
                     help="Model weights' dtype: auto (float32 on cpu, bfloat16 on a GPU), float32, bfloat16, "
                          "float16.")(f)
    f = click.option("--device", default="cpu", show_default=True, help="Where the model runs: " + DEVICES_HELP
                     + " Under torchrun with cuda, each rank takes cuda:LOCAL_RANK.")(f)
    return f


def device_map_option(f):
    """--device-map (generate, eval, sweep; a string `resolve_device_map` checks when the command runs)."""
    return click.option(
        "--device-map", "device_map", default="none", show_default=True,
        help="auto: split a model larger than one GPU over every visible GPU (then CPU memory), layer by layer "
             "(transformers' device_map='auto', through accelerate); each cache layer keeps its KV on its layer's "
             "GPU. Also balanced, balanced_low_0, sequential. Replaces --device; eager decoding only (no "
             "--compile).")(f)
