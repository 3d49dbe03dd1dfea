"""The compressed KV cache: one mechanism for storage, positions and masks.

`CompressedCache` is a `transformers.Cache` whose full-attention layers are `CompressedLayer`s. A layer stores
only the KV entries that were kept, as slots:

    keys, values : (batch, kv_heads, n, head_dim)   the kept entries, post-RoPE keys as the model wrote them
    positions    : (batch, kv_heads, n) int32       the logical position of each slot
    valid        : (batch, kv_heads, n) bool | None  False for padding slots (None: all valid)
    state        : dict name -> (batch, kv_heads, n, ...)  slot-aligned method state (e.g. H2O's scores)

and counts the tokens it has seen (`cumulative_length`). `get_seq_length()` returns that count, so RoPE
positions of new tokens and `generate()`'s bookkeeping never shift after eviction; `get_mask_sizes()` describes
the slots actually stored. Every kv head keeps the same number of slots (so the storage stays one rectangular
tensor and really shrinks); which tokens it keeps may differ per head.

Compression runs after each layer's attention (see `attention.py`): the layer's attention for the current
forward has already used every entry, so the hidden states of that forward are unchanged, and the method only
decides what later tokens will see. The cache asks its `Method` for scores and keeps the top `n_keep` slots.
Sliding-window layers (Gemma 3) keep transformers' own `DynamicSlidingWindowLayer`: they are already bounded.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from .errors import KVSqueezeError

# The layer whose `update` ran last, waiting for its attention call (see attention.py). Thread-local so that
# two models in two threads do not mix.
_PENDING = threading.local()


_UNBOUNDED = 1 << 62  # "tokens seen" beyond any real budget (see CompressedCache.budget)


def pending_layer():
    """Pop the (cache, layer_idx) whose update is waiting for its attention call, or None."""
    item = getattr(_PENDING, "item", None)
    _PENDING.item = None
    return item


class CompressedLayer(DynamicLayer):
    """One full-attention layer's kept KV slots (see the module docstring)."""

    is_sliding = False
    is_croppable = False

    def __init__(self, **kwargs):
        super().__init__()
        self.cumulative_length = 0
        self.positions: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.state: dict[str, torch.Tensor] = {}
        self.n_new = 0  # tokens appended by the current forward
        self.n_evicted = 0  # slots ever removed

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        b, h = key_states.shape[:2]
        self.positions = torch.empty(b, h, 0, dtype=torch.int32, device=self.device)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self._track_new(key_states.shape[-2])
        return self.keys, self.values

    def _track_new(self, q: int) -> None:
        """Positions, padding mask and method state for `q` tokens just appended after the stored slots."""
        b, h = self.positions.shape[:2]
        new_pos = torch.arange(self.cumulative_length, self.cumulative_length + q, device=self.device, dtype=torch.int32)
        self.positions = torch.cat([self.positions, new_pos.expand(b, h, q)], dim=-1)
        if self.valid is not None:
            self.valid = torch.cat([self.valid, self.valid.new_ones(b, h, q)], dim=-1)
        for name, t in self.state.items():
            self.state[name] = torch.cat([t, t.new_zeros(b, h, q, *t.shape[3:])], dim=2)
        self.cumulative_length += q
        self.n_new = q

    def commit(self) -> None:
        """Bring what the layer holds into its stored form: nothing to do for full precision; quantized layers
        (`kvsqueeze.quant`) compress their residual here."""

    # --- what HF asks -------------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.n_stored
        return stored + query_length, self.cumulative_length - stored

    def get_max_length(self) -> int:
        return -1

    def reset(self):
        super().reset()
        # transformers 5.17 (no DynamicLayer.reset) zeroes keys/values in place, the layer left initialized: drop them
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length = 0
        self.positions = self.valid = None
        self.state = {}
        self.n_new = self.n_evicted = 0

    def crop(self, tokens_to_remove: int):
        raise KVSqueezeError("a compressed cache cannot be cropped (evicted tokens cannot be restored)")

    def _index_batch(self, fn):
        if not self.is_initialized:
            return
        self.keys, self.values, self.positions = fn(self.keys), fn(self.values), fn(self.positions)
        if self.valid is not None:
            self.valid = fn(self.valid)
        self.state = {k: fn(v) for k, v in self.state.items()}

    def reorder_cache(self, beam_idx):
        self._index_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._index_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        self._index_batch(lambda t: t[indices])

    # --- what kvsqueeze adds ------------------------------------------------------------------------
    @property
    def n_stored(self) -> int:
        return 0 if self.keys is None or self.keys.dim() < 3 else self.keys.shape[-2]

    def mark_invalid(self, new_valid: torch.Tensor):
        """Record which of the tokens just appended are real (new_valid: (batch, n_new) bool)."""
        if bool(new_valid.all()):
            return
        b, h, n = self.positions.shape
        if self.valid is None:
            self.valid = torch.ones(b, h, n, dtype=torch.bool, device=self.device)
        self.valid[:, :, n - new_valid.shape[-1] :] &= new_valid[:, None, :].to(self.device)

    def evict(self, scores: torch.Tensor, n_keep: int):
        """Keep, per (batch, kv head), the `n_keep` slots with the highest scores; free the rest."""
        b, h, n = self.positions.shape
        if scores.shape != (b, h, n):
            raise ValueError(f"scores must have shape {(b, h, n)}, got {tuple(scores.shape)}")
        if n_keep >= n:
            return
        scores = scores.float()
        if self.valid is not None:  # padding goes first
            scores = scores.masked_fill(~self.valid, float("-inf"))
        idx = scores.topk(n_keep, dim=-1).indices.sort(dim=-1).values  # keep slots in position order

        def take(t):
            j = idx.view(b, h, n_keep, *([1] * (t.dim() - 3))).expand(b, h, n_keep, *t.shape[3:])
            return t.gather(2, j).contiguous()

        self.keys, self.values, self.positions = take(self.keys), take(self.values), take(self.positions)
        if self.valid is not None:
            self.valid = take(self.valid)
        self.state = {k: take(v) for k, v in self.state.items()}
        self.n_evicted += n - n_keep

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this layer holds (what its memory is)."""
        if not self.is_initialized:
            return {}
        out = {"keys": self.keys, "values": self.values, "positions": self.positions}
        if self.valid is not None:
            out["valid"] = self.valid
        out.update({f"state.{k}": v for k, v in self.state.items()})
        return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class CacheStats:
    """Memory held by a cache, against what a full (uncompressed) cache would hold."""

    kv_bytes: int  # keys + values really stored
    total_bytes: int  # every tensor the cache holds (kv + positions + method state)
    full_kv_bytes: int  # keys + values a DynamicCache would hold for the same tokens
    tokens_seen: int
    tokens_stored: list[int] = field(default_factory=list)  # per layer

    @property
    def ratio(self) -> float:
        """Fraction of the full cache's KV bytes that is held."""
        return self.kv_bytes / self.full_kv_bytes if self.full_kv_bytes else 1.0

    def line(self) -> str:
        mib = 1024**2
        return (
            f"KV memory: {self.kv_bytes / mib:.2f} MiB kept of {self.full_kv_bytes / mib:.2f} MiB full "
            f"({100 * self.ratio:.1f}%, {1 / max(self.ratio, 1e-9):.2f}x smaller); "
            f"all cache tensors {self.total_bytes / mib:.2f} MiB; {self.tokens_seen} tokens seen"
        )


