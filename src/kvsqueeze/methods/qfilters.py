"""Q-Filters (Godey et al., 2025, "Q-Filters: Leveraging QK Geometry for Efficient KV Cache Compression").

Queries of a head concentrate along one direction; keys that point along it draw attention. Calibrated per
model, on the fly, from post-RoPE queries on calibration text:

    Q_h = [q_1; ...; q_N] (N sampled vectors per query head),  Q_h = U S V^T  (fp32 SVD)
    v_h = V[:, 0],  s_h = +1 if most entries of U[:, 0] are positive else -1
    f_g = mean_{h in GQA group g} s_h v_h
    score(t) = < K_t, f_g >                                    (per kv head g; higher = keep)

Filters are stored as safetensors in a cache directory keyed by the model (`kvsqueeze calibrate qfilters`);
no hub download. Optional `window` keeps the most recent tokens as in the paper's streaming setting.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..shapes import attention_shape
from ..errors import KVSqueezeError
from .base import Method, ScoreInputs


def cache_dir() -> Path:
    return Path(os.environ.get("KVSQUEEZE_CACHE", Path.home() / ".cache" / "kvsqueeze"))


def model_key(model) -> str:
    """A key that changes when the model's config or weights do."""
    cfg = model.config.get_text_config()
    h = hashlib.sha256(cfg.to_json_string(use_diff=False).encode())
    first = next(m for m in model.modules() if hasattr(m, "q_proj"))
    h.update(repr(first.q_proj.weight.detach().float().sum().item()).encode())
    name = str(getattr(model.config, "_name_or_path", "") or "model").replace("/", "_").replace(" ", "_")[-40:]
    return f"{name}-{h.hexdigest()[:12]}"


def filters_path(model) -> Path:
    return cache_dir() / "qfilters" / f"{model_key(model)}.safetensors"


def default_calibration_texts() -> list[str]:
    text = (Path(__file__).resolve().parent.parent / "data" / "calibration.txt").read_text()
    return [p.strip() for p in text.split("\n\n") if p.strip()]


@torch.no_grad()
def calibrate(model, tokenizer, texts: list[str] | None = None, n_seq: int = 8, seq_len: int = 1024,
              n_vectors: int = 3000, seed: int = 0, progress: bool = True) -> torch.Tensor:
    """Compute Q-Filters (n_layers, kv_heads, head_dim) from post-RoPE queries on calibration text.

    `texts` are joined and tokenized; `n_seq` windows of `seq_len` tokens are drawn at random offsets, each a
    contiguous slice of that text (never wrapped around its end, which would join its last tokens to its first);
    `n_vectors` query vectors are sampled per head among them, the SVD runs per query head in fp32. A text
    shorter than `seq_len` is read once as one window (rotated copies of it would add no new queries). The
    paper's recipe (Godey et al., make_filters.py) is 20 windows x 2048 tokens of pretraining text (FineWeb),
    3000 vectors: pass such text (`kvsqueeze calibrate qfilters --text-dir`) for filters close to theirs; the
    shipped default text is about 1k tokens. Raises `KVSqueezeError` for a text under 64 tokens."""
    from ..attention import patched, record_queries
    texts = texts or default_calibration_texts()
    gen = torch.Generator().manual_seed(seed)
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    if ids.numel() < 64:
        raise KVSqueezeError("calibration text is too short (need at least 64 tokens)")
    seq_len = min(seq_len, ids.numel())
    if seq_len == ids.numel():
        n_seq = 1  # the whole text is one window: more would be the same queries again
    per_seq = max(1, n_vectors // n_seq)
    store: dict[int, list[torch.Tensor]] = {}

    def rec(module, query):
        b, hq, q, d = query.shape
        pick = torch.randperm(q, generator=gen)[:per_seq]
        store.setdefault(module.layer_idx, []).append(query[0, :, pick].float().cpu())

    device = next(model.parameters()).device
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_seq,), generator=gen)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    it = starts.tolist()
    if progress and tqdm is not None:
        it = tqdm(it, desc="Q-Filters calibration", unit="seq")
    with patched(model), record_queries(rec):  # the model is routed through kvsqueeze only inside the block
        for s in it:
            chunk = ids[s:s + seq_len]  # a contiguous window of the text (starts drawn so it fits)
            model(chunk[None].to(device), use_cache=False)
    cfg = model.config.get_text_config()
    n_kv = attention_shape(cfg)[1]
    layers = []
    for li in sorted(store):
        q = torch.cat(store[li], dim=1)  # (hq, N, d)
        filt = []
        for h in range(q.shape[0]):
            u, _, vh = torch.linalg.svd(q[h], full_matrices=False)
            sign = 1.0 if (u[:, 0] > 0).sum() > u.shape[0] / 2 else -1.0
            filt.append(sign * vh[0])
        f = torch.stack(filt)  # (hq, d)
        layers.append(f.view(n_kv, -1, f.shape[-1]).mean(1))
    return torch.stack(layers)


def load_or_calibrate(model, tokenizer=None, **kw) -> torch.Tensor:
    path = filters_path(model)
    if path.exists():
        return load_file(str(path))["filters"]
    if tokenizer is None:
        raise KVSqueezeError(
            "no Q-Filters calibrated for this model: run `kvsqueeze calibrate qfilters --model M` "
            "or load it with kvsqueeze.load_model"
        )
    filters = calibrate(model, tokenizer, **kw)
    save(model, filters)
    return filters


def save(model, filters: torch.Tensor) -> Path:
    path = filters_path(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": str(getattr(model.config, "_name_or_path", "")), "shape": json.dumps(list(filters.shape))}
    save_file({"filters": filters.contiguous()}, str(path), metadata=meta)
    return path


@dataclass(kw_only=True)
class QFilters(Method):
    window: int = 0
    filters: torch.Tensor | None = None  # (n_layers, kv_heads, head_dim); calibrated when None

    name = "qfilters"
    summary = "project keys on each head's main query direction (calibrated per model, no hub)"

    def setup(self, model) -> None:
        if self.filters is None:
            self.filters = load_or_calibrate(model, getattr(model, "kvsqueeze_tokenizer", None))

    def score(self, x: ScoreInputs) -> torch.Tensor:
        if self.filters.device != x.keys.device or self.filters.dtype != torch.float32:
            self.filters = self.filters.to(x.keys.device, torch.float32)  # once: loaded or calibrated on the CPU
        f = self.filters[x.layer_idx]  # (hkv, d)
        scores = torch.einsum("bhnd,hd->bhn", x.keys.float(), f)
        if self.window:
            scores = scores.masked_fill(x.recent(self.window), float("inf"))
        return scores
