"""The slot table of one layer: per-slot bookkeeping that follows the kept KV entries.

A layer's KV entries are *slots*, laid out per (batch row, kv head) along one axis of length `n`:

    positions : (batch, kv_heads, n) int32        the logical position (token index) of each slot
    valid     : (batch, kv_heads, n) bool | None  False where attention must not see the slot (left padding, a
                                                  slot hidden by a per-row budget, an empty slot of a head that
                                                  keeps fewer tokens than the widest head); None: all valid
    state     : name -> (batch, kv_heads, n, ...)  slot-aligned method state (e.g. H2O's accumulated attention)
    n_pad     : (batch,) long | None               left-padding tokens each row has seen (None: no padding)
    row_state : name -> (batch, ...)                per-row method state not aligned with slots (D2O's EMA
                                                   similarity threshold): follows batch operations, reset with
                                                   the table

Every change of which slots are held goes through `append`, `keep` or `index_batch` (and `reset`), so positions,
validity and state can never fall out of step with the keys and values (`KVStore`) beside them. `version` counts
those changes (decode-time selectors cache per-slot summaries and recompute them when it moves), and `aligned`
says whether the slots are still the contiguous run of the last `n` tokens seen (visibility aside: `valid`
records that); with `valid` None too, transformers' own mask is right (`runtime.attention` builds the layer's own
mask otherwise).
"""

from __future__ import annotations

import torch


class SlotTable:
    """Positions, validity, padding counts and method state of one layer's slots (see the module docstring)."""

    def __init__(self):
        self.positions: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.state: dict[str, torch.Tensor] = {}
        self.n_pad: torch.Tensor | None = None
        self.row_state: dict[str, torch.Tensor] = {}
        self.version = 0
        self.aligned = True

    # --- shape -----------------------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Slots per (row, kv head) (the table's width)."""
        return 0 if self.positions is None else self.positions.shape[-1]

    def init(self, batch: int, kv_heads: int, device) -> None:
        """An empty table for `batch` rows of `kv_heads` heads on `device`."""
        self.positions = torch.empty(batch, kv_heads, 0, dtype=torch.int32, device=device)
        self.valid = None
        self.state = {}
        self.row_state = {}
        self.n_pad = None
        self.aligned = True
        self.version += 1

    # --- changes ---------------------------------------------------------------------------------------------
    def append(self, q: int, start: int) -> None:
        """`q` new slots after the existing ones, at positions start .. start + q - 1 (every row and head), valid,
        with zero method state."""
        b, h = self.positions.shape[:2]
        new_pos = torch.arange(start, start + q, device=self.positions.device, dtype=torch.int32)
        self.positions = torch.cat([self.positions, new_pos.expand(b, h, q)], dim=-1)
        if self.valid is not None:
            self.valid = torch.cat([self.valid, self.valid.new_ones(b, h, q)], dim=-1)
        for name, t in self.state.items():
            self.state[name] = torch.cat([t, t.new_zeros(b, h, q, *t.shape[3:])], dim=2)

    def keep(self, idx: torch.Tensor) -> None:
        """Keep the slots `idx` (batch, kv_heads, k) long, in that order; positions, validity and state follow.
        The table stays `aligned` only when `idx` keeps the last k slots of an aligned table (in any order)."""
        n = self.n
        k = idx.shape[-1]
        if self.aligned:  # the kept set must be the last k slots (their order does not matter to a mask)
            tail = torch.arange(n - k, n, device=idx.device)
            self.aligned = bool((idx.sort(dim=-1).values == tail).all())
        self.positions = take(self.positions, idx)
        if self.valid is not None:
            self.valid = take(self.valid, idx)
        self.state = {name: take(t, idx) for name, t in self.state.items()}
        self.version += 1

    def hide(self, visible: torch.Tensor | None) -> None:
        """Mark the slots where `visible` (batch, kv_heads, n) bool is False invalid (never visible again)."""
        if visible is None or bool(visible.all()):
            return
        self.valid = visible.clone() if self.valid is None else self.valid & visible
        self.version += 1

    def mark_new_invalid(self, new_valid: torch.Tensor) -> torch.Tensor | None:
        """Record which of the last `q` slots (just appended) are real: new_valid (batch, q) bool, False for left
        padding. Returns the (batch,) padding counts added, or None when every new slot is real."""
        if bool(new_valid.all()):
            return None
        b, h, n = self.positions.shape
        if self.valid is None:
            self.valid = torch.ones(b, h, n, dtype=torch.bool, device=self.positions.device)
        self.valid[:, :, n - new_valid.shape[-1]:] &= new_valid[:, None, :].to(self.positions.device)
        pads = (~new_valid).sum(-1).to(self.positions.device, torch.long)
        self.n_pad = pads if self.n_pad is None else self.n_pad + pads
        self.version += 1
        return pads

    def index_batch(self, fn) -> None:
        """Apply a batch operation `fn` (tensor (batch, ...) -> (batch', ...)) to every per-row tensor."""
        if self.positions is None:
            return
        self.positions = fn(self.positions)
        if self.valid is not None:
            self.valid = fn(self.valid)
        self.n_pad = None if self.n_pad is None else fn(self.n_pad)
        self.state = {k: fn(v) for k, v in self.state.items()}
        self.row_state = {k: fn(v) for k, v in self.row_state.items()}
        self.version += 1

    def reset(self) -> None:
        """Forget every slot: a fresh table (`version` back to 0; a selector clears its cached summaries on reset)."""
        self.positions = self.valid = self.n_pad = None
        self.state = {}
        self.row_state = {}
        self.aligned = True
        self.version = 0

    # --- reading ---------------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the table holds (what its memory is)."""
        if self.positions is None:
            return {}
        out = {"positions": self.positions}
        if self.valid is not None:
            out["valid"] = self.valid
        out.update({f"state.{k}": v for k, v in self.state.items()})
        out.update({f"row_state.{k}": v for k, v in self.row_state.items()})
        return out


def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`t` (batch, kv_heads, n, ...) gathered at slot indices `idx` (batch, kv_heads, k) -> (batch, kv_heads, k,
    ...), contiguous (the source can be freed)."""
    b, h, k = idx.shape
    j = idx.view(b, h, k, *([1] * (t.dim() - 3))).expand(b, h, k, *t.shape[3:])
    return t.gather(2, j).contiguous()
