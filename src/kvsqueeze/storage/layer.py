"""A compressed cache layer: the kept KV slots of one attention layer (storage; knows neither methods nor models).

`CompressedLayer` is a `transformers` cache layer (`DynamicLayer`'s interface) made of two parts:

- a slot table (`slots.SlotTable`): per slot its position, validity and slot-aligned method state, per row its
  left-padding count, a `version` counter and the `aligned` flag the attention mask reads;
- a KV store (`stores.KVStore`): the keys and values of those slots, full precision (`DenseStore`) or quantized
  (`kvsqueeze.quant`), behind one protocol (append, view, keep, index_batch, nbytes, offload / prefetch).

    keys, values : (batch, kv_heads, n, head_dim)   the store's view: post-RoPE keys as the model wrote them
    positions    : (batch, kv_heads, n) int32       the logical position of each slot
    valid        : (batch, kv_heads, n) bool | None  False where attention must not look (None: all valid)
    n_pad        : (batch,) long | None               left-padding tokens of each row (None: no padding)
    state        : dict name -> (batch, kv_heads, n, ...)  slot-aligned method state (e.g. H2O's scores)

The layer counts the tokens it has seen (`cumulative_length`); `get_seq_length()` returns that count, so RoPE
positions of new tokens and `generate()`'s bookkeeping never shift after eviction; `get_mask_sizes()` describes
the slots actually stored. `store_factory` selects the store (`kvsqueeze.quant`'s `kivi(2)` etc. are layer
factories passing one). Which slots stay is decided elsewhere (a method's scores, a budget); the layer only
executes it: `evict(scores, n_keep, counts)` keeps the top slots per (row, kv head), where `counts` may give each
row, or each (row, kv head), its own number (head-wise budgets: the store frees the memory of the slots a head
does not keep, `DenseStore` becomes ragged). Sliding-window layers are `CompressedLayer`s with `sliding_window`
set: they drop the tokens no later query can see (`drop_outside_window`) and are compressed inside their window.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ..errors import KVSqueezeError
from .merge import MergePlan
from .slots import SlotTable
from .stores import DenseStore, KVStore


class CompressedLayer(DynamicLayer):
    """One attention layer's kept KV slots: a slot table and a KV store (see the module docstring)."""

    is_sliding = False
    is_croppable = False
    sliding_window: int | None = None  # set (with is_sliding) for a sliding-window attention layer

    def __init__(self, store_factory=None, **kwargs):
        self.table = SlotTable()
        # () -> an empty KVStore (e.g. a quantized store of `kvsqueeze.quant`); None: full precision (`DenseStore`)
        self.store_factory = store_factory
        self.store: KVStore | None = None
        super().__init__()
        self.store = self._new_store()
        self.cumulative_length = 0
        self.n_new = 0  # tokens appended by the current forward
        self.n_evicted = 0  # slots ever removed
        self.n_merged = 0  # evicted entries ever merged into a kept slot (a merging method's plan)
        self.row_keep: torch.Tensor | None = None  # (batch,) per-row budget when rows differ (set by the cache)
        self.row_starts: tuple[list[int], int] | None = None  # (first slot per row, table version): `row_runs`

    # --- the slot table's fields ------------------------------------------------------------------------------
    positions = property(lambda self: self.table.positions, lambda self, t: setattr(self.table, "positions", t))
    valid = property(lambda self: self.table.valid, lambda self, t: setattr(self.table, "valid", t))
    state = property(lambda self: self.table.state, lambda self, t: setattr(self.table, "state", t))
    n_pad = property(lambda self: self.table.n_pad, lambda self, t: setattr(self.table, "n_pad", t))

    # --- the store's view -------------------------------------------------------------------------------------
    def _new_store(self) -> KVStore | None:
        """A fresh, empty store from `store_factory` (None for full precision: made at the first update)."""
        return None if self.store_factory is None else self.store_factory()

    def _kv(self, i: int):
        if self.store is None or not self.is_initialized:
            return None
        return self.store.half(i)

    def _set_kv(self, i: int, t) -> None:
        """Assigning `keys` / `values` replaces every slot's keys (values) with the rectangular tensor `t`."""
        if t is None:
            if i == 1:
                self.store = self._new_store()
            return
        if self.store is None:
            self.store = DenseStore(t, t) if i == 0 else DenseStore(t, t)
        self.store.set_dense(i, t)

    keys = property(lambda self: self._kv(0), lambda self, t: self._set_kv(0, t))
    values = property(lambda self: self._kv(1), lambda self, t: self._set_kv(1, t))

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.head_dim = d
        store = self._new_store()
        if store is None:
            store = DenseStore(key_states.new_empty(b, h, 0, d), value_states.new_empty(b, h, 0, value_states.shape[-1]))
        else:
            store.init(key_states, value_states)
        self.store = store
        self.table.init(b, h, self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.store.append(key_states, value_states)
        self._track_new(key_states.shape[-2])
        return self.store.view()

    def _track_new(self, q: int) -> None:
        """Positions, padding mask and method state for `q` tokens just appended after the stored slots."""
        self.table.append(q, self.cumulative_length)
        self.cumulative_length += q
        self.n_new = q

    def append(self, key_states, value_states) -> None:
        """Store new tokens (batch, kv_heads, q, head_dim) without building the view (for a fused kernel that reads
        the store itself, e.g. `KIVIStore.fused_decode_attention`); `commit()` follows."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.store.append(key_states, value_states)
        self._track_new(key_states.shape[-2])

    def commit(self) -> None:
        """Bring what the layer holds into its stored form: nothing to do for full precision; quantized stores
        (`kvsqueeze.quant`) quantize their residual here. The runtime calls it once per layer and forward, after
        the eviction (`CompressedCache.after_attention`), so only kept tokens are quantized; a layer driven by hand
        calls it after `update`."""
        if self.is_initialized and self.store is not None:
            self.store.commit()

    # --- what HF asks -------------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.n_stored
        return stored + query_length, self.cumulative_length - stored

    def get_max_length(self) -> int:
        return -1

    def offload(self):
        """Move the keys and values held to the CPU (the store's own form: a quantized store stays quantized)."""
        if self.is_initialized and self.store is not None:
            self.store.offload()

    def prefetch(self):
        """Bring the keys and values held back to the layer's device."""
        if self.is_initialized and self.store is not None:
            self.store.prefetch(self.device)

    # --- what a decoding step with a selector reads (an offloaded layer gathers from its device frames) ---------
    def attend_kv(self, idx: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor):
        """The keys and values a one-token step attends to: `keys`, `values` (batch, kv_heads, n, head_dim), what
        `update` returned, at the slots `idx` (batch, kv_heads, k), or whole when idx is None."""
        if idx is None:
            return keys, values
        return (keys.gather(2, idx[..., None].expand(*idx.shape, keys.shape[-1])),
                values.gather(2, idx[..., None].expand(*idx.shape, values.shape[-1])))

    def key_slots(self, lo: int, hi: int) -> torch.Tensor:
        """Keys (batch, kv_heads, hi - lo, head_dim) of slots lo .. hi - 1, as `keys` shows them (a selector's
        per-page summaries read a few pages; an offloaded quantized layer dequantizes only those)."""
        return self.keys[:, :, lo:hi]

    def selected_keys(self, idx: torch.Tensor) -> torch.Tensor:
        """Keys (batch, kv_heads, k, head_dim) of the slots `idx` (batch, kv_heads, k) (a selector's sparse row)."""
        keys = self.keys
        return keys.gather(2, idx[..., None].expand(*idx.shape, keys.shape[-1]))

    def end_attention(self, selector=None, layer_idx: int | None = None, decoding: bool = False) -> None:
        """The attention call of this forward on this layer is over (the attention wrapper calls it for every
        layer, after the cache's `after_attention`): `selector` is the cache's decode-time selector (or None),
        `layer_idx` this layer's index, `decoding` whether the forward was a one-token decoding step. A layer
        whose slots are all on the compute device has nothing to do; an offloaded layer (`OffloadLayer`) copies
        the next step's pages ahead and releases its transient device copy."""

    def reset(self):
        self.store = self._new_store()
        self.is_initialized = False
        self.cumulative_length = 0
        self.table.reset()
        self.row_keep = None
        self.row_starts = None
        self.n_new = self.n_evicted = self.n_merged = 0

    def crop(self, tokens_to_remove: int):
        raise KVSqueezeError("a compressed cache cannot be cropped (evicted tokens cannot be restored)")

    def _index_batch(self, fn):
        if not self.is_initialized:
            return
        self.store.index_batch(fn)
        self.table.index_batch(fn)
        self.row_keep = None if self.row_keep is None else fn(self.row_keep)

    def reorder_cache(self, beam_idx):
        self._index_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._index_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        # the indices may come from another device than this layer's (a model split by device_map)
        self._index_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    # --- what kvsqueeze adds ------------------------------------------------------------------------
    @property
    def n_stored(self) -> int:
        """Slots per (row, kv head): the table's width (a head keeping fewer holds empty, invalid slots)."""
        return self.table.n

    @property
    def version(self) -> int:
        """Counts the changes of which slots are held (selectors recompute their per-slot summaries on a change)."""
        return self.table.version

    @property
    def aligned(self) -> bool:
        """Whether the slots are the contiguous last `n_stored` tokens seen, none hidden: transformers' own mask
        is then right for this layer."""
        return self.table.aligned and self.table.valid is None

    def held_counts(self) -> torch.Tensor:
        """(batch, kv_heads) long: the entries each (row, kv head) holds (valid slots)."""
        b, h, n = self.positions.shape
        if self.valid is None:
            return torch.full((b, h), n, dtype=torch.long, device=self.positions.device)
        return self.valid.sum(-1)

    def kv_nbytes(self) -> int:
        """Bytes of keys and values really held (the store's tensors; a ragged store: the sum over heads)."""
        return 0 if self.store is None else self.store.nbytes()

    def kv_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor that encodes keys and values."""
        return {} if self.store is None else self.store.tensors()

    def mark_invalid(self, new_valid: torch.Tensor):
        """Record which of the tokens just appended are real (new_valid: (batch, n_new) bool).

        Padding is left padding: a row's padding tokens come before its first real token, so the row's own
        position of a slot is `positions - n_pad` (see `row_positions`)."""
        self.table.mark_new_invalid(new_valid)

    def row_positions(self) -> torch.Tensor:
        """(batch, kv_heads, n) long: each slot's position within its own row (padding slots are negative)."""
        pos = self.positions.long()
        return pos if self.n_pad is None else pos - self.n_pad[:, None, None]

    def row_seen(self) -> torch.Tensor:
        """(batch,) long: real tokens each row has seen (`cumulative_length` less its padding)."""
        seen = torch.full((self.positions.shape[0],), self.cumulative_length, dtype=torch.long, device=self.device)
        return seen if self.n_pad is None else seen - self.n_pad

    def _keep_index(self, scores: torch.Tensor, n_keep: int, counts: torch.Tensor | None = None):
        """The slots to keep: idx (batch, kv_heads, n_keep) in slot order, and which of them stay visible
        ((batch, kv_heads, n_keep) bool, or None when all do).

        Invalid slots (padding) rank last; ties rank the later slot first (deterministic, and the same for a row
        batched with left padding or alone). With `counts` ((batch,) per row, or (batch, kv_heads) per head; each
        <= n_keep) a row / head keeps its own top `counts` slots visible; the rest of its n_keep slots are its
        next-ranked ones (padding first), marked invalid, so attention never sees them. Raises ValueError if
        `scores` is not (batch, kv_heads, n)."""
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
        if counts is not None:
            c = counts.to(order.device)
            c = c[:, None, None] if c.dim() == 1 else c[:, :, None]
            if bool((c < n_keep).any()):
                rank = torch.arange(n_keep, device=order.device)
                visible = (rank[None, None, :] < c).expand(b, h, n_keep)
        idx, perm = order.sort(dim=-1)  # keep slots in position order
        if visible is not None:
            visible = visible.gather(2, perm)
        return idx, visible

    def keep(self, idx: torch.Tensor, visible: torch.Tensor | None = None, plan: MergePlan | None = None) -> None:
        """Keep slots `idx` (batch, kv_heads, k), in that order, and free the others; the kept slots where
        `visible` (batch, kv_heads, k) is False become empty (invalid, their entries freed when the store is
        ragged-capable, else only hidden). With a `plan` (`storage.merge.MergePlan`, indexed by the slots before
        this call) the evicted entries it names are first averaged into the kept slots it names (positions and
        slot-aligned state of the kept slots unchanged; the evicted entries freed as without a plan)."""
        n = self.n_stored
        held = visible if (visible is not None and self.store is not None and self.store.ragged_heads) else None
        if plan is None:
            self.store.keep(idx, held)
        else:
            valid, cutoff = self.valid, self.window_cutoff()
            if cutoff is not None:  # a sliding layer's entries no later query can see are never merged in
                valid = (self.positions >= cutoff) if valid is None else valid & (self.positions >= cutoff)
            keys, values = self.store.view()
            k, v = plan.apply(keys, values, idx, valid, visible)
            self.store.keep_merged(idx, k, v, held)
            dest, kept = plan.destinations(idx, valid, visible)
            self.n_merged += int(((dest >= 0) & ~kept).sum())
        self.table.keep(idx)
        self.table.hide(visible)
        self.n_evicted += n - idx.shape[-1]

    def evict(self, scores: torch.Tensor, n_keep: int, counts: torch.Tensor | None = None, merge=None,
              reorder: bool = False):
        """Keep, per (row, kv head), the `n_keep` slots with the highest scores; free the rest.

        scores: (batch, kv_heads, n_stored). counts: (batch,) per-row budgets or (batch, kv_heads) per-head
        budgets, each <= n_keep (left-padded rows keep what they keep alone; head-wise budgets keep each head's
        own top; the extra slots become empty, see `_keep_index`). merge: None, or a function (idx, visible) ->
        `MergePlan` | None called with the slots chosen (a merging method's plan, see `keep`). reorder: the kept
        slots may leave position order where the store holds them more cheaply so (a quantized store's whole
        groups first, `QuantStore.keep_order`); only for callers whose rules read positions, not slot order
        (without a merge plan; not for slot-adjacency rules or page-wise selectors)."""
        b, h, n = self.positions.shape
        if scores.shape != (b, h, n):
            raise ValueError(f"scores must have shape {(b, h, n)}, got {tuple(scores.shape)}")
        if n_keep >= n and counts is None:
            return
        n_keep = min(n_keep, n)
        idx, visible = self._keep_index(scores, n_keep, counts)
        order = getattr(self.store, "keep_order", None)
        if reorder and merge is None and order is not None:
            idx, visible = order(idx, visible)
        self.keep(idx, visible, None if merge is None else merge(idx, visible))

    def split(self, scores: torch.Tensor, n_keep: int, counts: torch.Tensor | None = None) -> None:
        """Mixed-precision stores (`kvsqueeze.quant.MixedPrecisionStore`): instead of evicting, store the top
        `n_keep` slots per (row, kv head) at high precision and the others at low precision; nothing is freed.

        The store does the split (`store.split`, which returns the new slot order, (batch, kv_heads, n) long) and
        the slot table follows. scores: (batch, kv_heads, n_stored); counts: (batch,) per-row budgets of a
        left-padded batch. Raises ValueError for scores of another shape, TypeError for a store that cannot split."""
        b, h, n = self.positions.shape
        if scores.shape != (b, h, n):
            raise ValueError(f"scores must have shape {(b, h, n)}, got {tuple(scores.shape)}")
        split = getattr(self.store, "split", None)
        if split is None:
            raise TypeError(f"{type(self.store).__name__} has no mixed-precision split")
        order = split(scores, n_keep, self.table.valid, counts)
        self.table.keep(order)

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
        """Free the slots no later query can see (sliding layers). With a ragged-capable store each kv head keeps
        exactly its slots inside the window; otherwise every head keeps as many slots as the head with the most
        inside, a few outside it, which the attention mask hides (`attention._layer_mask`) and the next eviction
        drops first (`window_scores`)."""
        cutoff = self.window_cutoff()
        if cutoff is None or not self.is_initialized or self.positions is None or self.positions.shape[-1] == 0:
            return
        inside = self.positions >= cutoff
        if self.valid is not None:
            inside = inside & self.valid
        per_head = inside.sum(-1)
        n_keep = int(per_head.max())
        if n_keep >= self.positions.shape[-1]:
            return
        scores = self.window_scores(inside.float())
        if self.store is not None and self.store.ragged_heads and int(per_head.min()) < n_keep:
            self.evict(scores, max(n_keep, 1), per_head.clamp_min(0))
        else:
            self.evict(scores, max(n_keep, 1))

    def stack_rows(self, rows: list["CompressedLayer"], room: int = 0) -> None:
        """Hold the layers `rows` (full-precision, batch 1 each, the same tokens seen) as the rows of one batch:
        shorter rows are padded in front with empty, invalid slots to the longest (right-aligned, see
        `DenseStore.stacked`), and `room` free slots are reserved after them (appends then write in place, see
        `DenseStore.reserve`). Replaces what this layer held. When every source row holds all its slots visible,
        `row_starts` records where each row's own slots begin (see `row_runs`)."""
        n = max(r.n_stored for r in rows)
        k0 = rows[0].keys
        self.lazy_initialization(k0, rows[0].values)
        self.store = DenseStore.stacked([r.store for r in rows], n, room)
        b, h = len(rows), k0.shape[1]
        pos = torch.zeros(b, h, n, dtype=rows[0].positions.dtype, device=self.device)
        valid = torch.zeros(b, h, n, dtype=torch.bool, device=self.device)
        for i, r in enumerate(rows):
            m = r.n_stored
            pos[i, :, n - m :] = r.positions[0]
            valid[i, :, n - m :] = True if r.valid is None else r.valid[0]
        self.table.positions, self.table.valid = pos, valid
        self.table.aligned = False
        self.table.version += 1
        self.cumulative_length = rows[0].cumulative_length
        self.row_starts = None
        if all(r.valid is None for r in rows) and not self.sliding_window:
            self.row_starts = ([n - r.n_stored for r in rows], self.table.version)

    def row_runs(self) -> list[int] | None:
        """Where each row's visible slots begin, when every row's visible slots are one contiguous run up to the
        last slot (a right-aligned stack of rows, `stack_rows`, with tokens appended after it: row i sees exactly
        slots `row_runs()[i]` .. n_stored - 1); None otherwise (any later change of which slots are held, e.g. an
        eviction, padding marked in appended tokens or a batch operation, ends it). The attention wrapper then
        attends row by row to each row's run alone, without reading the padding (`runtime.attention`)."""
        rs = self.row_starts
        if rs is None or rs[1] != self.table.version:
            return None
        return rs[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this layer holds (what its memory is): the store's and the slot table's."""
        if not self.is_initialized:
            return {}
        return {**self.kv_tensors(), **self.table.tensors()}
