"""The compressed KV cache: one mechanism for storage, positions and masks.

`CompressedCache` is a `transformers.Cache` whose full-attention layers are `CompressedLayer`s. A layer stores
only the KV entries that were kept, as slots:

    keys, values : (batch, kv_heads, n, head_dim)   the kept entries, post-RoPE keys as the model wrote them
    positions    : (batch, kv_heads, n) int32       the logical position of each slot
    valid        : (batch, kv_heads, n) bool | None  False for padding slots (None: all valid)
    n_pad        : (batch,) long | None               left-padding tokens of each row (None: no padding)
    state        : dict name -> (batch, kv_heads, n, ...)  slot-aligned method state (e.g. H2O's scores)

and counts the tokens it has seen (`cumulative_length`). `get_seq_length()` returns that count, so RoPE
positions of new tokens and `generate()`'s bookkeeping never shift after eviction; `get_mask_sizes()` describes
the slots actually stored. Every kv head keeps the same number of slots (so the storage stays one rectangular
tensor and really shrinks); which tokens it keeps may differ per head.

Compression runs after each layer's attention (see `attention.py`): the layer's attention for the current
forward has already used every entry, so the hidden states of that forward are unchanged, and the method only
decides what later tokens will see. The cache asks its `Method` for scores and keeps the top `n_keep` slots.
Sliding-window layers (Mistral, Phi-3, Qwen2 with use_sliding_window, Gemma 2/3's sliding layers) are
`CompressedLayer`s too, with `sliding_window` set: after each forward they drop the tokens no later query can see
(older than the window, as `DynamicSlidingWindowLayer` does), and the method evicts inside the window, to a budget
taken from the `sliding_window - 1` tokens a full cache would hold: the ratio asked is the ratio held.
Chunked-attention layers (Llama 4) keep transformers' own `DynamicSlidingWindowLayer`, uncompressed.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from .errors import KVSqueezeError
from .shapes import attention_shape

# The layer whose `update` ran last, waiting for its attention call (see attention.py). Thread-local so that
# two models in two threads do not mix.
_PENDING = threading.local()


_UNBOUNDED = 1 << 62  # "tokens seen" beyond any real budget (see CompressedCache.budget)


def _in_generate_prefill() -> bool:
    """Whether this forward is run by transformers' `generate()` prefill (its `_prefill`: the last chunk of a
    chunked prefill can be 1 token long, which would otherwise look like a decoding step)."""
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_name == "_prefill" and "generation" in f.f_code.co_filename:
            return True
        f = f.f_back
    return False


# What building a cache does to its model. The runtime (`kvsqueeze.attention`, imported by the package's
# `__init__`) registers `attach` here, so this storage module never imports the runtime.
MODEL_HOOKS: list = []


def pending_layer():
    """Pop the (cache, layer_idx) whose update is waiting for its attention call, or None."""
    item = getattr(_PENDING, "item", None)
    _PENDING.item = None
    return item


class CompressedLayer(DynamicLayer):
    """One full-attention layer's kept KV slots (see the module docstring)."""

    is_sliding = False
    is_croppable = False
    sliding_window: int | None = None  # set (with is_sliding) for a sliding-window attention layer

    def __init__(self, **kwargs):
        super().__init__()
        self.cumulative_length = 0
        self.positions: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.state: dict[str, torch.Tensor] = {}
        self.n_new = 0  # tokens appended by the current forward
        self.n_evicted = 0  # slots ever removed
        self.n_pad: torch.Tensor | None = None  # (batch,) padding tokens seen per row (left padding)
        self.row_keep: torch.Tensor | None = None  # (batch,) per-row budget when rows differ (set by the cache)

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
        self.n_pad = self.row_keep = None
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
        self.n_pad = None if self.n_pad is None else fn(self.n_pad)
        self.row_keep = None if self.row_keep is None else fn(self.row_keep)
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
        """Record which of the tokens just appended are real (new_valid: (batch, n_new) bool).

        Padding is left padding: a row's padding tokens come before its first real token, so the row's own
        position of a slot is `positions - n_pad` (see `row_positions`)."""
        if bool(new_valid.all()):
            return
        b, h, n = self.positions.shape
        if self.valid is None:
            self.valid = torch.ones(b, h, n, dtype=torch.bool, device=self.device)
        self.valid[:, :, n - new_valid.shape[-1] :] &= new_valid[:, None, :].to(self.device)
        pads = (~new_valid).sum(-1).to(self.device, torch.long)
        self.n_pad = pads if self.n_pad is None else self.n_pad + pads

    def row_positions(self) -> torch.Tensor:
        """(batch, kv_heads, n) long: each slot's position within its own row (padding slots are negative)."""
        pos = self.positions.long()
        return pos if self.n_pad is None else pos - self.n_pad[:, None, None]

    def row_seen(self) -> torch.Tensor:
        """(batch,) long: real tokens each row has seen (`cumulative_length` less its padding)."""
        seen = torch.full((self.positions.shape[0],), self.cumulative_length, dtype=torch.long, device=self.device)
        return seen if self.n_pad is None else seen - self.n_pad

    def _keep_index(self, scores: torch.Tensor, n_keep: int, row_keep: torch.Tensor | None = None):
        """The slots to keep: idx (batch, kv_heads, n_keep) in slot order, and which of them stay visible
        ((batch, kv_heads, n_keep) bool, or None when all do).

        Padding slots rank last; ties rank the later slot first (deterministic, and the same for a row batched
        with left padding or alone). With `row_keep` (batch,) (each <= n_keep), row r keeps its own top
        `row_keep[r]` slots; the rest of its n_keep slots are its next-ranked ones (padding first) marked
        invalid, so attention never sees them. Raises ValueError if `scores` is not (batch, kv_heads, n)."""
        b, h, n = self.positions.shape
        if scores.shape != (b, h, n):
            raise ValueError(f"scores must have shape {(b, h, n)}, got {tuple(scores.shape)}")
        scores = scores.float()
        if self.valid is not None:  # padding goes first
            scores = scores.masked_fill(~self.valid, float("-inf"))
        # a stable descending sort of the reversed slots: ties go to the later slot
        order = scores.flip(-1).sort(dim=-1, descending=True, stable=True).indices[..., :n_keep]
        order = n - 1 - order  # (b, h, n_keep), best first
        visible = None
        if row_keep is not None and bool((row_keep.to(order.device) < n_keep).any()):
            rank = torch.arange(n_keep, device=order.device)
            visible = rank[None, None, :] < row_keep.to(order.device)[:, None, None]
        idx, perm = order.sort(dim=-1)  # keep slots in position order
        if visible is not None:
            visible = visible.expand(b, h, n_keep).gather(2, perm)
        return idx, visible

    def evict(self, scores: torch.Tensor, n_keep: int, row_keep: torch.Tensor | None = None):
        """Keep, per (batch, kv head), the `n_keep` slots with the highest scores; free the rest.

        scores: (batch, kv_heads, n_stored). row_keep: (batch,) per-row budgets <= n_keep (left-padded rows
        keep what they keep alone; their extra slots are marked invalid, see `_keep_index`)."""
        b, h, n = self.positions.shape
        if scores.shape != (b, h, n):
            raise ValueError(f"scores must have shape {(b, h, n)}, got {tuple(scores.shape)}")
        if n_keep >= n and row_keep is None:
            return
        n_keep = min(n_keep, n)
        idx, visible = self._keep_index(scores, n_keep, row_keep)

        def take(t):
            j = idx.view(b, h, n_keep, *([1] * (t.dim() - 3))).expand(b, h, n_keep, *t.shape[3:])
            return t.gather(2, j).contiguous()

        self.keys, self.values, self.positions = take(self.keys), take(self.values), take(self.positions)
        if self.valid is not None:
            self.valid = take(self.valid)
        self._hide(visible)
        self.state = {k: take(v) for k, v in self.state.items()}
        self.n_evicted += n - n_keep

    def _hide(self, visible: torch.Tensor | None) -> None:
        """Mark kept slots that are not `visible` (batch, kv_heads, n) invalid."""
        if visible is None:
            return
        self.valid = visible.clone() if self.valid is None else self.valid & visible

    def window_cutoff(self) -> int | None:
        """Lowest position a later query can still attend to (None: full attention)."""
        if not self.sliding_window:
            return None
        return self.cumulative_length - self.sliding_window + 1

    def window_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """`scores` (batch, kv_heads, n) with slots outside the sliding window set to -inf (unchanged otherwise)."""
        cutoff = self.window_cutoff()
        if cutoff is None:
            return scores
        return scores.float().masked_fill(self.positions < cutoff, float("-inf"))

    def held_tokens(self) -> int:
        """Tokens a full (uncompressed) cache layer of this kind holds: every token seen, or the last
        `sliding_window - 1` of them for a sliding layer (`DynamicSlidingWindowLayer`)."""
        if self.sliding_window:
            return min(self.cumulative_length, self.sliding_window - 1)
        return self.cumulative_length

    def drop_outside_window(self) -> None:
        """Free the slots no later query can see (sliding layers). Every kv head keeps the same number of slots,
        so a head with fewer slots inside the window keeps a few outside it; the attention mask hides those
        (`attention._layer_mask`) and the next eviction drops them first (`window_scores`)."""
        cutoff = self.window_cutoff()
        if cutoff is None or not self.is_initialized or self.positions is None or self.positions.shape[-1] == 0:
            return
        inside = self.positions >= cutoff
        if self.valid is not None:
            inside = inside & self.valid
        n_keep = int(inside.sum(-1).max())
        if n_keep >= self.positions.shape[-1]:
            return
        evicted = self.n_evicted
        getattr(self, "drop_slots", self.evict)(self.window_scores(inside.float()), max(n_keep, 1))
        if n_keep == int(inside.sum(-1).min()) and evicted == 0:
            self.n_evicted = 0  # still the contiguous last tokens: transformers' own mask stays right

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


