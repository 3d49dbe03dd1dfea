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
    counts             : (layers, 3) long               pages needed, pages already resident (hits) and pages
                                                      copied ahead (prefetch), summed over steps, rows and kv heads

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

Prefetch (`StaticFrames(..., prefetch=True)`, AttentionPredictor only: its next pages are known from the history,
without the next query). After layer l's attention and `observe` at step t, `prefetch(l, pages)` assigns frames to
step t + 1's predicted pages by the same rules (the page step t + 1 writes into excepted: it changes before it is
read), and copies the missing ones on a side CUDA stream that waits for the compute stream first
(`kvsqueeze::prefetch_pages`, a custom operator: torch.compile keeps it opaque, and a CUDA graph records the fork
and the join like any launch). The copies of layer l overlap layers l + 1 .. L - 1 of step t; `join()` at the end
of the step makes the compute stream wait for them (`kvsqueeze::join_prefetch`), so a CUDA graph replay never
leaves a copy running into the next. Step t + 1's `fetch` then finds the pages resident, and copies only the page
it writes into, or what the prediction missed. The copy reads only static buffers (the page table, a per-layer
load mask), never a temporary the compute stream could free meanwhile. `counts[:, 2]` counts the prefetched pages
(moved bytes = (needed - hits + prefetched) pages). Off CUDA the copies run in order on the one device.
"""

from __future__ import annotations

import torch

from ..kernels.page_copy import copy_pages
from .static import StaticSlots, _static

_SIDE: dict = {}  # CUDA device index -> the side stream of the prefetch copies


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    s = _SIDE.get(device.index)
    if s is None:
        s = _SIDE[device.index] = torch.cuda.Stream(device)
    return s


@torch.library.custom_op("kvsqueeze::prefetch_pages", mutates_args=("dst_k", "dst_v", "token"))
def _prefetch_pages(src_k: torch.Tensor, src_v: torch.Tensor, dst_k: torch.Tensor, dst_v: torch.Tensor,
                    frame_page: torch.Tensor, load: torch.Tensor, token: torch.Tensor, page: int) -> None:
    """`copy_pages` on the side stream, after the work the compute stream has queued (CUDA; in order elsewhere).
    `token`: a one-element tensor `join_prefetch` also takes, declared mutated by both (never written), so that a
    compiled step keeps the join after every prefetch."""
    if not dst_k.is_cuda:
        copy_pages(src_k, src_v, dst_k, dst_v, frame_page, load, page)
        return
    side = _side_stream(dst_k.device)
    side.wait_stream(torch.cuda.current_stream(dst_k.device))
    with torch.cuda.stream(side):
        copy_pages(src_k, src_v, dst_k, dst_v, frame_page, load, page)


@_prefetch_pages.register_fake
def _(src_k, src_v, dst_k, dst_v, frame_page, load, token, page):
    return None


@torch.library.custom_op("kvsqueeze::join_prefetch", mutates_args=("token",))
def _join_prefetch(token: torch.Tensor) -> None:
    """The compute stream waits for the side stream's copies (CUDA; nothing elsewhere)."""
    if token.is_cuda:
        torch.cuda.current_stream(token.device).wait_stream(_side_stream(token.device))


@_join_prefetch.register_fake
def _(token):
    return None