def layer_types_of(config) -> list[str]:
    """The attention type of each layer ('full_attention', 'sliding_attention', ...)."""
    types = getattr(config, "layer_types", None)
    if types is None:
        sliding = getattr(config, "sliding_window", None)
        types = ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers
    return list(types)


class CompressedCache(Cache):
    """A `transformers.Cache` that keeps only the KV entries a `Method` says matter.

    >>> cache = CompressedCache(model, SnapKV(ratio=0.5))
    >>> model.generate(input_ids, past_key_values=cache, max_new_tokens=20)

    By default the first forward (the prefill) is compressed; `with cache.prefill(): ...` compresses every
    forward inside the block instead (chunked prefill of a long context, then questions appended after it).
    Decoding steps are compressed when the method sets `decode_every`.
    """

    def __init__(self, model, method=None, *, layer_factory=None, selector=None):
        from .attention import patch  # circular: attention imports this module

        patch(model)
        config = model.config.get_text_config()
        self.config = config
        layers = []
        for i, kind in enumerate(layer_types_of(config)):
            if kind == "full_attention":
                layers.append((layer_factory or CompressedLayer)())
            elif kind in ("sliding_attention", "chunked_attention"):
                window = config.sliding_window if kind == "sliding_attention" else config.attention_chunk_size
                layers.append(DynamicSlidingWindowLayer(sliding_window=window))
            else:
                raise KVSqueezeError(f"layer {i} is of type {kind!r}, which kvsqueeze's cache does not support")
        super().__init__(layers=layers)
        self.method = method
        # Decode-time selection (Quest, AttentionPredictor): every stored entry stays, each decoding step attends
        # to the subset `selector.select(...)` returns (see attention.py).
        self.selector = selector
        self.n_layers = len(layers)
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.budgets: dict[int, int] = {}  # per layer, fixed at the end of the prefill; decode keeps them
        self.phase = "prefill"
        self._in_prefill_block = False
        self._forwards = 0
        self.decode_step = 0
        if method is not None:
            method.setup(model)
        if selector is not None:
            selector.setup(model)

    # --- phases ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def prefill(self):
        """Compress every forward run inside the block (a context prefilled in chunks)."""
        self._in_prefill_block = True
        try:
            yield self
        finally:
            self._in_prefill_block = False

    def _begin_forward(self, q_len: int):
        if getattr(_PENDING, "item", None) is not None:
            _PENDING.item = None
            raise KVSqueezeError(
                "the model's attention is not routed through kvsqueeze; build the cache with "
                "CompressedCache(model, ...) or call kvsqueeze.patch(model) first"
            )
        if self._in_prefill_block or (self._forwards == 0 and not self._was_prefilled()):
            self.phase = "prefill"
        elif q_len == 1:
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
        _PENDING.item = (self, layer_idx)
        return out

    # --- compression, called after each layer's attention ------------------------------------------------
    def budget(self, layer_idx: int) -> int:
        """Slots this layer may keep (an int >= 1), set at the prefill and held during decoding.

        A layer never holds more than it has seen; eviction brings it down to `min(budget, slots stored)`.
        An absolute `budget` (per layer after `layer_budget`, e.g. PyramidKV's) is the target from the start: when
        the prompt is shorter, the layer keeps everything and grows to the budget while decoding, then holds it.
        A `ratio` budget is a share of the prefill's tokens, fixed by the prefill (`n_keep` of the tokens seen).
        A method that keeps every token (`Full`, `ratio=0`) keeps every token while decoding too.
        """
        layer = self.layers[layer_idx]
        if self.phase == "prefill" or layer_idx not in self.budgets:
            method, n = self.method, layer.cumulative_length
            keep = method.n_keep(n, layer_idx, self.n_layers)
            if keep >= n:  # clamped to what the layer has seen: the target may lie beyond
                target = method.n_keep(_UNBOUNDED, layer_idx, self.n_layers)
                if getattr(method, "budget", None) is not None or target >= _UNBOUNDED:
                    keep = max(keep, target)
            self.budgets[layer_idx] = keep
        return self.budgets[layer_idx]

    def after_attention(self, module, layer_idx: int, query: torch.Tensor, scaling: float | None,
                        memo: dict | None = None):
        """Let the method observe this forward and, when due, evict the layer down to its budget."""
        method = self.method
        layer = self.layers[layer_idx]
        if method is None or not isinstance(layer, CompressedLayer) or layer_idx in method.exempt_layers:
            return
        every = method.decode_every
        compress = self.phase == "prefill" or (every > 0 and self.decode_step % every == 0)
        if not (compress or method.stateful):
            return
        from .methods.base import ScoreInputs

        x = ScoreInputs(
            layer=layer,
            layer_idx=layer_idx,
            n_layers=self.n_layers,
            queries=query,
            scaling=scaling if scaling is not None else query.shape[-1] ** -0.5,
            softcap=getattr(self.config, "attn_logit_softcapping", None),
            n_keep=0,
            memo=memo,
        )
        if method.stateful:
            method.observe(x)
        if compress:
            x.n_keep = self.budget(layer_idx)
            if layer.n_stored > x.n_keep:
                layer.evict(method.score(x), x.n_keep)

    def compressed_copy(self, model, method, queries: dict[int, torch.Tensor], scaling: dict[int, float],
                        memo: dict | None = None, layer_factory=None):
        """A new cache holding this (uncompressed, single-forward prefill) cache compressed by `method`.

        Scoring after each layer's attention does not change the prefill's hidden states, so the keys and
        queries recorded by one full prefill give every method exactly what it would have seen: one prefill
        serves a whole sweep of methods and ratios. Tensors are shared until eviction replaces them. `memo`
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
                if src.n_evicted or src.state:
                    raise ValueError("compressed_copy needs an uncompressed source cache")
                dst.positions, dst.valid = src.positions, src.valid
                dst.n_new = src.n_new
            dst.cumulative_length = src.cumulative_length
        out._forwards = 1
        out.phase = "prefill"
        for i, layer in enumerate(out.layers):
            if isinstance(layer, CompressedLayer) and layer.is_initialized:
                out.after_attention(None, i, queries[i], scaling.get(i), memo)
                layer.commit()
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
        self.budgets = {}
        self.phase = "prefill"
        self._forwards = 0
        self.decode_step = 0
        if getattr(_PENDING, "item", None) is not None and _PENDING.item[0] is self:
            _PENDING.item = None
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
    def stats(self) -> CacheStats:
        kv = total = full = 0
        stored = []
        for layer in self.layers:
            if not layer.is_initialized or layer.keys is None:
                stored.append(0)
                continue
            if isinstance(layer, CompressedLayer):
                held = layer.tensors()
                b, h, _, d = layer.keys.shape
                full += 2 * b * h * layer.cumulative_length * d * layer.keys.element_size()
            else:  # a sliding window layer holds what a full DynamicCache would hold too
                held = {"keys": layer.keys, "values": layer.values}
                full += _nbytes(layer.keys) + _nbytes(layer.values)
            kv_nbytes = getattr(layer, "kv_nbytes", None)  # packed storage (kvsqueeze.quant) reports its own bytes
            kv += kv_nbytes() if kv_nbytes is not None else _nbytes(held["keys"]) + _nbytes(held["values"])
            total += sum(_nbytes(t) for t in held.values())
            stored.append(layer.keys.shape[-2])
        return CacheStats(kv, total, full, self.get_seq_length(), stored)
