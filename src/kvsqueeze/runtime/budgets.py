"""Budgets: how many slots each layer, row and kv head of a cache keeps (per-request state of the runtime).

One object per cache (`CompressedCache.budgets`), reset with it. It allocates, for a layer due for compression:

- **uniform**: the method's `n_keep(tokens seen)` per layer (`compression_ratio`: kvpress's
  `int(n * (1 - compression_ratio))`; or an absolute `budget`), the same for every kv head;
- **per layer**: the method's `layer_budget` redistributes it over depth (PyramidKV's pyramid);
- **per row**: in a left-padded batch each row's budget comes from its own real tokens (`row_keep`, (batch,)); a
  method with `per_row_budgets` (D2O: layer budgets from each row's attention) gets the row too;
- **per kv head**: a method with `head_counts(scores, keep, visible)` (AdaKV) splits a layer's budget across its kv
  heads; each head keeps its own count and the store frees the rest (`CompressedLayer.evict(..., counts)`).

A layer's budget is fixed at the prefill and held while decoding. An absolute `budget` larger than the prompt is a
target: the layer keeps everything and grows to it while decoding, then holds it.
"""

from __future__ import annotations

import torch

_UNBOUNDED = 1 << 62  # "tokens seen" beyond any real budget


class Budgets:
    """The budgets of one cache's layers (see the module docstring). `per_layer[layer_idx]` is the slots per kv
    head a layer keeps (the largest row's in a padded batch)."""

    def __init__(self, method, n_layers: int):
        self.method = method
        self.n_layers = n_layers
        self.per_layer: dict[int, int] = {}

    def reset(self) -> None:
        """Forget every budget (a fresh request)."""
        self.per_layer = {}

    def layer(self, layer_idx: int, layer, phase: str) -> int:
        """Slots `layer` may keep per kv head (an int >= 1): set at the prefill (and whenever none is set yet),
        held afterwards. Sets `layer.row_keep` ((batch,) long) in a left-padded batch."""
        if phase == "prefill" or layer_idx not in self.per_layer:
            self.per_layer[layer_idx] = self.keep_target(layer.held_tokens(), layer_idx)
            per_row = getattr(self.method, "per_row_budgets", False)  # budgets from each row's own data (D2O)
            if getattr(layer, "n_pad", None) is not None or per_row:
                cap = layer.sliding_window - 1 if layer.sliding_window else None
                seen = [int(s) if cap is None else min(int(s), cap) for s in layer.row_seen().tolist()]
                rows = [self.keep_target(s, layer_idx, r if per_row else None) for r, s in enumerate(seen)]
                layer.row_keep = torch.tensor(rows, dtype=torch.long, device=layer.device)
                self.per_layer[layer_idx] = max(rows)
        return self.per_layer[layer_idx]

    def keep_target(self, n_seen: int, layer_idx: int, row: int | None = None) -> int:
        """The method's keep count after `n_seen` tokens, or its absolute target when that is clamped to `n_seen`.
        `row`: the batch row, passed to a method whose budgets depend on each row's data (`per_row_budgets`)."""
        method = self.method
        at = {} if row is None else {"row": row}
        keep = method.n_keep(n_seen, layer_idx, self.n_layers, **at)
        if keep >= n_seen:  # clamped to what the layer has seen: the target may lie beyond
            target = method.n_keep(_UNBOUNDED, layer_idx, self.n_layers, **at)
            if getattr(method, "budget", None) is not None or target >= _UNBOUNDED:
                keep = max(keep, target)
        return keep

    def due(self, layer, n_keep: int) -> bool:
        """Whether `layer` holds more than its budget: more than `n_keep` slots per kv head, or, in a left-padded
        batch, a row with more visible slots than its own budget (`layer.row_keep`) in some kv head (the layer's
        budget is the largest row's, so after a prefill chunk that was mostly padding for a row, that row can be
        over its own while the layer is within)."""
        if layer.n_stored > n_keep:
            return True
        row_keep = getattr(layer, "row_keep", None)
        if row_keep is None:
            return False
        return bool((layer.held_counts() > row_keep.to(layer.device)[:, None]).any())

    def counts(self, layer, scores: torch.Tensor, n_keep: int) -> tuple[int, torch.Tensor | None]:
        """(slots kept per kv head at most, counts) for evicting `layer` with `scores` (batch, kv_heads, n): counts
        is None (uniform), (batch,) per row, or (batch, kv_heads) per head (a method with `head_counts`)."""
        counts = layer.row_keep
        head_counts = getattr(self.method, "head_counts", None)
        if head_counts is None:
            return n_keep, counts
        keep = counts if counts is not None else torch.full(
            (scores.shape[0],), n_keep, dtype=torch.long, device=scores.device)
        visible = scores.float() > float("-inf")  # -inf: invalid, or outside a sliding window
        if layer.valid is not None:
            visible = visible & layer.valid
        counts = head_counts(scores, keep, visible)
        return max(1, int(counts.max())), counts
