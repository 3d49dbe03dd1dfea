"""Calibration passes (runtime: they run the model): Q-Filters' query directions, PrefixKV's importance profiles.

`prepare(method, model)` readies a method (and the methods nested in it) for a model before a cache uses it: a
method whose class sets `calibration = "qfilters"` and has no `filters` gets them from the cache directory
(safetensors, keyed by the model: `kvsqueeze.models.model_key`) or, the first time, from `calibrate_qfilters`;
one with `calibration = "prefixkv"` and no `profiles` gets them the same way (`calibrate_prefixkv`); then its own
`setup(model)` runs. Both kinds of data are kept, loaded and calibrated by one mechanism, `Calibrated`
(`QFILTERS`, `PREFIXKV`); `load_or_calibrate`, `save`, `filters_path`, `prefixkv_path` and
`load_or_calibrate_prefixkv` are their per-kind names.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..compat import cache_kwargs
from ..devices import input_device
from ..errors import KVSqueezeError
from ..methods.qfilters import filters_from_queries
from ..models import cache_dir, model_file
from ..shapes import attention_shape


def default_calibration_texts() -> list[str]:
    text = (Path(__file__).resolve().parent.parent / "data" / "calibration.txt").read_text()
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def _windows(tokenizer, texts: list[str] | None, n_seq: int, seq_len: int, gen: torch.Generator,
             desc: str, progress: bool):
    """The calibration windows both passes read: (token ids (T,) of the joined texts (None: the shipped text),
    the window length min(seq_len, T), the windows' start offsets), `n_seq` starts drawn from `gen` so that each
    window is a contiguous slice of the text (one window when the text is not longer than `seq_len`), wrapped in
    a tqdm bar named `desc` when `progress` and tqdm is installed. Raises `KVSqueezeError` for a text under 64
    tokens."""
    ids = tokenizer("\n\n".join(texts or default_calibration_texts()), return_tensors="pt").input_ids[0]
    if ids.numel() < 64:
        raise KVSqueezeError("calibration text is too short (need at least 64 tokens)")
    seq_len = min(seq_len, ids.numel())
    if seq_len == ids.numel():
        n_seq = 1  # the whole text is one window: more would be the same queries again
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_seq,), generator=gen).tolist()
    if progress:
        try:
            from tqdm.auto import tqdm

            return ids, seq_len, tqdm(starts, desc=desc, unit="seq")
        except ImportError:  # pragma: no cover
            pass
    return ids, seq_len, starts


@torch.no_grad()
def calibrate_qfilters(model, tokenizer, texts: list[str] | None = None, n_seq: int = 8, seq_len: int = 1024,
              n_vectors: int = 3000, seed: int = 0, progress: bool = True) -> torch.Tensor:
    """Compute Q-Filters (n_layers, kv_heads, head_dim) from post-RoPE queries on calibration text.

    `texts` are joined and tokenized; `n_seq` windows of `seq_len` tokens are drawn at random offsets, each a
    contiguous slice of that text (never wrapped around its end, which would join its last tokens to its first);
    `n_vectors` query vectors are sampled per head among them, the SVD runs per query head in fp32. A text
    shorter than `seq_len` is read once as one window (rotated copies of it would add no new queries). The
    paper's recipe (Godey et al., make_filters.py) is 20 windows x 2048 tokens of pretraining text (FineWeb),
    3000 vectors: pass such text (`kvsqueeze calibrate qfilters --text-dir`) for filters close to theirs; the
    shipped default text is about 1k tokens. Raises `KVSqueezeError` for a text under 64 tokens."""
    from .attention import record_queries
    from .routing import patched

    gen = torch.Generator().manual_seed(seed)
    ids, seq_len, starts = _windows(tokenizer, texts, n_seq, seq_len, gen, "Q-Filters calibration", progress)
    per_seq = max(1, n_vectors // len(starts))
    store: dict[int, list[torch.Tensor]] = {}

    def rec(module, query):
        b, hq, q, d = query.shape
        pick = torch.randperm(q, generator=gen)[:per_seq]
        store.setdefault(module.layer_idx, []).append(query[0, :, pick].float().cpu())

    device = input_device(model)  # the embeddings' (a split model's first device)
    with patched(model), record_queries(rec):  # the model is routed through kvsqueeze only inside the block
        for s in starts:
            chunk = ids[s:s + seq_len]  # a contiguous window of the text (starts drawn so it fits)
            model(chunk[None].to(device), use_cache=False)
    n_kv = attention_shape(model.config.get_text_config())[1]
    return filters_from_queries({li: torch.cat(v, dim=1) for li, v in store.items()}, n_kv)


@torch.no_grad()
def calibrate_prefixkv(model, tokenizer, texts: list[str] | None = None, n_seq: int = 8, seq_len: int = 512,
                       seed: int = 0, progress: bool = True) -> torch.Tensor:
    """PrefixKV's offline profiles (samples, n_layers, seq_len) float32: for each of `n_seq` windows of `seq_len`
    tokens of the calibration text (random offsets, contiguous, as `calibrate_qfilters`; one window when the text
    is shorter), one uncompressed prefill; per layer the attention each token received, summed over the window's
    queries and averaged over the query heads (recomputed from the post-RoPE queries and keys,
    `kernels.attention_probs`), sorted and accumulated (`kvsqueeze.methods.prefixkv.cumulative_profiles`). Raises
    `KVSqueezeError` for a text under 64 tokens or a model with sliding-window or chunked layers."""
    from transformers import DynamicCache

    from ..kernels.attention_probs import attention_chunks
    from ..methods.prefixkv import cumulative_profiles
    from .attention import record_queries
    from .routing import patched

    cfg = model.config.get_text_config()
    if getattr(cfg, "sliding_window", None) or getattr(cfg, "attention_chunk_size", None) or any(
            t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        raise KVSqueezeError("PrefixKV calibration supports models whose layers all attend to the full prompt")
    gen = torch.Generator().manual_seed(seed)
    ids, seq_len, starts = _windows(tokenizer, texts, n_seq, seq_len, gen, "PrefixKV calibration", progress)
    device = input_device(model)  # the embeddings' (a split model's first device)
    softcap = getattr(cfg, "attn_logit_softcapping", None)
    samples = []
    for s in starts:
        queries: dict[int, tuple] = {}

        def rec(module, query):
            queries[module.layer_idx] = (query, getattr(module, "scaling", None) or query.shape[-1] ** -0.5)

        cache = DynamicCache(config=model.config)
        with patched(model), record_queries(rec):
            model(ids[s:s + seq_len][None].to(device), use_cache=True, **cache_kwargs(model, cache))
        rows = []
        for li in range(len(cache.layers)):
            q, scaling = queries[li]
            keys = cache.layers[li].keys
            pos = torch.arange(keys.shape[2], device=keys.device)
            total = torch.zeros(keys.shape[2], device=keys.device)
            for c in attention_chunks(q, keys, scaling=scaling, softcap=softcap, q_positions=pos,
                                      k_positions=pos.expand(1, keys.shape[1], -1)):
                total += c.probs[0].sum(1).mean(0)  # summed over the chunk's queries, averaged over heads
            rows.append(total.cpu())
        samples.append(torch.stack(rows))
    return cumulative_profiles(torch.stack(samples)).float()


@dataclass(frozen=True)
class Calibrated:
    """One kind of calibration data kept per model: the tensor `calibrate(model, tokenizer, **kw)` returns,
    saved as `$KVSQUEEZE_CACHE/<name>/<models.model_key(model)>.safetensors` under the key `attr`, which is also
    the attribute of a method (whose class sets `calibration = name`) that `prepare` fills. `title` names the data
    in messages. What differs between the kinds is here; where they are kept, loaded and saved is one code."""

    name: str  # "qfilters": the cache folder, the method classes' `calibration`, `kvsqueeze calibrate <name>`
    attr: str  # "filters": the tensor's key in the file and the method's attribute
    title: str  # "Q-Filters"
    calibrate: Callable[..., torch.Tensor]

    def path(self, model) -> Path:
        return model_file(cache_dir() / self.name, model)

    def save(self, model, data: torch.Tensor) -> Path:
        """Write `data` for `model` as safetensors (written whole, then renamed: a reader never sees a partial
        file), the model's name and the shape as metadata; returns the path."""
        path = self.path(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        meta = {"model": str(getattr(model.config, "_name_or_path", "")), "shape": json.dumps(list(data.shape))}
        save_file({self.attr: data.contiguous()}, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    def load_or_calibrate(self, model, tokenizer=None, **kw) -> torch.Tensor:
        """The data for `model`: from the cache directory, else calibrated (`calibrate(model, tokenizer, **kw)`,
        which needs the tokenizer) and saved. Raises `KVSqueezeError` when neither is possible."""
        path = self.path(model)
        if path.exists():
            return load_file(str(path))[self.attr]
        if tokenizer is None:
            raise KVSqueezeError(
                f"no {self.title} calibrated for this model: run `kvsqueeze calibrate {self.name} --model M` "
                "or load it with kvsqueeze.load_model"
            )
        data = self.calibrate(model, tokenizer, **kw)
        self.save(model, data)
        return data


QFILTERS = Calibrated("qfilters", "filters", "Q-Filters", calibrate_qfilters)  # (n_layers, kv_heads, head_dim)
PREFIXKV = Calibrated("prefixkv", "profiles", "PrefixKV profiles", calibrate_prefixkv)  # (samples, n_layers, n_cal)
CALIBRATED = {c.name: c for c in (QFILTERS, PREFIXKV)}


def filters_path(model) -> Path:
    """Where `model`'s Q-Filters are kept."""
    return QFILTERS.path(model)


def prefixkv_path(model) -> Path:
    """Where `model`'s PrefixKV profiles are kept."""
    return PREFIXKV.path(model)


def save(model, filters: torch.Tensor) -> Path:
    """Write Q-Filters (n_layers, kv_heads, head_dim) for `model` as safetensors; returns the path."""
    return QFILTERS.save(model, filters)


def load_or_calibrate(model, tokenizer=None, **kw) -> torch.Tensor:
    """Q-Filters (n_layers, kv_heads, head_dim) for `model`: from the cache directory, else calibrated (needs the
    tokenizer) and saved. Raises `KVSqueezeError` when neither is possible."""
    return QFILTERS.load_or_calibrate(model, tokenizer, **kw)


def load_or_calibrate_prefixkv(model, tokenizer=None, **kw) -> torch.Tensor:
    """PrefixKV's profiles (samples, n_layers, n_cal) for `model`: from the cache directory, else calibrated (needs
    the tokenizer) and saved. Raises `KVSqueezeError` when neither is possible."""
    return PREFIXKV.load_or_calibrate(model, tokenizer, **kw)


def _nested(method) -> list:
    """`method` and every method held in its dataclass fields (a PyramidKV scorer, a wrapped inner method)."""
    out, todo = [], [method]
    while todo:
        m = todo.pop()
        if m is None or any(m is o for o in out):
            continue
        out.append(m)
        if dataclasses.is_dataclass(m):
            todo += [getattr(m, f.name) for f in dataclasses.fields(m) if hasattr(getattr(m, f.name), "score")]
    return out


def prepare(method, model) -> None:
    """Ready `method` (and the methods nested in it) for `model`: calibration data first (Q-Filters' filters,
    PrefixKV's profiles, loaded or calibrated once per model), then each method's `setup(model)`. Idempotent.
    Raises `KVSqueezeError` when they cannot be calibrated (nothing saved and no tokenizer on the model)."""
    if method is None:
        return
    for m in _nested(method):
        kind = CALIBRATED.get(getattr(type(m), "calibration", None))
        if kind is not None and getattr(m, kind.attr, None) is None:
            setattr(m, kind.attr, kind.load_or_calibrate(model, getattr(model, "kvsqueeze_tokenizer", None)))
    method.setup(model)
