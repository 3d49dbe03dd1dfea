"""The static decode path: a fixed-capacity compressed cache and one decoding step that can be compiled.

The eager `CompressedCache` prefills and compresses (unchanged); `StaticCompressedCache.from_cache(cache, n)` then
copies what it kept into preallocated slots (`kvsqueeze.storage.static.StaticSlots`) with room for `n` decoding
tokens, and `StaticDecoder` runs one greedy decoding step over them, in the spirit of gpt-fast:

    cache = CompressedCache(model, SnapKV(compression_ratio=0.5)); logits = prefill(model, cache, ids)
    static = StaticCompressedCache.from_cache(cache, max_new_tokens=64)
    tokens = static_greedy_decode(model, static, logits, 64, eos, compile=True)  # torch.compile, CUDA graphs

A step feeds input ids (b, 1) with position ids (b, 1) = the tokens each row has seen (left padding not counted,
as `generate()` counts them; RoPE stays exact whatever slot a token lands in), writes each layer's new key and
value into that layer's write slot (`index_put_` into the buffers, in place even when compiled: no allocation, no concatenation), attends over
every slot with a mask built on the device from the slots' `valid` bits, takes the argmax on the device, and, for
a method that evicts while decoding, picks the next write slot (the victim) on the device. No `.item()`, no
Python number that changes per step: the step is captured whole by `torch.compile(step, fullgraph=True,
mode="reduce-overhead")` on CUDA (CUDA graphs); uncompiled it is the same code. The loop checks for EOS only every
`eos_every` steps (one host synchronisation each) and at the end.

How attention sees the slots: the model's own forward runs (embeddings, RoPE, projections, MLP); the step passes
it a 4D `attention_mask` that is the stacked per-layer validity ((layers * b, kv_heads, 1, capacity) bool, a view
of the slots' `valid` buffer: transformers hands a 4D mask to the attention function as-is, 5.17 and 5.24 alike),
and, during the step only, the model's attention implementation is `kvsqueeze_static_sdpa` / `_eager`
(`routing.static_attention`), which slices its layer's rows out of that mask. Per-layer, per-(row, kv head)
masks are needed because layers and heads hold different slots (AdaKV, PyramidKV, decode-time eviction). The sdpa
variant attends the query heads of a kv-head group as the rows of one query (no key repetition, the mask
broadcast over the group); the eager variant calls the model's `eager_attention_forward` with an additive mask.

Decode-time eviction without attention weights is supported: StreamingLLM (the victim is the oldest slot that is
not a sink: a ring over the window) and K-norm (the slot whose key has the largest L2 norm; the norms live in the
slot-aligned `priority` buffer), PyramidKV over either (per-layer budgets). Methods whose decode-time eviction
needs the step's attention weights (H2O, TOVA, SnapKV, ... with `compression_interval > 0`), AdaKV with decode
eviction (its head budgets are re-split at each eviction), quantized storage other than KIVI, KIVI with decode-time
eviction, Quest / AttentionPredictor with decode-time eviction, offloading to disk, sliding-window layers,
attention softcapping and a model split over several devices (`device_map`) are refused with a `KVSqueezeError`
naming the eager path (`greedy_decode_batch`).

Quest selection (Tang et al., 2024, arXiv 2406.10774) runs in the step: a cache built with `selector=Quest(...)`
is copied with its selector as a `StaticQuest` (`selection/static_quest.py`: per-page key min / max in fixed
buffers, refreshed on the device for the page each step writes); the step's forward carries it to the static
attention under the keyword `kvsqueeze_pages` (transformers passes a forward's extra keyword arguments down to the
attention function), where each sparse layer picks its top budget / page pages per kv head on the device and
attends to them only: read in place by the Triton page kernel (`kernels/page_decode.py`), gathered by the torch
kernels.

AttentionPredictor (Yang, Wang et al., 2025) runs in the step the same way: a cache built with
`selector=AttentionPredictor(...)` is copied with a `StaticAttentionPredictor`
(`selection/static_attention_predictor.py`: the attention history and the CNN's per-row terms in fixed ring
buffers, prediction from the history up to the previous step, the step's row pushed on the device) under the same
keyword; its calibration steps (a full attention row every `calibration_every` steps) run eagerly after the compiled
step, chosen on the host by the step counter (`_count_step` -> `host_step`, then `_after_step` -> `after_step`).

Offloading (issue 13) with Quest or AttentionPredictor: an offloaded cache (`offload="cpu"`), or
`from_cache(..., offload="cpu")`, keeps the sparse layers' slot buffers in mapped host memory (`storage/mapped.py`)
and, by default, device page frames for the pages a step attends to (`storage/frames.py`, kwarg
`kvsqueeze_frames`): each step copies over the host link only the selected pages its frames do not hold from the
step before (and the page it writes into), with the page table on the device; with `page_frames=False` the page
attention reads every selected page over the link in place. The step's token is written to host memory; the page
metadata, the slot tables and the dense layers stay on the device. No copy engine, no host synchronisation: the
step stays one CUDA graph. `offload_stats()`: pages and bytes moved per token, hit rate.

KIVI storage (issue 12, item 2): a cache whose every layer holds a `KIVIStore` (KIVI over the full cache, or after a
prefill eviction) is copied into `quant.kivi_static.StaticKIVI` buffers instead of fp16 slots: packed 2/4-bit
groups at fixed capacity plus a residual of R + G full-precision tokens per layer, the residual flushed into the
next packed group on the device (see that module). `update` writes into the residual; the step's forward carries
the buffers to the static attention under the keyword `kvsqueeze_kivi` (as Quest's), which attends over them:
kernel "triton" (the default on CUDA) with the fused split-KV kernel over the packed bytes
(`kernels/kivi_decode.kivi_decode_static`, lengths read on the device), any other kernel with the dequantizing torch reference (two matrix products, float32 softmax).

`model.generate(input_ids, cache=<static cache>)` works, uncompiled: prefill all but the last prompt token into the
`CompressedCache`, build the static copy, and give `generate()` the whole prompt: its first forward then brings one
new token, and every forward given a static cache outside `StaticDecoder` is driven by the routing hooks (the
cache's own positions and slot mask replace generate()'s, the model is switched to the static attention for the
forward). The cache reports `is_compileable = False`, so generate() does not compile its forward (switching the
model inside a captured graph is not supported); the compiled step is `StaticDecoder` / `static_greedy_decode`.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from ..compat import cache_kwargs
from ..errors import KVSqueezeError
from ..quant.kivi import KIVIStore
from ..quant.kivi_static import StaticKIVI
from ..storage.layer import CompressedLayer
from ..storage.offload import OffloadLayer, OffloadStore
from ..storage.stats import CacheStats
from ..kernels.slot_decode import grouped_matmul_decode
from ..storage.static import StaticSlots, _static
from .fused_projections import build_fused_projections, swapped as fused_swapped
from ..storage.stores import DenseStore
from .routing import STATIC_PREFIX, attention_configs, static_attention

EAGER = "(`kvsqueeze generate` without --compile; static=False in Python)"  # where refused caches decode


# --- the attention functions of the static step ---------------------------------------------------------------
# A step's forward carries what its attention needs beyond the layer's buffers as extra keyword arguments
# (`StaticCompressedCache.forward_kwargs`; transformers hands them down to the attention function): the static KIVI
# buffers under `kvsqueeze_kivi` (the attention interface is given the layer's residual buffers, not the packed
# ones) and the page selector (`StaticQuest` or `StaticAttentionPredictor`) under `kvsqueeze_pages`. One route for
# all. A forward that does not pass them down is refused: without the KIVI buffers the attention gets the
# residual, narrower than the slot mask (`_layer_rows`); without the pages no layer chooses any
# (`StaticDecoder._check_selected`).
KIVI_KW = "kvsqueeze_kivi"  # the forward kwarg carrying a cache's `StaticKIVI` down to the static attention
PAGES_KW = "kvsqueeze_pages"  # the forward kwarg carrying a cache's page selector down to the static attention
FRAMES_KW = "kvsqueeze_frames"  # and an offloaded cache's device page frames (`StaticFrames`)


def _kivi_attention(module, query, scaling, kernel, kwargs):
    """The layer's attention over the static KIVI buffers the forward carries (kwarg `kvsqueeze_kivi`, removed
    from `kwargs`): (b, 1, hq, d); None when the step's cache holds fp16 slots."""
    kv = kwargs.pop(KIVI_KW, None)
    if kv is None:
        return None
    return kv.attention(module.layer_idx, query, scaling, kernel)


