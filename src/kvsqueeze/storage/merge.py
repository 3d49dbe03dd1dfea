"""Merging evicted entries into kept ones (storage): the plan a merging method returns, and how a store applies it.

A merging method (KVMerger, D2O, EMS) chooses the kept slots with its scores, as every method does, and besides
says where each evicted entry goes: into one kept slot of the same (row, kv head), with a weight. Storage applies
it in one step with the eviction (`CompressedLayer.keep(idx, visible, plan)`):

    K'_j = (w_j K_j + sum_{i -> j} w_i K_i) / (w_j + sum_{i -> j} w_i)        for each kept slot j
    V'_j likewise (with `value_weight` when the values are weighted differently)

where i -> j are the evicted slots the plan sends into j. The kept slot keeps its position (its RoPE'd key is
averaged with the others as the papers do: keys are stored post-RoPE), its slot-aligned method state follows it
(`SlotTable.keep`), and the evicted entries are freed as by any eviction. A kept slot nobody merges into keeps its
entry unchanged (bit for bit); so does one whose weights sum to 0.

    into   : (batch, kv_heads, n) long   for each slot before the eviction, the slot (same row and kv head, same
                                         indexing) it merges into; -1: dropped, not merged. Ignored for kept
                                         slots (they merge into themselves).
    weight : (batch, kv_heads, n) float  >= 0; a kept slot's entry is its own weight w_j, an evicted slot's its
                                         weight w_i in the average of the slot it merges into
    keys, values : bool                  which halves are merged (a paper may merge only the values)
    value_weight : (batch, kv_heads, n) float | None   the values' weights, when they differ from the keys'

A source that is invalid (padding, an empty slot), or whose target is not kept or is kept hidden (a head-wise
budget's empty slot), is dropped. The merge runs in float32 and is cast back to the store's dtype.

Quantized stores merge before the commit: the merged entries become the store's full-precision residual, and
`commit()` quantizes what is kept, once (`quant/base.py`; tokens already quantized are re-quantized from their
dequantized values, as with any later eviction of a quantized store).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .slots import take


@dataclass
class MergePlan:
    """Where each evicted slot of a layer goes (see the module docstring for the fields and the rule).

    Raises ValueError (at `apply`) for fields of the wrong shape or negative / non-finite weights."""

    into: torch.Tensor
    weight: torch.Tensor
    keys: bool = True
    values: bool = True
    value_weight: torch.Tensor | None = None

    def _check(self, shape: tuple[int, int, int]) -> None:
        for name in ("into", "weight", "value_weight"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"MergePlan.{name} must have shape {shape}, got {tuple(t.shape)}")
        for name in ("weight", "value_weight"):
            t = getattr(self, name)
            if t is not None and not bool(torch.isfinite(t).all() and (t >= 0).all()):
                raise ValueError(f"MergePlan.{name} must be finite and >= 0")

    def destinations(self, idx: torch.Tensor, valid: torch.Tensor | None,
                     visible: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(dest, kept): dest (batch, kv_heads, n) long, for each slot the kept index j in [0, k) its entry is
        averaged into (a kept slot: its own), or -1 (dropped); kept (batch, kv_heads, n) bool, the kept slots.
        idx: (batch, kv_heads, k) the kept slots; valid: (batch, kv_heads, n) bool or None; visible:
        (batch, kv_heads, k) bool or None (kept slots that stay visible)."""
        b, h, n = self.into.shape
        k = idx.shape[-1]
        inv = torch.full((b, h, n), -1, dtype=torch.long, device=idx.device)
        inv.scatter_(2, idx, torch.arange(k, device=idx.device).expand(b, h, k))
        kept = inv >= 0
        if visible is not None:  # a kept slot left hidden (a head-wise budget's empty slot) is freed: a source
            shown = torch.ones(b, h, n, dtype=torch.bool, device=idx.device)
            shown.scatter_(2, idx, visible.to(idx.device))
            kept = kept & shown
        into = self.into.to(idx.device).long()
        has = (into >= 0) & (into < n)
        target = into.clamp(0, n - 1)
        dest = inv.gather(2, target).masked_fill(~(has & kept.gather(2, target)), -1)
        dest = torch.where(kept, inv, dest)
        if valid is not None:
            dest = dest.masked_fill(~valid.to(idx.device), -1)
        return dest, kept

    def apply(self, keys: torch.Tensor, values: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor | None = None,
              visible: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept slots' entries after the merge: keys, values (batch, kv_heads, n, d) -> (batch, kv_heads, k, d)
        each (k = idx.shape[-1]), in the order of `idx`."""
        b, h, n = keys.shape[:3]
        self._check((b, h, n))
        dest, kept_slot = self.destinations(idx, valid, visible)
        out = []
        for i, (x, on) in enumerate(((keys, self.keys), (values, self.values))):
            kept = take(x, idx)
            if not on:
                out.append(kept)
                continue
            w = self.weight if i == 0 or self.value_weight is None else self.value_weight
            out.append(weighted_average(x, kept, dest, w, ~kept_slot))
        return out[0], out[1]


def weighted_average(x: torch.Tensor, kept: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor,
                     source: torch.Tensor) -> torch.Tensor:
    """x (b, h, n, d) averaged into the k kept slots: out_j = sum_{dest_i = j} w_i x_i / sum_{dest_i = j} w_i, in
    float32, cast to x's dtype. `source` (b, h, n) bool marks the evicted slots; a kept slot that no source with a
    positive weight merges into, or whose weights sum to 0, keeps `kept` (b, h, k, d) bit for bit."""
    b, h, k, d = kept.shape
    w = weight.to(x.device, torch.float32).masked_fill(dest < 0, 0.0)
    merged_into = torch.zeros(b, h, k, dtype=torch.long, device=x.device)
    merged_into = merged_into.scatter_add_(2, dest.clamp_min(0), (source & (w > 0)).long()) > 0
    j = dest.clamp_min(0)
    num = torch.zeros(b, h, k, d, dtype=torch.float32, device=x.device)
    num.scatter_add_(2, j[..., None].expand(-1, -1, -1, d), w[..., None] * x.float())
    den = torch.zeros(b, h, k, dtype=torch.float32, device=x.device).scatter_add_(2, j, w)
    merged = (num / den.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).to(x.dtype)
    return torch.where(((den > 0) & merged_into)[..., None], merged, kept).contiguous()
