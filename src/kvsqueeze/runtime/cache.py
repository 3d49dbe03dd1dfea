"""The compressed KV cache (runtime): the container of compressed layers, the compression schedule and budgets.

`CompressedCache` is a `transformers.Cache` whose full-attention and sliding-window layers are `CompressedLayer`s
(`kvsqueeze.storage`). Compression runs after each layer's attention (see `attention.py`): the layer's attention for
the current forward has already used every entry, so the hidden states of that forward are unchanged, and the method
only decides what later tokens will see. The cache asks its `Method` for scores and keeps the top `n_keep` slots.
Sliding-window layers (Mistral, Phi-3, Qwen2 with use_sliding_window, Gemma 2/3's sliding layers) drop the tokens no
later query can see and are compressed inside their window, to a budget taken from the `sliding_window - 1` tokens a
full cache would hold: the compression_ratio asked is the compression_ratio held. Chunked-attention layers (Llama 4)
keep transformers' own `DynamicSlidingWindowLayer`, uncompressed.

The attention call reaches the cache through the routing hooks (`routing.current_cache(module)`), and the layer
whose `update` ran last waits in `cache.awaiting` for its attention call.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from ..errors import KVSqueezeError
from ..quant.offload import host_tier_for, host_tier_for_layers
from ..shapes import attention_shape
from ..storage.layer import CompressedLayer
from ..storage.offload import OffloadCounters, OffloadLayer
from ..storage.crosslayer import unique_tensors
from ..storage.stats import CacheStats, _nbytes
from . import attention as _attention  # noqa: F401  registers the kvsqueeze_sdpa / kvsqueeze_eager wrappers
from .budgets import Budgets
from .calibration import prepare
from .routing import attach



def _in_generate_prefill() -> bool:
    """Whether this forward is run by transformers' `generate()` prefill (its `_prefill`: the last chunk of a
    chunked prefill can be 1 token long, which would otherwise look like a decoding step)."""
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_name == "_prefill" and "generation" in f.f_code.co_filename:
            return True
        f = f.f_back
    return False


def layer_types_of(config) -> list[str]:
    """The attention type of each layer ('full_attention', 'sliding_attention', ...)."""
    types = getattr(config, "layer_types", None)
    if types is None:  # as transformers' DynamicCache reads such configs (Mistral, Phi-3: every layer sliding)
        sliding = getattr(config, "sliding_window", None)
        if getattr(config, "use_sliding_window", True) is False:  # Qwen2-style switch, off: full attention
            sliding = None
        chunked = getattr(config, "attention_chunk_size", None)
        kind = "sliding_attention" if sliding else "chunked_attention" if chunked else "full_attention"
        types = [kind] * config.num_hidden_layers
    return list(types)


def check_layer_indices(indices, n_layers: int, what: str) -> None:
    """Raise `KVSqueezeError` unless every index in `indices` names a layer of a model with `n_layers` layers
    (0..n_layers-1; negative indices are refused, not counted from the end). `what` names the option."""
    bad = [i for i in indices if not 0 <= i < n_layers]
    if bad:
        raise KVSqueezeError(f"{what} {','.join(str(i) for i in bad)}: layer indices must be in 0..{n_layers - 1} "
                             f"(the model has {n_layers} layers)")


def _decode_time(method) -> bool:
    """Whether `method` does what an offloaded layer does not support: read the cache while decoding (evict every
    `compression_interval` steps, its scorer's for a wrapper; observe every forward, `stateful`, H2O) or replace the
    layers' stores (a cross-layer method)."""
    scorer = getattr(method, "scorer", None)
    return (method.compression_interval > 0 or bool(getattr(method, "stateful", False))
            or (scorer is not None and getattr(scorer, "compression_interval", 0) > 0)
            or hasattr(method, "cross_layer_plan"))  # MiniCache, xKV: replace the layers' stores after the prefill


def _cpu_cache_pages(offload, pages: int | None, selector) -> int:
    """The disk tier's CPU cache in pages per offloaded layer: `pages`, or by default `DEFAULT_CPU_CACHE` times
    the pages a step reads per kv head (budget // page + 1) for tier 'disk' (0 otherwise). Raises KVSqueezeError for a negative number, or a CPU cache
    asked for another tier."""
    if pages is not None and pages < 0:
        raise KVSqueezeError(f"the disk tier's CPU cache holds a number of pages >= 0, got {pages}")
    if offload != "disk":
        if pages:
            raise KVSqueezeError("a CPU cache of pages sits in front of the disk tier only (offload='disk')")
        return 0
    if pages is None:
        return CompressedCache.DEFAULT_CPU_CACHE * (selector.budget // selector.page + 1)
    return int(pages)


class CompressedCache(Cache):
    """A `transformers.Cache` that keeps only the KV entries a `Method` says matter.

    >>> cache = CompressedCache(model, SnapKV(compression_ratio=0.5))
    >>> model.generate(input_ids, cache=cache, max_new_tokens=20)  # past_key_values= before transformers 5.24

    Phases. Without `with cache.prefill():`, every forward before the first decoding step (a 1-token forward)
    is prefill and is compressed: a prompt run in chunks (`generate(prefill_chunk_size=...)`, or the caller's
    own loop) is compressed after every chunk, so it never holds more than budget + one chunk, and a compression_ratio
    budget follows the tokens seen so far. A 1-token forward that transformers' `generate()` runs as the last
    chunk of its chunked prefill is still prefill. With `with cache.prefill(): ...` the caller says where the
    prefill is: every forward inside a block is compressed, and forwards outside the blocks, after one, are
    appended uncompressed (kvsqueeze's question-agnostic protocol: compress the context, then append the
    question). Decoding steps are compressed when the method sets `compression_interval`.

    Building the cache does not switch the model for good: `kvsqueeze.runtime.routing.attach` routes the model's
    attention through kvsqueeze only during forwards that use a `CompressedCache`.

    Offloading (`offload='cpu'|'disk'`, `storage/offload.py`): `offload_dir` holds the disk tier's files;
    `offload_cpu_cache` the pages of the disk tier's CPU cache per offloaded layer, shared by its rows and kv heads
    (None: `DEFAULT_CPU_CACHE` times the pages a step reads per kv head, budget // page + 1, for 'disk'; 0 for
    'cpu', which has none).
    """

    DEFAULT_CPU_CACHE = 4  # the disk tier's CPU cache per layer, in multiples of the pages a step reads per kv head

    kvsqueeze_routes = True  # forwards with this cache go through kvsqueeze's attention (routing.routes)
    hold_static_scores = True  # a `static_scores` method's old slots keep their first scores (False: re-scored)

    def __init__(self, model, method=None, *, layer_factory=None, selector=None, offload: str | None = None,
                 offload_latency: float = 0.0, offload_dir: str | None = None, offload_cpu_cache: int | None = None):
        if offload not in (None, "none", "cpu", "disk"):
            raise KVSqueezeError(f"offload must be 'cpu' or 'disk' (or None), got {offload!r}")
        offload = None if offload == "none" else offload
        if offload and selector is None:
            raise KVSqueezeError("offloading needs a decode-time selector (--select quest, attention_predictor or "
                                 "leoam): "
                                 "without one every step attends to every token, so every token would travel")
        if offload and method is not None and _decode_time(method):
            raise KVSqueezeError(f"offloading keeps the KV off the device between prefills: {method.describe()} "
                                 "scores or evicts while decoding (compression_interval, or a method observing every "
                                 "step such as H2O) or shares stores across layers; use a prefill-time method with "
                                 "--offload")
        if offload and not all(hasattr(selector, a) for a in ("budget", "page", "dense_layers")):
            raise KVSqueezeError(f"offloading sizes its device frames from the selector's budget, page and "
                                 f"dense_layers, which {type(selector).__name__} does not have")
        # the host tier of a quantized scheme (KIVI: its packed storage; KVSqueezeError for the others)
        host_store = host_tier_for_layers(layer_factory, selector.page) if offload else None
        cpu_cache = _cpu_cache_pages(offload, offload_cpu_cache, selector)
        attach(model)  # route the model's attention through kvsqueeze during this cache's forwards
        self.awaiting: int | None = None  # the layer whose update ran, waiting for its attention call
        self._deferred: list = []  # (layer_idx, ScoreInputs, query) waiting for the last layer (defer_eviction)
        config = model.config.get_text_config()
        self.config = config
        layers = []
        for i, kind in enumerate(layer_types_of(config)):
            if kind == "full_attention" and offload and i not in selector.dense_layers:
                # the KV in host memory, the selector's budget of pages (+ the partial page) in device frames
                layers.append(OffloadLayer(frames=selector.budget // selector.page + 1, page=selector.page,
                                           latency_s=offload_latency, tier=offload, disk_dir=offload_dir,
                                           store_factory=host_store, cpu_cache_pages=cpu_cache))
            elif kind == "full_attention":
                layers.append((layer_factory or CompressedLayer)())
            elif kind == "sliding_attention":  # compressed too, never holding tokens outside the window
                layer = (layer_factory or CompressedLayer)()
                layer.sliding_window, layer.is_sliding = int(config.sliding_window), True
                layers.append(layer)
            elif kind == "chunked_attention":
                layers.append(DynamicSlidingWindowLayer(sliding_window=config.attention_chunk_size))
            else:
                raise KVSqueezeError(f"layer {i} is of type {kind!r}, which kvsqueeze's cache does not support")
        super().__init__(layers=layers)
        self.method = method
        self.offload_tier = offload  # None, 'cpu' or 'disk': where the layers the selector makes sparse keep their KV
        # Decode-time selection (Quest, AttentionPredictor): every stored entry stays, each decoding step attends
        # to the subset `selector.select(...)` returns (see attention.py).
        self.selector = selector
        # Rows whose next outputs the caller ignores (greedy decoding's finished rows): a decoding step over a
        # stack of rows (`CompressedLayer.row_runs`) skips their attention (their output is zeros).
        self.idle_rows: frozenset[int] = frozenset()
        self.n_layers = len(layers)
        if method is not None:
            check_layer_indices(method.exempt_layers, self.n_layers, "exempt layers")
            if hasattr(method, "cross_layer_plan") and layer_factory not in (None, CompressedLayer):
                raise KVSqueezeError(f"{method.name} shares KV state across layers in full precision; it does not "
                                     "compose with quantized storage (--quant): drop one of them")
        if selector is not None:
            check_layer_indices(getattr(selector, "dense_layers", ()), self.n_layers, "dense layers")
        _, self.num_kv_heads, self.head_dim = attention_shape(config)
        self.budgets = Budgets(method, len(layers))  # per layer (row, kv head), fixed at the prefill
        self.phase = "prefill"
        self._in_prefill_block = False
        self._prefill_open = True  # forwards outside prefill() blocks are still prefill (see the class docstring)
        self._forwards = 0
        self.decode_step = 0
        if method is not None:
            prepare(method, model)
        if selector is not None:
            selector.setup(model)

    # --- phases ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def prefill(self):
        """Compress every forward run inside the block (a context prefilled in chunks); forwards outside the
        block, after it, are appended uncompressed (decoding steps still follow the method's `compression_interval`)."""
        self._in_prefill_block = True
        self._prefill_open = False
        try:
            yield self
        finally:
            self._in_prefill_block = False

    def _begin_forward(self, q_len: int):
        if self._deferred:  # the last layer's attention did not come through the wrapper: evict them now
            self._flush_deferred()
        if self.awaiting is not None:
            self.awaiting = None
            raise KVSqueezeError(
                "the model's attention is not routed through kvsqueeze; build the cache with "
                "CompressedCache(model, ...) on this model (after kvsqueeze.unpatch, rebuild it) and pass it as "
                "a keyword argument (cache= / past_key_values=)"
            )
        if self._in_prefill_block:
            self.phase = "prefill"
        elif self._prefill_open and self._forwards == 0 and self._was_prefilled():
            self._prefill_open = False  # filled by hand (e.g. a stacked copy): what follows is appended
            self.phase = "decode" if q_len == 1 else "append"
        elif self._prefill_open and (q_len > 1 or self._forwards == 0 or _in_generate_prefill()):
            self.phase = "prefill"
        elif q_len == 1:
            self._prefill_open = False
            self.phase = "decode"
            self.decode_step += 1
        else:
            self.phase = "append"
        self._forwards += 1

    def _was_prefilled(self) -> bool:
        return any(layer.get_seq_length() > 0 for layer in self.layers)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == 0:
            self._begin_forward(key_states.shape[-2])
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.awaiting = layer_idx
        return out

    def attend(self) -> int:
        """The layer whose update is waiting for its attention call (called once by the attention wrapper)."""
        layer_idx, self.awaiting = self.awaiting, None
        return layer_idx

    # --- compression, called after each layer's attention ------------------------------------------------
    def budget(self, layer_idx: int) -> int:
        """Slots this layer may keep per kv head (`budgets.Budgets.layer`)."""
        return self.budgets.layer(layer_idx, self.layers[layer_idx], self.phase)

    def after_attention(self, module, layer_idx: int, query: torch.Tensor, scaling: float | None,
                        memo: dict | None = None):
        """Let the method observe this forward and, when due, evict the layer down to its budget (or, over a
        mixed-precision store, split it into high and low precision); then commit the layer's store (quantized
        stores quantize what this forward appended and kept: after the eviction, so only kept tokens, once)."""
        self._observe_and_compress(layer_idx, query, scaling, memo)
        layer = self.layers[layer_idx]
        waiting = any(i == layer_idx for i, _, _ in self._deferred)
        if isinstance(layer, CompressedLayer) and not waiting:  # a deferred layer commits after its eviction
            layer.commit()
        if self._deferred and layer_idx == self.n_layers - 1:
            self._flush_deferred()
        plan = getattr(self.method, "cross_layer_plan", None)
        if plan is not None and self.phase == "prefill":  # MiniCache, xKV: a group's last layer is prefilled
            from ..storage.crosslayer import apply_plan

            apply_plan(plan(self.n_layers), self.layers, layer_idx)

    def _observe_and_compress(self, layer_idx: int, query: torch.Tensor, scaling: float | None, memo: dict | None):
        method = self.method
        layer = self.layers[layer_idx]
        if isinstance(layer, CompressedLayer):
            layer.drop_outside_window()
        if method is None or not isinstance(layer, CompressedLayer) or layer_idx in method.exempt_layers:
            return
        every = method.compression_interval
        compress = self.phase == "prefill" or (every > 0 and self.decode_step % every == 0)
        if not (compress or method.stateful):
            return
        from ..methods.base import ScoreInputs

        keys, values = layer.keys, layer.values
        x = ScoreInputs(
            layer_idx=layer_idx,
            n_layers=self.n_layers,
            queries=query,
            keys=keys,
            values=values,
            positions=layer.positions,
            valid=layer.valid,
            n_pad=layer.n_pad,
            seen=layer.cumulative_length,
            state=layer.state,
            row_state=layer.table.row_state,
            scaling=scaling if scaling is not None else query.shape[-1] ** -0.5,
            softcap=getattr(self.config, "attn_logit_softcapping", None),
            n_keep=0,
            sliding_window=layer.sliding_window,
            memo=memo,
        )
        if method.stateful:
            method.observe(x)
        if compress:
            if method.defer_eviction:  # layer budgets that need every layer's observation of this forward (D2O)
                self._deferred.append((layer_idx, x, query))
                return
            self._compress_layer(layer_idx, x, query)

    def _compress_layer(self, layer_idx: int, x, query: torch.Tensor) -> None:
        """Evict (or split) layer `layer_idx` down to its budget by the method's scores for `x` (its ScoreInputs);
        a merging method's plan (`Method.merge_plan`) is applied with the eviction."""
        method = self.method
        layer = self.layers[layer_idx]
        x.n_keep = self.budget(layer_idx)
        x.keep_per_row = layer.row_keep
        if self.budgets.due(layer, x.n_keep):
            balance = getattr(layer.store, "balance_keys", None)
            if balance is not None:  # MiKV's storage balances key channels by the queries' channel maxima
                q = query.abs().masked_fill(~x.query_valid()[:, None, :, None], 0.0).amax(dim=2)  # (b, hq, d)
                b, hq, d = q.shape
                balance(q.view(b, hq // x.group, x.group, d).amax(2), layer.valid)  # the split follows
                x.keys, x.values = layer.keys, layer.values
            scores = layer.window_scores(self._held_scores(layer, method.score(x), method))
            if hasattr(layer.store, "split"):  # mixed precision: the method's top tokens high, the rest low
                layer.split(scores, x.n_keep, layer.row_keep)
            else:
                merge = (lambda idx, visible: method.merge_plan(x, idx, visible)) if method.merges else None
                # slots may leave position order where the store gains (a quantized store keeps whole groups as
                # they are): not for merging methods (KVMerger merges adjacent slots) nor page-wise selectors
                layer.evict(scores, *self.budgets.counts(layer, scores, x.n_keep), merge=merge,
                            reorder=merge is None and self.selector is None)

    @staticmethod
    def _held_scores(layer, scores: torch.Tensor, method) -> torch.Tensor:
        """`scores` (batch, kv_heads, n) with, for a method whose scores never change once a slot is seen
        (`static_scores`, K-norm), the slots scored before given back the scores they got when first scored (new),
        remembered in the slot table's state (`score` float32 and `scored` bool, following every keep; slots
        appended since, e.g. by decoding steps between evictions, are scored now). A quantized store
        shows old keys dequantized: scored again, their norms would grow by the quantization error (2-bit KIVI:
        about half the kept slots lost to the next chunk's new tokens per chunk, a recency bias that is not the
        method's rule), and the scores of old and new slots would not compare. With full-precision storage the
        remembered scores are the ones recomputed."""
        if not (CompressedCache.hold_static_scores and getattr(method, "static_scores", False)):
            return scores
        scores = scores.float()
        held, scored = layer.state.get("score"), layer.state.get("scored")  # appended slots: 0 and False
        if held is not None and scored is not None and held.shape == scores.shape:
            scores = torch.where(scored, held, scores)
        layer.state["score"] = scores
        layer.state["scored"] = torch.ones_like(scores, dtype=torch.bool)
        return scores

    def _flush_deferred(self) -> None:
        """Evict, then commit, the layers whose eviction waited for the forward's last layer (`defer_eviction`)."""
        deferred, self._deferred = self._deferred, []
        for layer_idx, x, query in deferred:
            self._compress_layer(layer_idx, x, query)
            self.layers[layer_idx].commit()

    def compressed_copy(self, model, method, queries: dict[int, torch.Tensor], scaling: dict[int, float],
                        memo: dict | None = None, layer_factory=None):
        """A new cache holding this (uncompressed, single-forward prefill) cache compressed by `method`.

        Scoring after each layer's attention does not change the prefill's hidden states, so the keys and
        queries recorded by one full prefill give every method exactly what it would have seen: one prefill
        serves a whole sweep of methods and compression_ratios. Tensors are shared until eviction replaces them. `memo`
        keeps attention sums computed for one method to serve the next (they depend on the record only).
        `layer_factory` builds the copy's layers (e.g. quantized storage; default: the source's layer type).
        """
        if layer_factory is None and isinstance(self.layers[0], CompressedLayer):
            layer_factory = type(self.layers[0])
        out = CompressedCache(model, method, layer_factory=layer_factory, selector=self.selector)
        for i, (src, dst) in enumerate(zip(self.layers, out.layers)):
            if not src.is_initialized:
                continue
            dst.lazy_initialization(src.keys, src.values)
            dst.keys, dst.values = src.keys, src.values
            if isinstance(src, CompressedLayer):
                if not src.table.aligned or src.state:  # only a sliding window's contiguous drop is allowed
                    raise ValueError("compressed_copy needs an uncompressed source cache")
                dst.positions, dst.valid, dst.n_pad = src.positions, src.valid, src.n_pad
                dst.n_new = src.n_new
            dst.cumulative_length = src.cumulative_length
        out._forwards = 1
        out._prefill_open = False  # the question is appended uncompressed, as after a prefill() block
        out.phase = "prefill"
        for i, layer in enumerate(out.layers):
            if isinstance(layer, CompressedLayer) and layer.is_initialized:
                out.after_attention(None, i, queries[i], scaling.get(i), memo)  # commits, unless deferred
        out._flush_deferred()
        out.phase = "append"
        return out

    # --- per-sequence state: reset, batch operations ---------------------------------------------------
    def reset(self) -> None:
        """Forget the sequence(s): the cache then behaves exactly as a freshly built one with the same model,
        method, layer factory and selector (every layer emptied, the phase, budgets and decode schedule back to
        their start, the method's and the selector's per-sequence state cleared). A `with cache.prefill()` block
        the reset runs in stays in force, as it would for a fresh cache used inside it."""
        for layer in self.layers:
            layer.reset()
            if layer.is_initialized:  # transformers 5.17: sliding layers only zero their tensors
                layer.keys = layer.values = None
                layer.is_initialized = False
                layer.cumulative_length = 0
        self.budgets.reset()
        self.phase = "prefill"
        self._prefill_open = not self._in_prefill_block  # as a fresh cache (inside a block: as one that entered it)
        self._forwards = 0
        self.decode_step = 0
        self.awaiting = None
        self._deferred = []
        # methods keep their per-sequence state in the layers (`layer.state`); one holding more says so with reset()
        reset_method = getattr(self.method, "reset", None)
        if reset_method is not None:
            reset_method()
        if self.selector is not None:
            self._selector_hook("reset")()

    def _selector_hook(self, name: str):
        fn = getattr(self.selector, name, None)
        if fn is None:
            raise KVSqueezeError(
                f"selector {type(self.selector).__name__} has no {name}(): derive it from "
                "kvsqueeze.selection.Selector to reset or batch-index its per-sequence state"
            )
        return fn

    def _index_rows(self, fn) -> None:
        """Apply a batch operation (tensor (batch, ...) -> (batch', ...)) to the per-row state outside the layers."""
        if self.selector is not None:
            self._selector_hook("index_batch")(fn)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: row i becomes old row beam_idx[i] (beam_idx: (batch,) long), layers and selector alike."""
        super().reorder_cache(beam_idx)
        self._index_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row `repeats` times in place (batch -> batch * repeats), layers and selector alike."""
        super().batch_repeat_interleave(repeats)
        self._index_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows `indices` (a (k,) index tensor or bool mask over the batch), layers and selector
        alike."""
        super().batch_select_indices(indices)
        self._index_rows(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    # --- memory -------------------------------------------------------------------------------------
    def offload_to(self, where: str | None = "cpu", latency_s: float = 0.0,
                   disk_dir: str | None = None, cpu_cache: int | None = None) -> "CompressedCache":
        """Offload this cache's full-attention layers that its selector makes sparse (not `dense_layers`), as
        building it with `offload=where` would have (a cache compressed from a shared prefill record, e.g. in a
        sweep); returns the cache. `where` None or 'none': nothing to do. Raises KVSqueezeError as the
        constructor does (no selector, quantized storage other than KIVI, a tier other than 'cpu' / 'disk').
        KIVI layers move their packed storage as it is (`kvsqueeze.quant.offload`)."""
        if where in (None, "none"):
            return self
        sel = self.selector
        if where not in ("cpu", "disk"):
            raise KVSqueezeError(f"offload must be 'cpu' or 'disk' (or None), got {where!r}")
        if sel is None:
            raise KVSqueezeError("offloading needs a decode-time selector (--select quest, attention_predictor or "
                                 "leoam): "
                                 "without one every step attends to every token, so every token would travel")
        if self.method is not None and _decode_time(self.method):
            raise KVSqueezeError(f"offloading keeps the KV off the device between prefills: "
                                 f"{self.method.describe()} scores or evicts while decoding; use a prefill-time "
                                 "method with --offload")
        cpu_cache = _cpu_cache_pages(where, cpu_cache, sel)
        for i, layer in enumerate(self.layers):
            if type(layer) is not CompressedLayer or layer.sliding_window or i in sel.dense_layers:
                continue
            host_store = host_tier_for(layer.store, sel.page)  # None: full precision
            try:
                self.layers[i] = OffloadLayer.from_layer(layer, frames=sel.budget // sel.page + 1, page=sel.page,
                                                         latency_s=latency_s, tier=where, disk_dir=disk_dir,
                                                         store_factory=host_store, cpu_cache_pages=cpu_cache)
            except TypeError as e:
                raise KVSqueezeError(f"offloading cannot hold layer {i}'s storage in host memory ({e})") from None
        self.offload_tier = where
        return self

    def offload_stats(self) -> dict:
        """Offloading's traffic and memory, summed over the offloaded layers (`storage.offload`): hit_rate (pages
        a step needed that were already on the device, prefetched or kept from the previous step), pages_per_token
        and bytes_per_token (host -> device, per decoding step of the whole model), the raw `OffloadCounters`
        fields, device_kv_bytes / host_kv_bytes (every layer's KV: the non-offloaded layers are all on the device).
        Tier 'disk' (`storage.offload`'s CPU cache): disk_pages_per_token and disk_bytes_per_token (read from the
        files per decoding step), cpu_cache_hit_rate (pages that travelled to the device from the CPU cache / all
        that travelled, nan when none did), cpu_cache_bytes (the caches' pages, every offloaded layer).
        Raises KVSqueezeError for a cache built without `offload`."""
        if not self.offload_tier:
            raise KVSqueezeError("this cache does not offload (build it with offload='cpu')")
        c = OffloadCounters()
        cache_bytes = 0
        for layer in self.layers:
            if isinstance(layer, OffloadLayer) and layer.is_initialized:
                c.add(layer.store.counters)
                cache_bytes += layer.store.cpu_cache_nbytes()
        st = self.stats()
        tokens = max(self.decode_step, 1)
        travelled = c.cache_hits + c.disk_pages - c.disk_prefetch_pages
        return {
            "hit_rate": c.hits / c.needed if c.needed else float("nan"),
            "pages_per_token": (c.demand_pages + c.prefetch_pages) / tokens,
            "bytes_per_token": c.bytes_moved / tokens,
            "disk_pages_per_token": c.disk_pages / tokens,
            "disk_bytes_per_token": c.disk_bytes / tokens,
            "cpu_cache_hit_rate": c.cache_hits / travelled if travelled else float("nan"),
            "cpu_cache_bytes": cache_bytes,
            "decode_steps": self.decode_step,
            **{f: getattr(c, f) for f in c.__dataclass_fields__},
            "device_kv_bytes": st.device_kv_bytes,
            "host_kv_bytes": st.host_kv_bytes,
        }

    def stats(self) -> CacheStats:
        kv = total = full = host = frames = 0
        stored = []
        kv_dicts, all_dicts = [], []  # tensors shared by several layers (cross-layer stores) are counted once
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):  # read off the slot table and store: nothing dequantized
                if not layer.is_initialized or layer.store is None:
                    stored.append(0)
                    continue
                b, h = layer.positions.shape[:2]
                itemsize = torch.empty((), dtype=layer.dtype).element_size()
                full += 2 * b * h * layer.held_tokens() * layer.head_dim * itemsize
                kv_dicts.append(layer.kv_tensors())
                all_dicts.append(layer.tensors())
                if isinstance(layer, OffloadLayer):
                    dev, hst = layer.offload_bytes()
                    frames += dev
                    host += hst
                stored.append(layer.n_stored)
                continue
            if not layer.is_initialized or layer.keys is None:
                stored.append(0)
                continue
            # a chunked-attention layer (transformers' own) holds what a full DynamicCache would hold too
            full += _nbytes(layer.keys) + _nbytes(layer.values)
            kv += _nbytes(layer.keys) + _nbytes(layer.values)
            total += _nbytes(layer.keys) + _nbytes(layer.values)
            stored.append(layer.keys.shape[-2])
        kv += sum(_nbytes(t) for t in unique_tensors(kv_dicts))
        total += sum(_nbytes(t) for t in unique_tensors(all_dicts))
        shared = sum(_nbytes(t) for t in unique_tensors(
            {k: t for k, t in d.items() if k.startswith("shared.")} for d in kv_dicts))
        tier = "memory-mapped files on disk" if self.offload_tier == "disk" else "host memory"
        return CacheStats(kv, total, full, self.get_seq_length(), stored, shared, host_kv_bytes=host, host_tier=tier,
                          frame_kv_bytes=frames)