class StaticFrames:
    """Device page frames and the page table of the `host_layers` of `slots` (see the module docstring).

    slots: the `StaticSlots` whose `host_layers` are offloaded; page: slots per page (the selector's); frames: F,
    at least the pages the selector picks per step (its `chosen` width; more keep recent pages resident);
    prefetch: copy the next step's predicted pages during this one (`prefetch`, `join`; module docstring). Raises
    ValueError for F < 1 or a capacity that is not a multiple of the page."""

    def __init__(self, slots: StaticSlots, page: int, frames: int, prefetch: bool = False):
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
        self.counts = _static(torch.zeros(slots.n_layers, 3, dtype=torch.long, device=dev))  # needed, hits, prefetched
        self.prefetching = bool(prefetch)
        # what a prefetch copies, per layer: read by the side stream, so a static buffer, not a temporary
        self.load_next = _static(torch.zeros(slots.n_layers, b, h, frames, dtype=torch.uint8, device=dev)) \
            if prefetch else None
        self.token = _static(torch.zeros(1, device=dev)) if prefetch else None  # orders the join after the copies

    def holds(self, layer_idx: int) -> bool:
        """Whether `layer_idx` has frames (it is offloaded)."""
        return self.keys[layer_idx] is not None

    def fetch(self, layer_idx: int, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Make the step's pages (b, kv_heads, K) long (distinct per row and kv head, K <= F) resident in layer
        `layer_idx`'s frames, copying only the missing ones (and the page being written) from its host slots.
        Returns the frames' keys and values (b, kv_heads, F * page, d) and frame_of (b, kv_heads, K) long: the
        frame holding each selected page. Call after the step's token is written into the slots."""
        writing = (self.slots.write[layer_idx] // self.page)[..., None]  # (b, h, 1): the page being written
        clock = self.clock[layer_idx]
        clock.add_(1)
        frame_of, load, hit = self._assign(layer_idx, pages, writing, clock)
        self.counts[layer_idx, 0].add_(pages.numel())
        self.counts[layer_idx, 1].add_(hit.sum())
        copy_pages(self.slots.keys[layer_idx], self.slots.values[layer_idx], self.keys[layer_idx],
                   self.values[layer_idx], self.frame_page[layer_idx], load, self.page)
        return self.keys[layer_idx], self.values[layer_idx], frame_of

    def prefetch(self, layer_idx: int, pages: torch.Tensor) -> None:
        """Assign frames to the next step's predicted pages (b, kv_heads, K) of layer `layer_idx` and start copying
        the missing ones on the side stream (module docstring, Prefetch); the page the next step writes into is
        not copied. Call after the layer's attention and `observe`; `join()` before the step ends. Needs
        `prefetch=True`."""
        cap = self.slots.capacity
        writing = ((self.slots.write[layer_idx] + 1).clamp(max=cap - 1) // self.page)[..., None]
        # the next fetch marks its pages with the next clock value; these get it now (the clock itself counts
        # fetches: `traffic`)
        _, load, _ = self._assign(layer_idx, pages, writing, self.clock[layer_idx] + 1)
        load = load & (self.frame_page[layer_idx] != writing).to(torch.uint8)
        self.load_next[layer_idx].copy_(load)
        self.counts[layer_idx, 2].add_(self.load_next[layer_idx].sum())
        torch.ops.kvsqueeze.prefetch_pages(self.slots.keys[layer_idx], self.slots.values[layer_idx],
                                           self.keys[layer_idx], self.values[layer_idx], self.frame_page[layer_idx],
                                           self.load_next[layer_idx], self.token, self.page)

    def join(self) -> None:
        """The compute stream waits for the step's prefetch copies (the end of a step with `prefetch=True`)."""
        torch.ops.kvsqueeze.join_prefetch(self.token)

    def _assign(self, layer_idx: int, pages: torch.Tensor, writing: torch.Tensor,
                stamp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The page table's update for `pages` (b, h, K) (the rules of the module docstring; `writing` (b, h, 1)
        the page that is never a hit, `stamp` the use time given to the frames taken): (frame_of (b, h, K),
        load (b, h, F) uint8: the frames to copy, hit (b, h, K) bool). Updates frame_page and last_used."""
        fp = self.frame_page[layer_idx]  # (b, h, F)
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
        last.copy_(torch.where(taken, stamp, last))
        fp.copy_(new_fp)
        return frame_of, load, hit

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
        prefetched (pages copied ahead, `prefetch`), bytes_moved (host -> device bytes of the copied pages, keys
        and values, on demand and ahead)."""
        needed, hits, prefetched = (int(x) for x in self.counts.sum(0).tolist())
        first = sum(n // c for (n, _, _), c in zip(self.counts.tolist(), self.clock.tolist()) if c > 0)
        per_page = 0
        for k, v in zip(self.keys, self.values):
            if k is not None:
                per_page = self.page * (k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size())
                break
        return {"needed": needed, "hits": hits, "hit_rate": hits / needed if needed else 0.0,
                "hit_rate_after_first": hits / (needed - first) if needed > first else 0.0,
                "prefetched": prefetched, "bytes_moved": (needed - hits + prefetched) * per_page}


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
