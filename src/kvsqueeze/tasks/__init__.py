"""Offline long-context tasks, generated deterministically for a seed at a length in tokens of the model's tokenizer.

    passkey            passkey retrieval
    niah               needle in a haystack over a grid of lengths x depths
    niah_single ... fwe  RULER-style synthetic tasks (see `ruler.py`); `ruler` names all seven
    ppl                long-text perplexity with a capped cache
    suite              all of the above
    jsonl:PATH | hf:ORG/NAME[:DIR] | longbench[:SUBSET] | ruler-hub[:LEN]   your own data (see `data.py`)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import KVSqueezeError
from .base import METRICS, Sample, fit_sample, fit_to_length, score, string_match_all, string_match_part
from .data import is_data_spec, load_data, load_jsonl
from .haystack import make_haystack
from .niah import DEFAULT_DEPTHS, niah_samples
from .passkey import passkey_samples
from .perplexity import perplexity_samples
from .ruler import RULER_TASKS

SYNTHETIC = ["passkey", "niah", *RULER_TASKS, "ppl"]
GROUPS = {"ruler": list(RULER_TASKS), "suite": SYNTHETIC}


@dataclass
class TaskConfig:
    """How synthetic tasks are generated. `samples` is per task; NIAH spreads it over its grid, at least one
    sample per (length, depth) cell."""

    length: int = 2048
    samples: int = 5
    seed: int = 0
    haystack_dir: str | None = None
    niah_lengths: list[int] | None = None  # default: [length]
    niah_depths: list[float] = field(default_factory=lambda: list(DEFAULT_DEPTHS))
    ppl_tokens: int = 64


def expand_tasks(spec: str | list[str]) -> list[str]:
    """'passkey,ruler' -> ['passkey', 'niah_single', ...]; unknown names raise one clear error."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in (x.strip() for x in items):
        if not item:
            continue
        names = GROUPS.get(item, [item])
        for name in names:
            if name not in SYNTHETIC and not is_data_spec(name):
                raise KVSqueezeError(
                    f"unknown task {name!r}; choose from {', '.join(SYNTHETIC)}, the groups "
                    f"{', '.join(GROUPS)}, or data: jsonl:PATH, hf:ORG/NAME[:DIR], longbench[:SUBSET], ruler-hub[:LEN]"
                )
            if name not in out:
                out.append(name)
    if not out:
        raise KVSqueezeError("no task given")
    return out


def build_samples(tokenizer, tasks: str | list[str], cfg: TaskConfig | None = None) -> list[Sample]:
    """Every sample of `tasks`, deterministic for `cfg.seed`."""
    cfg = cfg or TaskConfig()
    if cfg.length < 64:
        raise KVSqueezeError(f"length must be at least 64 tokens, got {cfg.length}")
    if cfg.samples < 1:
        raise KVSqueezeError(f"samples must be >= 1, got {cfg.samples}")
    hay = make_haystack(cfg.haystack_dir, cfg.seed)
    out: list[Sample] = []
    for name in expand_tasks(tasks):
        if is_data_spec(name):
            out += load_data(name, cfg.samples)
        elif name == "passkey":
            out += passkey_samples(tokenizer, cfg.samples, cfg.length, cfg.seed)
        elif name == "niah":
            lengths = cfg.niah_lengths or [cfg.length]
            depths = cfg.niah_depths
            if not depths or any(not (0.0 <= d <= 1.0) for d in depths):
                raise KVSqueezeError(f"NIAH depths must be in [0, 1], got {depths}")
            per_cell = max(1, round(cfg.samples / (len(lengths) * len(depths))))
            out += niah_samples(tokenizer, lengths, depths, per_cell, cfg.seed, hay)
        elif name == "ppl":
            out += perplexity_samples(tokenizer, cfg.samples, cfg.length, cfg.seed, hay, cfg.ppl_tokens)
        else:
            out += RULER_TASKS[name](tokenizer, cfg.samples, cfg.length, cfg.seed, hay)
    return out


__all__ = [
    "GROUPS", "METRICS", "RULER_TASKS", "SYNTHETIC", "Sample", "TaskConfig", "build_samples", "expand_tasks",
    "fit_sample", "fit_to_length", "load_data", "load_jsonl", "niah_samples", "passkey_samples",
    "perplexity_samples", "score", "string_match_all", "string_match_part",
]