def _layer_rows(module, attention_mask: torch.Tensor, b: int, key: torch.Tensor) -> torch.Tensor:
    """This layer's (b, kv_heads, 1, capacity) bool rows of the stacked per-layer mask. Raises KVSqueezeError
    without that mask, or when the layer's keys `key` (b, hk, n, d) are not the mask's width (a KIVI cache's
    residual buffers reached a fp16 attention: the forward did not pass `kvsqueeze_kivi` down)."""
    if attention_mask is None or attention_mask.dim() != 4:
        raise KVSqueezeError("the static attention needs the stacked slot mask of a StaticCompressedCache step "
                             "(use StaticDecoder / static_greedy_decode, not a plain forward)")
    if attention_mask.shape[-1] != key.shape[2]:
        raise KVSqueezeError(f"{type(module).__name__}'s forward does not pass keyword arguments down to its "
                             "attention, so the static step cannot run KIVI storage on it (its attention got the "
                             "residual buffers); decode on the eager path " + EAGER)
    li = module.layer_idx
    return attention_mask[li * b:(li + 1) * b]


def _selected(module, query, key, value, m, scaling, kwargs):
    """Quest in the static step: when the forward carries a `StaticQuest` (kwarg `kvsqueeze_pages`) and this
    layer is sparse, its selected pages (b, hk, k) and the keys, values (b, hk, k * page, d) and mask rows
    (b, hk, 1, k * page) of those pages (a gather: the torch kernels' way; the Triton kernel reads the pages in
    place); else (None, key, value, m) unchanged."""
    quest = kwargs.pop(PAGES_KW, None)
    frames = kwargs.pop(FRAMES_KW, None)
    pages, key, value, fr = _select_pages(quest, frames, module.layer_idx, query, scaling, key, value)
    if pages is None:
        return None, key, value, m
    from ..kernels.page_decode import gather_pages

    key, value, ok = gather_pages(key, value, m[:, :, 0], pages, quest.page, fr)
    _prefetch_next(quest, frames, module.layer_idx)  # the gather copied what the attention reads
    return pages, key, value, ok[:, :, None]


def _select_pages(selector, frames, layer_idx: int, query, scaling, key, value):
    """One layer's page selection in the static step: the selector's pages (b, hk, K), or None (no selector, a
    dense layer: (None, key, value, None)); for an offloaded layer with device page frames (`storage/frames.py`,
    kwarg `kvsqueeze_frames`) those pages made resident (the missing ones copied from host memory), the attention
    then reading the frames' keys / values through frame_of (b, hk, K); then the selector's `observe` over what the
    attention reads. Returns (pages, keys, values, frame_of or None)."""
    pages = None if selector is None else selector.select(layer_idx, query, scaling)
    if pages is None:
        return None, key, value, None
    fr = None
    if frames is not None and frames.holds(layer_idx):
        key, value, fr = frames.fetch(layer_idx, pages)
    selector.observe(layer_idx, query, scaling, pages, key, fr)
    return pages, key, value, fr


def _prefetch_next(selector, frames, layer_idx: int) -> None:
    """After a layer's attention has been issued (it reads the frames this overwrites): with prefetching page frames
    (`StaticFrames(prefetch=True)`, AttentionPredictor), the layer's next-step pages, known from its history now,
    start copying on the side stream (`StaticFrames.prefetch`)."""
    if frames is not None and frames.prefetching and frames.holds(layer_idx):  # (called for sparse layers only)
        frames.prefetch(layer_idx, selector.select_next(layer_idx))