class CompressedCache(Cache):
    """A `transformers.Cache` that keeps only the KV entries a `Method` says matter.

    >>> cache = CompressedCache(model, SnapKV(ratio=0.5))
    >>> model.generate(input_ids, cache=cache, max_new_tokens=20)  # past_key_values= before transformers 5.24

    Phases. Without `with cache.prefill():`, every forward before the first decoding step (a 1-token forward)
    is prefill and is compressed: a prompt run in chunks (`generate(prefill_chunk_size=...)`, or the caller's
    own loop) is compressed after every chunk, so it never holds more than budget + one chunk, and a ratio
    budget follows the tokens seen so far. A 1-token forward that transformers' `generate()` runs as the last
    chunk of its chunked prefill is still prefill. With `with cache.prefill(): ...` the caller says where the
    prefill is: every forward inside a block is compressed, and forwards outside the blocks, after one, are
    appended uncompressed (kvsqueeze's question-agnostic protocol: compress the context, then append the
    question). Decoding steps are compressed when the method sets `decode_every`.

    Building the cache does not switch the model for good: `kvsqueeze.attention.attach` routes the model's
    attention through kvsqueeze only during forwards that use a `CompressedCache`.
    """

    def __init__(self, model, method=None, *, layer_factory=None, selector=None):
        if not MODEL_HOOKS:
            raise KVSqueezeError("kvsqueeze's runtime is not loaded: import kvsqueeze (the package) first")
        for hook in MODEL_HOOKS:  # kvsqueeze.attention.attach: route the model's attention during our forwards
            hook(model)
        config = model.config.get_text_config()
        self.config = config
        layers = []
        for i, kind in enumerate(layer_types_of(config)):
            if kind == "full_attention":
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
        # Decode-time selection (Quest, AttentionPredictor): every stored entry stays, each decoding step attends
        # to the subset `selector.select(...)` returns (see attention.py).
        self.selector = selector
        self.n_layers = len(layers)
        if method is not None:
            check_layer_indices(method.exempt_layers, self.n_layers, "exempt layers")
        if selector is not None:
            check_layer_indices(getattr(selector, "dense_layers", ()), self.n_layers, "dense layers")
        _, self.num_kv_heads, self.head_dim = attention_shape(config)
        self.budgets: dict[int, int] = {}  # per layer, fixed at the end of the prefill; decode keeps them
        self.phase = "prefill"
        self._in_prefill_block = False
        self._prefill_open = True  # forwards outside prefill() blocks are still prefill (see the class docstring)
        self._forwards = 0
        self.decode_step = 0
        if method is not None:
            method.setup(model)
        if selector is not None:
            selector.setup(model)

    # --- phases ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def prefill(self):
        """Compress every forward run inside the block (a context prefilled in chunks); forwards outside the
        block, after it, are appended uncompressed (decoding steps still follow the method's `decode_every`)."""
        self._in_prefill_block = True
        self._prefill_open = False
        try:
            yield self
        finally:
            self._in_prefill_block = False

    def _begin_forward(self, q_len: int):
        if getattr(_PENDING, "item", None) is not None:
            _PENDING.item = None
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
        _PENDING.item = (self, layer_idx)
        return out

    # --- compression, called after each layer's attention ------------------------------------------------
    def budget(self, layer_idx: int) -> int:
        """Slots this layer may keep (an int >= 1), set at the prefill and held during decoding.

        A layer never holds more than it has seen; eviction brings it down to `min(budget, slots stored)`.
        An absolute `budget` (per layer after `layer_budget`, e.g. PyramidKV's) is the target from the start: when
        the prompt is shorter, the layer keeps everything and grows to the budget while decoding, then holds it.
        A `ratio` budget is a share of the prefill's tokens, fixed by the prefill (`n_keep` of the tokens seen).
        A method that keeps every token (`Full`, `ratio=0`) keeps every token while decoding too. A sliding layer
        counts only the tokens its window holds. In a left-padded batch each row's budget comes from its own real
        tokens (`layer.row_keep`, (batch,)); the layer stores the largest of them.
        """
        layer = self.layers[layer_idx]
        if self.phase == "prefill" or layer_idx not in self.budgets:
            self.budgets[layer_idx] = self._keep_target(layer.held_tokens(), layer_idx)
            if isinstance(layer, CompressedLayer) and layer.n_pad is not None:
                cap = layer.sliding_window - 1 if layer.sliding_window else None
                seen = [int(s) if cap is None else min(int(s), cap) for s in layer.row_seen().tolist()]
                rows = [self._keep_target(s, layer_idx) for s in seen]
                layer.row_keep = torch.tensor(rows, dtype=torch.long, device=layer.device)
                self.budgets[layer_idx] = max(rows)
        return self.budgets[layer_idx]

    def _keep_target(self, n_seen: int, layer_idx: int) -> int:
        """The method's keep count after `n_seen` tokens, or its absolute target when that is clamped to `n_seen`."""
        method = self.method
        keep = method.n_keep(n_seen, layer_idx, self.n_layers)
        if keep >= n_seen:  # clamped to what the layer has seen: the target may lie beyond
            target = method.n_keep(_UNBOUNDED, layer_idx, self.n_layers)
            if getattr(method, "budget", None) is not None or target >= _UNBOUNDED:
                keep = max(keep, target)
        return keep

    def after_attention(self, module, layer_idx: int, query: torch.Tensor, scaling: float | None,
                        memo: dict | None = None):
        """Let the method observe this forward and, when due, evict the layer down to its budget."""
        method = self.method
        layer = self.layers[layer_idx]
        if isinstance(layer, CompressedLayer):
            layer.drop_outside_window()
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
                layer.evict(layer.window_scores(method.score(x)), x.n_keep, layer.row_keep)

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
                dst.positions, dst.valid, dst.n_pad = src.positions, src.valid, src.n_pad
                dst.n_new = src.n_new
            dst.cumulative_length = src.cumulative_length
        out._forwards = 1
        out._prefill_open = False  # the question is appended uncompressed, as after a prefill() block
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
        self._prefill_open = not self._in_prefill_block  # as a fresh cache (inside a block: as one that entered it)
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
                full += 2 * b * h * layer.held_tokens() * d * layer.keys.element_size()
            else:  # a sliding window layer holds what a full DynamicCache would hold too
                held = {"keys": layer.keys, "values": layer.values}
                full += _nbytes(layer.keys) + _nbytes(layer.values)
            kv_nbytes = getattr(layer, "kv_nbytes", None)  # packed storage (kvsqueeze.quant) reports its own bytes
            kv += kv_nbytes() if kv_nbytes is not None else _nbytes(held["keys"]) + _nbytes(held["values"])
            total += sum(_nbytes(t) for t in held.values())
            stored.append(layer.keys.shape[-2])
        return CacheStats(kv, total, full, self.get_seq_length(), stored)
