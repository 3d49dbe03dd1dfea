"""A compressed cache layer: the kept KV slots of one attention layer (storage; knows neither methods nor models).

`CompressedLayer` is a `transformers` cache layer (`DynamicLayer`) that stores only the KV entries that were kept,
as slots:

    keys, values : (batch, kv_heads, n, head_dim)   the kept entries, post-RoPE keys as the model wrote them
    positions    : (batch, kv_heads, n) int32       the logical position of each slot
    valid        : (batch, kv_heads, n) bool | None  False for padding slots (None: all valid)
    n_pad        : (batch,) long | None               left-padding tokens of each row (None: no padding)
    state        : dict name -> (batch, kv_heads, n, ...)  slot-aligned method state (e.g. H2O's scores)

and counts the tokens it has seen (`cumulative_length`). `get_seq_length()` returns that count, so RoPE
positions of new tokens and `generate()`'s bookkeeping never shift after eviction; `get_mask_sizes()` describes
the slots actually stored. Sliding-window layers are `CompressedLayer`s with `sliding_window` set: they drop the
tokens no later query can see (`drop_outside_window`) and are compressed inside their window.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ..errors import KVSqueezeError


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
