"""Device page frames for the offloaded layers of a static cache: only the pages a step lacks cross the host link.

The static decode step keeps an offloaded layer's slots in mapped host memory (`storage/static.py`,
`storage/mapped.py`) and its selector (Quest, AttentionPredictor) picks K pages per (row, kv head) and step. Read
in place, every step reads all K pages over the link, though consecutive steps pick mostly the same pages. Here
each offloaded layer also holds F >= K page frames on the device (F = K by default), in fixed buffers, and a page
table on the device (the same words as the eager `storage/offload.py`):

    keys[l], values[l] : (b, kv_heads, F * page, d)   device frames of offloaded layer l (frame f = slots
                                                      [f * page, (f + 1) * page))
    frame_page         : (layers, b, kv_heads, F) long  the page each frame holds (-1: none)
    last_used          : (layers, b, kv_heads, F) long  the step (per layer) a frame's page was last selected
    counts             : (layers, 2) long               pages needed and pages already resident (hits), summed
                                                      over steps, rows and kv heads

A step's `fetch(layer, pages)` (after the step's token is written, before its attention), all on the device with
fixed shapes (no host synchronisation, capturable in a CUDA graph):

1. a selected page is resident when a frame holds it and it is not the page the step writes into (that page
   changed since it was copied: it is copied again, one page of K);
2. the resident pages keep their frames; the missing ones take the other frames, least recently used first (the
   i-th missing page the i-th such frame; empty frames first; the order counted by F x F comparisons, not
   sorted, `_lru_order`; the page table updated by K x F comparisons, not scattered: no indirect indexing).
   With F = K the frames then hold exactly the step's pages; with F > K the pages of recent steps stay resident too (a page selected again later is a hit). A frame
   left holding the page being written (not selected this step) is emptied: its copy is stale;
3. only the frames that took a missing page are copied from the host (`kernels/page_copy.py`: one program per
   frame, moving nothing for a resident one);
4. the attention reads the keys and values of selected page i from frame `frame_of[..., i]` and its validity at
   the page's own slots (`kernels/page_decode.py`'s `frames`): the values, the page order and so the logits are
   those of the in-place read.

Hits are the overlap of consecutive steps' page sets, what AttentionPredictor's history makes stable (its
one-token-ahead prefetch in the eager `storage/offload.py` is this reuse plus an early copy; in the static step the
missing pages are copied at the start of the layer's attention, on the compute stream). Memory on the device:
2 * F * page * head_dim * itemsize bytes per (offloaded layer, row, kv head), the budget's KV.
"""

from __future__ import annotations

import torch

from ..kernels.page_copy import copy_pages
from .static import StaticSlots, _static


