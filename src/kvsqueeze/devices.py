"""`--device`, `--dtype` and `--attn-implementation` of `generate`, `eval` and `sweep`: parsing, checking, and the
click options.

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