def _static_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """sdpa over every slot of a static layer: query (b, hq, 1, d), key / value (b, hk, capacity, d); the hq // hk
    query heads of a group are the rows of one query per kv head (no repeated keys). Returns (b, 1, hq, d). With
    Quest (`_selected`), over the selected pages' slots only."""
    kivi_out = _kivi_attention(module, query, scaling, None, kwargs)
    if kivi_out is not None:
        return kivi_out, None
    b, hq, q, d = query.shape
    hk = key.shape[1]
    m = _layer_rows(module, attention_mask, b, key)  # (b, hk, 1, C)
    _, key, value, m = _selected(module, query, key, value, m, scaling, kwargs)
    qg = query.reshape(b, hk, (hq // hk) * q, d)
    out = F.scaled_dot_product_attention(qg, key, value, attn_mask=m, scale=scaling)
    return out.reshape(b, hq, q, -1).transpose(1, 2).contiguous(), None


def _static_eager(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The model's own `eager_attention_forward` over every slot, with this layer's rows of the slot mask as an
    additive mask (b, hq, 1, capacity). With Quest (`_selected`), over the selected pages' slots only."""
    kivi_out = _kivi_attention(module, query, scaling, None, kwargs)
    if kivi_out is not None:
        return kivi_out, None
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise KVSqueezeError(f"{type(module).__name__} has no eager_attention_forward; use attn_implementation='sdpa'")
    b, hq = query.shape[:2]
    m = _layer_rows(module, attention_mask, b, key)
    _, key, value, m = _selected(module, query, key, value, m, scaling, kwargs)
    m = m.repeat_interleave(hq // m.shape[1], dim=1)
    add = torch.zeros(m.shape, dtype=query.dtype, device=query.device).masked_fill(~m, torch.finfo(query.dtype).min)
    return fn(module, query, key, value, add, dropout=dropout, scaling=scaling, **kwargs)


def _static_matmul(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Decode attention as two batched matrix products over each kv-head group (no repeated keys): scores
    (b, hk, g, capacity) = q K^T * scaling, masked, softmax in float32 (as transformers' eager attention), then
    times V. For one query token, cuBLAS spreads the long capacity axis over the GPU where a fused kernel
    without split-KV would run one block per (row, head). With Quest (`_selected`), over the gathered selected
    pages (the torch reference of the Triton page kernel). Returns (b, 1, hq, d)."""
    kivi_out = _kivi_attention(module, query, scaling, None, kwargs)
    if kivi_out is not None:
        return kivi_out, None
    m = _layer_rows(module, attention_mask, query.shape[0], key)  # (b, hk, 1, C)
    _, key, value, m = _selected(module, query, key, value, m, scaling, kwargs)
    return grouped_matmul_decode(query, key, value, m, scaling), None


def _static_triton(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Split-KV Triton decode attention over the slots (`kernels/slot_decode.py`): every slot read once, the
    layer's slot mask read in place. With Quest, over the selected pages read in place
    (`kernels/page_decode.py`: no gather copy). Returns (b, 1, hq, d)."""
    kivi_out = _kivi_attention(module, query, scaling, "triton", kwargs)
    if kivi_out is not None:
        return kivi_out, None
    from ..kernels.page_decode import page_decode_attention
    from ..kernels.slot_decode import slot_decode_attention

    b = query.shape[0]
    m = _layer_rows(module, attention_mask, b, key)  # (b, hk, 1, C)
    quest = kwargs.get(PAGES_KW)
    pages, key, value, fr = _select_pages(quest, kwargs.get(FRAMES_KW), module.layer_idx, query, scaling, key, value)
    if pages is not None:
        out = page_decode_attention(query[:, :, 0], key, value, m[:, :, 0], pages, quest.page, scale=scaling,
                                    frames=fr)
        _prefetch_next(quest, kwargs.get(FRAMES_KW), module.layer_idx)  # after the kernel that reads the frames
    else:
        out = slot_decode_attention(query[:, :, 0], key, value, m[:, :, 0], scale=scaling)
    return out[:, None], None


def _default_cuda_kernel(cache) -> str:
    """The static step's kernel on CUDA when none is named: "triton" (split-KV over the slots) where triton is
    installed and the head dim suits it (a power of two >= 16), else "matmul". Measured on an H200 (docs/gpu.md,
    Llama-3.1-8B shapes): triton 6.58 / 5.51 ms per token at 32k full / 8x, 6.08 at 128k / 8x; matmul 12.16 /
    6.48 / 9.08 and sdpa 30.90 / 8.88 before the in-place writes (both slower than triton at every length)."""
    from ..kernels.split_kv import triton

    d = cache.slots.head_dim
    return "triton" if triton is not None and d >= 16 and not d & (d - 1) else "matmul"


KERNELS = ("sdpa", "eager", "matmul", "triton")  # the static step's attention kernels (`StaticDecoder(kernel=...)`)
AttentionInterface.register(STATIC_PREFIX + "matmul", _static_matmul)
AttentionInterface.register(STATIC_PREFIX + "sdpa", _static_sdpa)
AttentionInterface.register(STATIC_PREFIX + "eager", _static_eager)
AttentionInterface.register(STATIC_PREFIX + "triton", _static_triton)


# --- the cache ----------------------------------------------------------------------------------------------
ALIGN = 16  # capacity is rounded up to this many slots (aligned mask / key rows for the fused attention kernels)


class _SlotLayer(CacheLayerMixin):
    """One layer of a `StaticCompressedCache` for transformers' `Cache` interface: writes go to the shared slots."""

    is_compileable = False  # see StaticCompressedCache.is_compileable
    is_sliding = False

    def __init__(self, owner: "StaticCompressedCache", layer_idx: int):
        super().__init__()
        self.owner, self.layer_idx = owner, layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):  # pragma: no cover - built initialised
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner.update(key_states, value_states, self.layer_idx)

    def get_seq_length(self) -> int:
        return self.owner.tokens_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.slots.capacity, 0

    def get_max_length(self) -> int:
        return self.owner.slots.capacity


def _decode_rule(method):
    """('sink', n_sink) | ('norm', None) | None: how `method` evicts while decoding in the static path; raises
    KVSqueezeError for a decode-time eviction the static path cannot run."""
    from ..methods import AdaKV, KNorm, PyramidKV, StreamingLLM

    every = getattr(method, "compression_interval", 0) if method is not None else 0
    if not every:
        return None
    if isinstance(method, AdaKV):
        raise KVSqueezeError("AdaKV with compression_interval > 0 re-splits its head budgets at every eviction, "
                             "which the static decode path does not do; decode with the eager loop " + EAGER)
    scorer = method.scorer if isinstance(method, PyramidKV) else method
    if isinstance(scorer, StreamingLLM):
        return ("sink", scorer.n_sink)
    if isinstance(scorer, KNorm):
        return ("norm", None)
    raise KVSqueezeError(f"{method.describe() if hasattr(method, 'describe') else method.name} with "
                         f"compression_interval={every} evicts while decoding by scores the static decode path does "
                         "not compute (it needs the step's attention weights); decode with the eager loop "
                         + EAGER + ", or set compression_interval=0")


def _static_selector(selector):
    """The static counterpart of an eager selector: `StaticQuest` for Quest, `StaticAttentionPredictor` for
    AttentionPredictor (both carried to the attention under `kvsqueeze_pages`, one protocol)."""
    from ..selection import AttentionPredictor

    if isinstance(selector, AttentionPredictor):
        from ..selection.static_attention_predictor import StaticAttentionPredictor

        return StaticAttentionPredictor
    from ..selection.static_quest import StaticQuest

    return StaticQuest


def check_model(model) -> None:
    """Refuse, before any prefill, a model the static decode path cannot run: sliding-window or chunked-attention
    layers (Gemma 2/3, Mistral's window, Llama 4's chunks), attention softcapping, and a model on several devices
    (split by `device_map`: the static slots, the step's buffers and its CUDA graph live on one device). Raises
    KVSqueezeError (the same refusals `StaticCompressedCache.from_cache` makes on a filled cache)."""
    _check_config(model.config)
    from ..devices import model_devices

    _check_one_device(model_devices(model))


def _check_one_device(devices) -> None:
    """Refuse a model or cache on more than one device (`devices`: the distinct devices). Raises KVSqueezeError."""
    devices = list(dict.fromkeys(str(d) for d in devices))
    if len(devices) > 1:
        raise KVSqueezeError(f"the static decode path runs a model on one device; this one is split over "
                             f"{', '.join(devices)} (device_map): decode it with the eager loop " + EAGER)


def _check_config(config) -> None:
    """check_model's refusals, read from a model config (sliding / chunked layers, softcapping)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = set(getattr(cfg, "layer_types", None) or [])
    if kinds - {"full_attention"} or getattr(cfg, "use_sliding_window", False) or \
            (getattr(cfg, "sliding_window", None) and not kinds):
        raise KVSqueezeError(f"{getattr(cfg, 'model_type', 'this model')} has sliding-window or chunked-attention "
                             "layers; the static decode path supports full-attention layers only " + EAGER)
    if getattr(cfg, "attn_logit_softcapping", None):
        raise KVSqueezeError("attention softcapping is not supported by the static decode path " + EAGER)


class StaticCompressedCache(Cache):
    """A fixed-capacity compressed cache for a compiled decoding step (see the module docstring).

    Built from a prefilled `CompressedCache` by `from_cache`; holds `slots` (`StaticSlots`), `position` (b,) long
    (the position id of each row's next token), `decode_step` () long (decoding steps done, for the eviction
    schedule) and the Python-side room left (`steps_left`, checked by the decoder without a device sync)."""

    kvsqueeze_routes = False  # never switched to the eager wrapper: the step switches to the static attention
    kvsqueeze_static = True  # routing's hooks pass such forwards through untouched

    def __init__(self, slots: StaticSlots, position: torch.Tensor, rule, every: int, tokens_seen: int,
                 steps_left: int, config, decode_step: int = 0, full_kv_bytes: int = 0):
        self.slots = slots
        super().__init__(layers=[_SlotLayer(self, i) for i in range(slots.n_layers)])
        self.config = config
        self.position = _static(position.to(torch.long).clone())
        self.decode_step = _static(torch.tensor(decode_step, dtype=torch.long, device=position.device))
        self._exempt: list[int] = []
        self._exempt_mask = torch.zeros(slots.n_layers, 1, 1, dtype=torch.bool, device=position.device)
        self.rule, self.every = rule, every
        self.tokens_seen = tokens_seen
        self.steps_left = steps_left
        self._steps_built = steps_left
        self.full_kv_bytes = full_kv_bytes
        self.driven = False  # True while a StaticDecoder runs a step (the routing hooks then stay out)
        self.hook_depth, self.hook_saved = 0, None  # a forward driven by the routing hooks (model.generate)
        self.pages = None  # a StaticQuest / StaticAttentionPredictor when the eager cache had that selector
        self.frames = None  # StaticFrames: device page frames of the offloaded layers (offload="cpu", page_frames)

    @property
    def is_compileable(self) -> bool:
        """False: `model.generate` must not compile its forward with this cache (the routing hooks that drive a
        generate() step switch the model's config, which belongs outside a graph); kvsqueeze's `StaticDecoder`
        compiles its own step."""
        return False

    # --- building ------------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_cache(cls, cache, max_new_tokens: int, position: torch.Tensor | None = None,
                   offload: str | None = "auto", page_frames: bool | float = True,
                   prefetch: bool = False) -> "StaticCompressedCache":
        """The static copy of a prefilled `CompressedCache` with room for `max_new_tokens` decoding steps.

        Capacity (slots per layer, row and kv head): without decode-time eviction, the largest number of entries
        any (layer, row, kv head) holds plus `max_new_tokens`; with it (StreamingLLM, K-norm, PyramidKV over
        them, `compression_interval = N`), the largest budget plus N (exempt layers: their fill plus
        `max_new_tokens`); rounded up to a multiple of `ALIGN` (16) slots. `position` (b,) long: the position id
        of each row's next token (default: the tokens the row has seen, its left padding not counted). A `Quest`
        selector of the cache is carried over (`pages`, a `StaticQuest`; capacity then in whole pages; its budget must
        be a multiple of its page), an `AttentionPredictor` as a `StaticAttentionPredictor` (its history copied;
        the same page rules). A cache whose every layer holds a `KIVIStore` becomes `StaticKIVI` buffers
        (`_from_kivi`). `offload`: "cpu" keeps the keys and values of the layers the selector makes sparse in host
        memory the step reads in place (`StaticSlots(host_layers=...)`, storage/mapped.py; needs a Quest or
        AttentionPredictor selector), None keeps everything on the device, "auto" (default) follows the cache
        (`cache.offload_tier`). `page_frames` (with offload): the offloaded layers also hold the step's pages in
        device frames (`storage/frames.py`: only the pages a step lacks cross the host link; the default) instead
        of every step reading its pages over the link in place (False); a number r >= 1: r times as many frames as
        pages per step (recent pages stay resident; at most the capacity's pages). `prefetch` (offload with page
        frames, AttentionPredictor): each offloaded layer's next pages are predicted right after its attention and
        copied on a side CUDA stream while the step goes on (AttentionPredictor's cross-token prefetch;
        `storage/frames.py`, Prefetch); the same tokens. Raises KVSqueezeError for what the static path cannot
        hold (see the module docstring), for prefetch without those, and for an empty cache."""
        from .cache import CompressedCache

        if not isinstance(cache, CompressedCache):
            raise KVSqueezeError(f"StaticCompressedCache.from_cache needs a CompressedCache, got {type(cache).__name__}")
        if max_new_tokens < 1:
            raise KVSqueezeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        selector = cache.selector
        if selector is not None:
            from ..selection import AttentionPredictor, Quest

            if not isinstance(selector, (Quest, AttentionPredictor)):
                raise KVSqueezeError(f"decode-time selection by {type(selector).__name__} runs on the eager path "
                                     "only (the static decode path runs Quest and AttentionPredictor) " + EAGER)
            _static_selector(selector).check(selector)
        if offload == "auto":
            offload = getattr(cache, "offload_tier", None)
        if offload == "disk":
            raise KVSqueezeError("the static step offloads to 'cpu' (host memory it reads in place): a disk tier "
                                 "decodes on the eager path only " + EAGER)
        if offload not in (None, "none", "cpu"):
            raise KVSqueezeError(f"offload must be 'auto', 'cpu' or None, got {offload!r}")
        offload = None if offload == "none" else offload
        if page_frames is not True and page_frames is not False and not page_frames >= 1:
            raise KVSqueezeError(f"page_frames must be True, False or a ratio >= 1 of frames to pages per step, "
                                 f"got {page_frames!r}")
        if prefetch:
            from ..selection import AttentionPredictor

            if not isinstance(selector, AttentionPredictor) or not offload or page_frames is False:
                raise KVSqueezeError("prefetch needs AttentionPredictor selection (the next step's pages are known "
                                     "from its history; Quest's need the next query), offload='cpu' and page frames")
        if offload and selector is None:
            raise KVSqueezeError("offloading needs a decode-time selector (--select quest or attention_predictor): "
                                 "the static step reads the selected pages from host memory")
        _check_config(cache.config)
        for i, layer in enumerate(cache.layers):
            if not isinstance(layer, CompressedLayer) or layer.sliding_window:
                raise KVSqueezeError(f"layer {i} is a sliding-window or chunked-attention layer; the static decode "
                                     "path supports full-attention layers only " + EAGER)
            if not layer.is_initialized or layer.positions is None or layer.positions.shape[-1] == 0:
                raise KVSqueezeError("the cache is empty: prefill it before building the static cache")
        _check_one_device(layer.device for layer in cache.layers)  # each layer's KV is on its layer's device
        if any(isinstance(layer, OffloadLayer) and layer.host_store is not OffloadStore for layer in cache.layers):
            raise KVSqueezeError("the static decode step does not read a quantized host tier (--quant with "
                                 "--offload) " + EAGER)
        kinds = {type(layer.store) for layer in cache.layers}
        if kinds == {KIVIStore}:
            return cls._from_kivi(cache, max_new_tokens, position)
        for i, layer in enumerate(cache.layers):
            if type(layer.store) is not DenseStore and not isinstance(layer, OffloadLayer):
                raise KVSqueezeError(f"layer {i} is held by {type(layer.store).__name__}: quantized storage other "
                                     "than KIVI (on every layer) and cross-layer storage (MiniCache, xKV) decode on "
                                     "the eager path only " + EAGER)
        method = cache.method
        rule = _decode_rule(method)
        if selector is not None and rule is not None:
            raise KVSqueezeError(f"{type(selector).__name__} selection with decode-time eviction "
                                 "(compression_interval > 0) runs on the eager path only " + EAGER)
        every = method.compression_interval if rule is not None else 0
        exempt = set(getattr(method, "exempt_layers", ()) or ())
        layers = cache.layers
        l0 = layers[0]
        b, h, _ = l0.positions.shape
        dev = l0.device
        n_pad = l0.n_pad
        fills = [int(layer.held_counts().max()) for layer in layers]
        limits = []
        for i, layer in enumerate(layers):
            if rule is None or i in exempt:
                limits.append(None)
                continue
            n_keep = cache.budgets.layer(i, layer, "decode")  # the budget the eager decoding steps hold
            per_row = layer.row_keep
            lim = torch.full((b, h), n_keep, dtype=torch.long, device=dev)
            if per_row is not None:
                lim = per_row.to(dev)[:, None].expand(b, h).clone()
            limits.append(lim)
        cap = 1
        for fill, lim in zip(fills, limits):
            cap = max(cap, fill + max_new_tokens if lim is None else max(fill, int(lim.max())) + every)
        align = ALIGN if selector is None else math.lcm(ALIGN, selector.page)  # whole Quest pages
        cap = -(-cap // align) * align  # aligned rows for the attention kernels; the extra slots stay empty
        host = [i for i in range(len(layers)) if i not in selector.dense_layers] if offload else ()
        slots = StaticSlots(len(layers), b, h, cap, l0.head_dim, l0.dtype, dev, evicts=rule is not None,
                            value_dim=l0.values.shape[-1], host_layers=host)
        for i, layer in enumerate(layers):
            keys, values = layer.keys.to(dev), layer.values.to(dev)  # an offloaded layer's host tier: one layer at a time
            pos = layer.positions.long()
            if n_pad is not None:  # positions in each row's own frame (as generate()'s position ids)
                pos = pos - n_pad.to(dev)[:, None, None]
            prio = None
            if rule is not None:
                prio = _priority(rule, keys, pos)
                if limits[i] is None:  # an exempt layer never evicts
                    prio = torch.full_like(prio, float("inf"))
            slots.load(i, keys, values, pos, layer.valid, prio)
            if limits[i] is not None:
                slots.limit[i] = limits[i]
            else:
                slots.limit[i] = cap
        seen = torch.full((b,), l0.cumulative_length, dtype=torch.long, device=dev)
        if n_pad is not None:
            seen = seen - n_pad.to(dev)
        full = sum(2 * b * h * layer.held_tokens() * layer.head_dim * keys.element_size() for layer in layers)
        out = cls(slots, seen if position is None else position.to(dev), rule, every, l0.cumulative_length,
                  max_new_tokens, cache.config, decode_step=cache.decode_step, full_kv_bytes=full)
        out._exempt = sorted(exempt)
        out._exempt_mask = torch.tensor([i in exempt for i in range(len(layers))], device=dev).view(-1, 1, 1)
        if selector is not None:
            from ..selection.static_attention_predictor import StaticAttentionPredictor

            if _static_selector(selector) is StaticAttentionPredictor:
                from ..shapes import attention_shape

                cfg = cache.config.get_text_config() if hasattr(cache.config, "get_text_config") else cache.config
                out.pages = StaticAttentionPredictor(selector, slots, attention_shape(cfg)[0])
                out.pages.load(selector, [layer.n_stored for layer in layers])
            else:
                from ..selection.static_quest import StaticQuest

                out.pages = StaticQuest(selector, slots)
                out.pages.load()
            if slots.host_layers and page_frames:
                from ..storage.frames import StaticFrames

                k = out.pages.chosen.shape[-1]
                n = k if page_frames is True else min(math.ceil(page_frames * k), slots.capacity // selector.page)
                out.frames = StaticFrames(slots, selector.page, max(n, k), prefetch=prefetch)
                if prefetch:
                    out.pages.enable_ahead()
        return out

    @classmethod
    def _from_kivi(cls, cache, max_new_tokens: int, position: torch.Tensor | None) -> "StaticCompressedCache":
        """`from_cache` for a cache whose every layer holds a `KIVIStore` (KIVI over a full cache, or after a
        prefill eviction): the slots are `StaticKIVI` buffers. Quantized capacity: the most tokens a layer holds
        plus `max_new_tokens`, rounded up to the group, plus one spare group (the group every step quantizes
        early, see quant/kivi_static.py); residual capacity R + G. Raises KVSqueezeError for decode-time eviction
        (`compression_interval > 0`: the static KIVI step does not evict), values of another width than keys, or
        layers with different KIVI settings."""
        method = cache.method
        if getattr(method, "compression_interval", 0) if method is not None else 0:
            raise KVSqueezeError("decode-time eviction (compression_interval > 0) over KIVI storage is not supported "
                                 "by the static decode path; decode with the eager loop " + EAGER +
                                 ", or set compression_interval=0")
        layers = cache.layers
        l0 = layers[0]
        st0 = l0.store
        b, h, _ = l0.positions.shape
        dev = l0.device
        d = l0.head_dim
        if st0.residual_values.shape[-1] != d:
            raise KVSqueezeError("the static KIVI path needs values as wide as keys (head_dim)")
        most = max(layer.store.n for layer in layers)
        g = st0.group
        cq = -(-(most + max_new_tokens) // g) * g + g
        slots = StaticKIVI(len(layers), b, h, d, cq, st0.bits, g, st0.value_group, st0.residual, l0.dtype, dev)
        for i, layer in enumerate(layers):
            slots.load(i, layer.store, layer.valid)
        n_pad = l0.n_pad
        seen = torch.full((b,), l0.cumulative_length, dtype=torch.long, device=dev)
        if n_pad is not None:
            seen = seen - n_pad.to(dev)
        item = torch.empty((), dtype=l0.dtype).element_size()
        full = sum(2 * b * h * layer.held_tokens() * d * item for layer in layers)
        return cls(slots, seen if position is None else position.to(dev), None, 0, l0.cumulative_length,
                   max_new_tokens, cache.config, decode_step=cache.decode_step, full_kv_bytes=full)

    # --- what the model calls ------------------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Write one token's keys / values (b, kv_heads, 1, d) into layer `layer_idx`'s write slots; return the
        layer's buffers (b, kv_heads, capacity, d). Raises KVSqueezeError for more than one token."""
        if key_states.shape[-2] != 1:
            raise KVSqueezeError("a StaticCompressedCache takes one token per row per forward (decoding); append "
                                 "longer inputs to the eager CompressedCache before building the static copy")
        prio = None
        if self.rule is not None and self.rule[0] == "norm" and layer_idx not in self._exempt:
            prio = -key_states[:, :, 0].float().norm(dim=-1)
        out = self.slots.write_kv(layer_idx, key_states, value_states, prio)
        if self.pages is not None:  # Quest: the written page's key min / max (on the device)
            self.pages.refresh(layer_idx)
        return out

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.tokens_seen

    # --- a forward driven by the routing hooks (model.generate) ----------------------------------------------
    def prepare_forward(self, args: tuple, kwargs: dict) -> dict:
        """Before a forward the model was given this cache for outside a `StaticDecoder` (the routing pre-hook
        calls it): claim the write slots and feed the cache's own `position_ids` (b, 1) and stacked slot mask as
        `attention_mask` (generate()'s 2D mask and positions are replaced). Raises KVSqueezeError unless the
        forward brings exactly one new token per row, or when the cache is full."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        x = ids if ids is not None else kwargs.get("inputs_embeds")
        if x is None or x.shape[1] != 1:
            raise KVSqueezeError(
                "a StaticCompressedCache takes one new token per row per forward: with model.generate, pass input "
                "ids one token longer than what the cache has seen (prefill all but the last prompt token into the "
                "CompressedCache before StaticCompressedCache.from_cache)")
        self._count_step()
        return dict(kwargs, position_ids=self.begin_step(), attention_mask=self.mask(), **self.forward_kwargs())

    def forward_kwargs(self) -> dict:
        """Extra keyword arguments of a step's model forward (transformers hands them down to the attention
        function): the `StaticKIVI` buffers under `kvsqueeze_kivi` when the cache holds KIVI storage, the
        `StaticQuest` under `kvsqueeze_pages` when it selects pages."""
        out = {}
        if isinstance(self.slots, StaticKIVI):
            out[KIVI_KW] = self.slots
        if self.pages is not None:
            out[PAGES_KW] = self.pages
        if self.frames is not None:
            out[FRAMES_KW] = self.frames
        return out

    def finish_forward(self) -> None:
        """After such a forward (the routing post-hook): evict where due and move the write slots."""
        self.end_step()
        self._after_step()

    def _after_step(self) -> None:
        after_step = getattr(self.pages, "after_step", None)
        if after_step is not None:  # AttentionPredictor: a calibration step's full history rows (eager, no sync)
            after_step()

    def _count_step(self) -> None:
        if self.rule is None or self._exempt:
            if self.steps_left <= 0:
                raise KVSqueezeError("the static cache is full: build it with a larger max_new_tokens")
        self.steps_left -= 1
        self.tokens_seen += 1
        host_step = getattr(self.pages, "host_step", None)
        if host_step is not None:  # AttentionPredictor: this step's calibration flags (a host counter, no sync)
            host_step()

    # --- one step (graph-friendly) ---------------------------------------------------------------------------
    def begin_step(self) -> torch.Tensor:
        """Claim the write slots for the next token; returns the position ids (b, 1) to feed."""
        pos = self.position
        prio = None
        if self.rule is not None and self.rule[0] == "sink":  # exempt layers never evict: +inf there
            prio = _priority(self.rule, None, pos).view(1, -1, 1).masked_fill(self._exempt_mask, float("inf"))
        self.slots.begin_token(pos, prio)
        self.decode_step.add_(1)
        return pos[:, None].clone()

    def end_step(self) -> None:
        """After the forward: evict where due (every `every` decoding steps, as the eager schedule) and move the
        write slots; the next position follows. With prefetching page frames, the step's copies are joined first
        (`StaticFrames.join`)."""
        if self.frames is not None and self.frames.prefetching:
            self.frames.join()
        if self.rule is not None:
            due = (self.decode_step % self.every) == 0
            self.slots.end_token(due, max_victims=self.every)
        else:
            self.slots.end_token(False, 0)
        self.position.add_(1)

    def mask(self) -> torch.Tensor:
        """The stacked per-layer slot mask (layers * b, kv_heads, 1, capacity) bool: a view of `slots.valid`."""
        s = self.slots
        return s.valid.view(s.n_layers * s.batch, s.kv_heads, 1, s.capacity)

    # --- memory ----------------------------------------------------------------------------------------------
    def offload_stats(self) -> dict:
        """Host -> device traffic of an offloaded static cache since its conversion (one host synchronisation: call
        outside timed steps), as `CompressedCache.offload_stats`: decode_steps, bytes_per_token, pages_per_token
        (pages of `page` slots per layer and kv head copied or read over the link per step, whole model, every step
        counted), hit_rate (with page frames: pages a step needed that its frames already held, every step counted,
        the first one too, whose frames start empty; None when the pages are read in place: every selected page
        crosses the link each step), hit_rate_after_first (the same over the steps after the first), needed / hits
        (pages; with prefetch, hits are the pages its copies made resident too), prefetched (pages copied one step
        ahead, counted in the bytes), device_kv_bytes / host_kv_bytes. Raises KVSqueezeError for a cache that does
        not offload."""
        s = self.slots
        if not getattr(s, "host_layers", None):
            raise KVSqueezeError("this static cache does not offload (build it with from_cache(..., offload='cpu'))")
        steps = max(self._steps_built - self.steps_left, 1)
        st = self.stats()
        per_page = self.pages.page * (s.keys[0].shape[-1] + s.values[0].shape[-1]) * s.keys[0].element_size()
        k = self.pages.chosen.shape[-1]
        if self.frames is not None:
            t = self.frames.traffic()
            needed, hits, rate, warm = t["needed"], t["hits"], t["hit_rate"], t["hit_rate_after_first"]
            ahead = t["prefetched"]
        else:
            needed = len(s.host_layers) * s.batch * s.kv_heads * k * steps
            hits, rate, warm, ahead = 0, None, None, 0
        moved = needed - hits + ahead
        return {"decode_steps": steps, "hit_rate": rate, "hit_rate_after_first": warm, "needed": needed, "hits": hits,
                "prefetched": ahead, "pages_per_token": moved / steps, "bytes_per_token": moved * per_page / steps,
                "device_kv_bytes": st.device_kv_bytes, "host_kv_bytes": st.host_kv_bytes}

    def stats(self) -> CacheStats:
        """Bytes held: every layer's full-capacity buffers (`kv_bytes`; an offloaded cache's device page frames
        included), with the slot bookkeeping, the page metadata and the frames' page table (`total_bytes`), against
        a full cache of the tokens seen at the conversion (`full_kv_bytes`)."""
        kv = self.slots.nbytes() + (0 if self.frames is None else self.frames.nbytes())
        total = kv + self.slots.table_nbytes() + (0 if self.pages is None else self.pages.nbytes()) + \
            (0 if self.frames is None else self.frames.table_nbytes())
        host = self.slots.host_nbytes() if isinstance(self.slots, StaticSlots) else 0
        return CacheStats(kv, total, self.full_kv_bytes, self.tokens_seen, [self.slots.capacity] * self.slots.n_layers,
                          host_kv_bytes=host, frame_kv_bytes=None if self.frames is None else self.frames.nbytes())


def _priority(rule, keys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Per-slot eviction priority (b, kv_heads, n) float32 (lower = evicted first), the eager method's score:
    StreamingLLM: +inf for sinks, else the position; K-norm: -||k||_2."""
    if rule[0] == "sink":
        return pos.float().masked_fill((pos >= 0) & (pos < rule[1]), float("inf"))
    return -keys.float().norm(dim=-1)


# --- the step and the loop ------------------------------------------------------------------------------------
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - CPU-only installs
        return False
    return True


class StaticDecoder:
    """One greedy decoding step over a `StaticCompressedCache`, optionally compiled.

    `decoder(tokens)` with tokens (b,) long returns (logits (b, vocab) in the model's dtype, next tokens (b,)
    long = argmax), both on the device, having written `tokens` into the cache. Under CUDA graphs the logits are
    the graph's output buffer, overwritten by the next call (clone to keep them); the tokens are a copy.
    `kernel`: the attention kernel ("sdpa", "eager": the model's own kind over the slots; "matmul": two batched
    matrix products per kv-head group, see `_static_matmul`; "triton": split-KV flash-decoding over the slots,
    `kernels/slot_decode.py`, GPU; over KIVI buffers "triton" is the fused KIVI kernel and the others the
    dequantizing reference, see the module docstring; None: "triton" on CUDA where triton is installed and the head
    dim suits it (for a KIVI cache: where triton is installed), else "matmul" (`_default_cuda_kernel`: measured
    fastest on an H200, docs/gpu.md), and the model's own implementation elsewhere). `compile=True` wraps the step in
    `torch.compile(step, fullgraph=True, mode=...)`: `mode` defaults to "reduce-overhead" on CUDA (CUDA graphs)
    and None elsewhere; `backend` (e.g. "aot_eager", "eager") picks another backend (tests on the CPU). The
    model's attention implementation is switched to the static one only while a step runs. Raises
    KVSqueezeError when the cache has no room left (more steps than `max_new_tokens` without eviction).
    `fuse_projections`: each layer's query, key and value projections run as one GEMV during the step, and so do
    the MLP's gate and up projections (`runtime/fused_projections.py`; no extra memory: the model's weights become
    views of the fused ones). None (default): on where the cache is on CUDA (measured faster on an H200,
    docs/gpu.md), off elsewhere."""

    def __init__(self, model, cache: StaticCompressedCache, compile: bool = False, backend: str | None = None,
                 mode: str | None = None, kernel: str | None = None, fuse_projections: bool | None = None):
        if kernel is not None and kernel not in KERNELS:
            raise KVSqueezeError(f"the static attention kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        if kernel is None and cache.position.device.type == "cuda":
            kernel = _default_cuda_kernel(cache)
        if kernel == "triton" and cache.position.device.type == "cuda":
            from ..kernels.split_kv import _sm_count

            _sm_count(cache.position.device)  # cached before any trace: no device query inside a compiled step
        self.model, self.cache, self.kernel = model, cache, kernel
        self._configs = attention_configs(model)
        if fuse_projections is None:
            fuse_projections = cache.position.device.type == "cuda"
        self._fused = build_fused_projections(model) if fuse_projections else None
        kw = dict(cache_kwargs(model, cache), **cache.forward_kwargs())

        def step(tokens: torch.Tensor):
            pos = cache.begin_step()
            out = model(input_ids=tokens[:, None], position_ids=pos, attention_mask=cache.mask(), use_cache=True,
                        logits_to_keep=1, **kw)
            cache.end_step()
            logits = out.logits[:, -1]
            return logits, logits.argmax(-1)

        self._eager_step = step
        if compile:
            dev = cache.position.device
            if mode is None and backend is None and dev.type == "cuda":
                mode = "reduce-overhead"
            opts = {"fullgraph": True}
            if mode is not None:
                opts["mode"] = mode
            if backend is not None:
                opts["backend"] = backend
            self._step = torch.compile(step, **opts)
        else:
            self._step = step
        self._graphs = bool(compile) and mode == "reduce-overhead"
        self._checked = cache.pages is None  # Quest: checked once that the model's attention saw the pages

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor):
        c = self.cache
        c._count_step()
        c.driven = True
        try:
            with static_attention(self.model, self._configs, self.kernel), fused_swapped(self._fused):
                if self._graphs:  # a new replay: the previous step's outputs may be overwritten from here on
                    torch.compiler.cudagraph_mark_step_begin()
                logits, token = self._step(tokens)
        finally:
            c.driven = False
        c._after_step()
        if not self._checked:  # one host sync, at the first step only
            self._check_selected()
        # the token outlives the next replay (it is that step's input): a copy of b ints; logits are the graph's
        # own buffer, valid until the next call (clone them to keep them)
        return logits, (token.clone() if self._graphs else token)

    def _check_selected(self) -> None:
        """After the first step with a page selector (Quest, AttentionPredictor): every sparse layer chose its
        pages, i.e. the model's forward handed its extra keyword arguments (`kvsqueeze_pages`) down to the attention
        function, as transformers' Llama, Qwen, Mistral, ... do. Raises KVSqueezeError otherwise (the step would
        have attended densely)."""
        q = self.cache.pages
        sparse = [i for i in range(q.slots.n_layers) if q.sparse(i)]
        if sparse and not bool((q.chosen[sparse] >= 0).all()):
            raise KVSqueezeError(f"{type(self.model).__name__}'s forward does not pass keyword arguments down to its "
                                 "attention, so the static step cannot run page selection on it; decode on the eager "
                                 "path " + EAGER)
        self._checked = True


@torch.no_grad()
def static_greedy_decode(model, cache: StaticCompressedCache, first_logits: torch.Tensor, max_new_tokens: int,
                         eos: set[int], compile: bool = False, backend: str | None = None, mode: str | None = None,
                         eos_every: int = 16, logits_out: list | None = None,
                         kernel: str | None = None, fuse_projections: bool | None = None) -> list[list[int]]:
    """Greedy decoding of every row from `first_logits` (b, vocab) over a static cache: the same tokens as
    `greedy_decode_batch` on the eager cache (row r stops before its first `eos` token or at `max_new_tokens`).
    Generated ids stay on the device; EOS is looked for every `eos_every` steps (one host sync) and at the end.
    `logits_out`, when given, receives each step's logits (b, vocab) (cloned: a CUDA graph reuses its outputs).
    `compile`, `backend`, `mode`, `kernel`, `fuse_projections`: see `StaticDecoder`. Returns each row's tokens."""
    b = first_logits.shape[0]
    dev = first_logits.device
    ids = torch.empty(b, max_new_tokens, dtype=torch.long, device=dev)
    token = first_logits.argmax(-1)
    eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=dev) if eos else None
    decoder = StaticDecoder(model, cache, compile=compile, backend=backend, mode=mode, kernel=kernel,
                            fuse_projections=fuse_projections)
    n = 0
    for i in range(max_new_tokens):
        ids[:, i] = token
        n = i + 1
        if n == max_new_tokens:
            break
        if eos_t is not None and n % max(1, eos_every) == 0:
            if bool(torch.isin(ids[:, :n], eos_t).any(-1).all()):
                break
        logits, token = decoder(token)
        if logits_out is not None:
            logits_out.append(logits.clone())
    rows = ids[:, :n].tolist()
    out = []
    for row in rows:
        toks = []
        for t in row:
            if t in eos:
                break
            toks.append(t)
        out.append(toks)
    return out