class StaticFrames:
    """Device page frames and the page table of the `host_layers` of `slots` (see the module docstring).

    slots: the `StaticSlots` whose `host_layers` are offloaded; page: slots per page (the selector's); frames: F,
    at least the pages the selector picks per step (its `chosen` width; more keep recent pages resident). Raises
    ValueError for F < 1 or a capacity that is not a multiple of the page."""

    def __init__(self, slots: StaticSlots, page: int, frames: int):
        if frames < 1 or slots.capacity % page:
            raise ValueError(f"page frames need F >= 1 and a capacity ({slots.capacity}) that is a multiple of the "
                             f"page ({page}); got F = {frames}")
        self.slots, self.page, self.n_frames = slots, page, frames
        b, h = slots.batch, slots.kv_heads
        dev = slots.valid.device
        self.keys: list[torch.Tensor | None] = [None] * slots.n_layers
        self.values: list[torch.Tensor | None] = [None] * slots.n_layers
        for i in sorted(slots.host_layers):
            k, v = slots.keys[i], slots.values[i]
            self.keys[i] = _static(torch.zeros(b, h, frames * page, k.shape[-1], dtype=k.dtype, device=dev))
            self.values[i] = _static(torch.zeros(b, h, frames * page, v.shape[-1], dtype=v.dtype, device=dev))
        self.frame_page = _static(torch.full((slots.n_layers, b, h, frames), -1, dtype=torch.long, device=dev))
        self.last_used = _static(torch.full((slots.n_layers, b, h, frames), -1, dtype=torch.long, device=dev))
        self.clock = _static(torch.zeros(slots.n_layers, dtype=torch.long, device=dev))  # fetches per layer
        self.counts = _static(torch.zeros(slots.n_layers, 2, dtype=torch.long, device=dev))

    def holds(self, layer_idx: int) -> bool:
        """Whether `layer_idx` has frames (it is offloaded)."""
        return self.keys[layer_idx] is not None

    def fetch(self, layer_idx: int, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Make the step's pages (b, kv_heads, K) long (distinct per row and kv head, K <= F) resident in layer
        `layer_idx`'s frames, copying only the missing ones (and the page being written) from its host slots.
        Returns the frames' keys and values (b, kv_heads, F * page, d) and frame_of (b, kv_heads, K) long: the
        frame holding each selected page. Call after the step's token is written into the slots."""
        fp = self.frame_page[layer_idx]  # (b, h, F)
        writing = (self.slots.write[layer_idx] // self.page)[..., None]  # (b, h, 1): the page being written
        eq = (pages[..., :, None] == fp[..., None, :]) & (pages != writing)[..., None]  # (b, h, K, F)
        hit = eq.any(-1)  # (b, h, K)
        kept = eq.any(-2)  # (b, h, F)
        f = torch.arange(fp.shape[-1], device=pages.device)
        hit_frame = (eq * f).sum(-1)  # (b, h, K): the frame holding a resident page (at most one does)
        last = self.last_used[layer_idx]
        # the i-th missing page takes the i-th frame not kept, least recently used first (ties: the lower frame).
        # No sort, cumsum, argmax or scatter: every index is counted by comparisons (F x F, K x K, K x F). The H200's
        # compiled step at 128k (K = F = 256) hit a device-side "index out of bounds: 0 <= tmp < 256" assert in an
        # inductor reduction kernel that fused argmax with the scatters of the page table (torch 2.11); with no
        # indirect indexing left, no such assert can be generated.
        order = _lru_order(last, kept)  # (b, h, F): each frame's place in that order
        missing = ~hit
        k = torch.arange(missing.shape[-1], device=pages.device)
        rank = (missing[..., None, :] & (k[None, :] < k[:, None])).sum(-1)  # (b, h, K): missing pages before it
        take = ((rank[..., :, None] == order[..., None, :]) * f).sum(-1)  # (b, h, K): its frame
        frame_of = torch.where(hit, hit_frame, take)  # distinct per (row, kv head)
        sel = frame_of[..., :, None] == f  # (b, h, K, F): frame f holds selected page k after the fetch
        taken = sel.any(-2)  # (b, h, F)
        load = (sel & missing[..., None]).any(-2).to(torch.uint8)  # frames to copy (uint8: the copy kernel's)
        # an old copy of the page being written is forgotten unless its frame takes a page this step
        new_fp = torch.where(taken, (sel * pages.long()[..., None]).sum(-2), fp.masked_fill(fp == writing, -1))
        clock = self.clock[layer_idx]
        clock.add_(1)
        last.copy_(torch.where(taken, clock, last))
        fp.copy_(new_fp)
        self.counts[layer_idx, 0].add_(pages.numel())
        self.counts[layer_idx, 1].add_(hit.sum())
        copy_pages(self.slots.keys[layer_idx], self.slots.values[layer_idx], self.keys[layer_idx],
                   self.values[layer_idx], fp, load, self.page)
        return self.keys[layer_idx], self.values[layer_idx], frame_of

    def nbytes(self) -> int:
        """Device bytes of the frames' keys and values (the page table not counted: `table_nbytes`)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)

    def table_nbytes(self) -> int:
        """Device bytes of the page table, its use times and counters."""
        return sum(t.numel() * t.element_size() for t in (self.frame_page, self.last_used, self.clock, self.counts))

    def traffic(self) -> dict:
        """Page traffic so far (one host synchronisation: call outside the timed steps): needed, hits (pages),
        hit_rate (every fetch), hit_rate_after_first (the fetches after each layer's first, whose frames were
        empty: a fetch needs the same number of pages every step, so the first one's is needed / fetches),
        bytes_moved (host -> device bytes of the copied pages, keys and values)."""
        needed, hits = (int(x) for x in self.counts.sum(0).tolist())
        first = sum(n // c for (n, _), c in zip(self.counts.tolist(), self.clock.tolist()) if c > 0)
        per_page = 0
        for k, v in zip(self.keys, self.values):
            if k is not None:
                per_page = self.page * (k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size())
                break
        return {"needed": needed, "hits": hits, "hit_rate": hits / needed if needed else 0.0,
                "hit_rate_after_first": hits / (needed - first) if needed > first else 0.0,
                "bytes_moved": (needed - hits) * per_page}


def _lru_order(last: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Each frame's place (b, h, F) long, a permutation of 0..F-1, in the order frames are given to missing pages:
    the frames not kept first, least recently used (`last`, (b, h, F) long: the step each was last selected, -1
    never) first, ties by frame index; the kept frames last. Counted by comparisons, not sorted."""
    big = torch.iinfo(torch.long).max
    age = last.masked_fill(kept, big)
    f = torch.arange(age.shape[-1], device=age.device)
    a, b = age[..., :, None], age[..., None, :]  # (b, h, F, F): frame f (row) against frame g (column)
    before = (b < a) | ((b == a) & (f[None, :] < f[:, None]))  # g comes before f
    return before.sum(-1)
