"""Quest in the static decode step: page metadata in fixed buffers, selection on the device, no host sync.

Quest (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", arXiv
2406.10774; the rule: `selection/quest.py`) over the fixed-capacity slots of a `StaticCompressedCache`
(`storage/static.py`). A page is `page` consecutive slots of the static capacity: page j of a (layer, row, kv head)
holds slots [j * page, (j + 1) * page). Per (layer, row, kv head, page) the buffers `kmin` / `kmax`
(b, kv_heads, capacity // page, head_dim), in the keys' dtype, hold the channel-wise minimum and maximum of the keys
of the page's valid slots (0 for a page with none): the min and max of bf16 keys are bf16 values, so this is exact
(the eager Quest holds the same values in float32) at half the bytes; the bound is summed in float32. They are
built once from the slots (`load`) and, at every decoding step, the page the step writes into is recomputed on the
device from its `page` slots (`refresh`: only that page changes; the write slots are device tensors).

`select(layer_idx, query, scaling)` then does what `Quest._select` does, with static shapes:

    U[b, h, j] = sum_d max(q_d * min_d, q_d * max_d)   (per query head h; on CUDA the Triton pass
                                                        `kernels/page_bound.py`, else `page_scores`)
    gqa="max":  agg[b, hk, j] = max over the group's heads of softmax_j(scaling * U[b, h, :])  (over live pages)
    gqa="mean": the mean instead of the max; gqa="raw": max over the group's heads of U itself
    the current page (the one holding the token being written) +inf; pages with no valid slot -inf
    pages = the k = budget // page pages of largest agg, in increasing order                    (b, hk, k)

where the live pages of a (layer, row, kv head) are those up to its current page (the slots fill in order: the
static cache holds the prefill's entries in its first slots and appends one per step), the pages the eager Quest
sees. k is fixed (a static shape); when fewer pages are live than k the selection holds every live page (the
others are empty, masked by attention), which is what the eager Quest's dense steps attend to (it is dense
while the layer holds no more than `budget` slots). Layers in `dense_layers` are not selected (no metadata).

Equality with the eager Quest (same pages, same logits): the eager pages are over the eager layer's stored slots;
the static cache's first slots hold the same entries in position order. They line up when the eager layer holds
its entries in position order with no invalid slot among them (a full cache or a method that keeps every head's
entries in order, a batch without left padding); with padding or head-wise budgets the two page grids differ
(the static one packs each (row, kv head)'s entries into its first slots). The eager metadata min/max runs over
every stored slot of a page, the static one over its valid slots (the same where no slot is invalid).
"""

from __future__ import annotations

import torch

from ..errors import KVSqueezeError
from ..kernels.page_bound import page_bound, triton
from ..kernels.topk import topk_increasing
from ..storage.static import _static
from .base import check_static_pages
from .quest import Quest, page_scores


class StaticQuest:
    """Quest's page metadata and selection over a `StaticSlots` (see the module docstring).

    `selector`: the eager cache's `Quest` (its budget, page, gqa rule and dense layers are used; its own state is
    not); `slots`: the static slots (capacity a multiple of `selector.page`). Memory: 2 * head_dim * itemsize bytes per
    page per (sparse layer, row, kv head): for bf16, head_dim / 4 bytes per slot, a sixteenth of K+V's 4 * head_dim
    bytes.
    `chosen` (layers, b, kv_heads, k) long: the pages each sparse layer attended to at its last step (a device
    buffer written by `select`; -1 before the first step and for dense layers).
    Raises KVSqueezeError for another selector, a budget that is not a multiple of the page, recovery tracking,
    or a capacity that is not a multiple of the page."""

    def __init__(self, selector, slots):
        self.check(selector)
        page = selector.page
        if slots.capacity % page:
            raise KVSqueezeError(f"static capacity {slots.capacity} is not a multiple of the page {page}")
        self.slots = slots
        self.page = page
        self.n_pages = slots.capacity // page
        self.k_pages = min(selector.budget // page, self.n_pages)
        self.budget = selector.budget
        self.gqa = selector.gqa
        self.dense_layers = frozenset(selector.dense_layers)
        dev = slots.valid.device
        shape = (slots.batch, slots.kv_heads, self.n_pages, slots.head_dim)
        self.kmin: list[torch.Tensor | None] = []
        self.kmax: list[torch.Tensor | None] = []
        for i in range(slots.n_layers):
            sparse = i not in self.dense_layers
            dt = slots.keys[i].dtype  # the min / max of the keys are values of their dtype: no rounding
            self.kmin.append(_static(torch.zeros(shape, dtype=dt, device=dev)) if sparse else None)
            self.kmax.append(_static(torch.zeros(shape, dtype=dt, device=dev)) if sparse else None)
        # the pages each sparse layer attended to at its last step (inspection, tests; -1 before any step)
        self.chosen = _static(torch.full((slots.n_layers, slots.batch, slots.kv_heads, self.k_pages), -1,
                                         dtype=torch.long, device=dev))
        self._offs = torch.arange(page, device=dev)
        self._page_ids = torch.arange(self.n_pages, device=dev)

    @staticmethod
    def check(selector) -> None:
        """Raise KVSqueezeError unless `selector` is a Quest the static step runs (a budget in whole pages, no
        recovery tracking): what `StaticCompressedCache.from_cache` checks before it allocates anything."""
        if not isinstance(selector, Quest):
            raise KVSqueezeError(f"the static decode path runs Quest selection only, not {type(selector).__name__}")
        check_static_pages(selector, "Quest")

    def sparse(self, layer_idx: int) -> bool:
        """Whether `layer_idx` selects pages (False for `dense_layers`)."""
        return self.kmin[layer_idx] is not None

    @torch.no_grad()
    def load(self) -> None:
        """Build every sparse layer's metadata from the slots' keys and validity (after `StaticSlots.load`)."""
        s = self.slots
        for i in range(s.n_layers):
            if not self.sparse(i):
                continue
            b, h, c, d = s.keys[i].shape
            keys = s.keys[i].view(b, h, self.n_pages, self.page, d)
            ok = s.valid[i].view(b, h, self.n_pages, self.page)
            mn, mx = _masked_minmax(keys, ok, 3)
            self.kmin[i].copy_(mn)
            self.kmax[i].copy_(mx)

    def refresh(self, layer_idx: int) -> None:
        """Recompute the metadata of the page each (row, kv head) of `layer_idx` writes into this step (after the
        step's key is in the buffer and its slot marked valid): a gather of that page's `page` keys, no host sync."""
        if not self.sparse(layer_idx):
            return
        s = self.slots
        keys = s.keys[layer_idx]
        b, h, c, d = keys.shape
        pg = s.write[layer_idx] // self.page  # (b, h)
        idx = pg[..., None] * self.page + self._offs  # (b, h, page)
        k = keys.gather(2, idx[..., None].expand(b, h, self.page, d))
        ok = s.valid[layer_idx].gather(2, idx)
        mn, mx = _masked_minmax(k, ok, 2)  # (b, h, d)
        # index_put_, not scatter_: inductor re-inplaces it (a scatter_ on the buffer compiled to a copy of the
        # whole metadata back each step; see StaticSlots.begin_token)
        at = (torch.arange(b, device=pg.device)[:, None], torch.arange(h, device=pg.device)[None, :], pg)
        self.kmin[layer_idx].index_put_(at, mn)
        self.kmax[layer_idx].index_put_(at, mx)

    def select(self, layer_idx: int, query: torch.Tensor, scaling: float | None) -> torch.Tensor | None:
        """The pages (b, kv_heads, k) long, increasing, each (row, kv head) of layer `layer_idx` attends to for
        `query` (b, q_heads, 1, head_dim) post-RoPE (None for a dense layer); `scaling`: the attention scale
        (default head_dim ** -0.5). The rule: the module docstring."""
        if not self.sparse(layer_idx):
            return None
        s = self.slots
        kmin, kmax = self.kmin[layer_idx], self.kmax[layer_idx]
        b, hk, P, d = kmin.shape
        hq = query.shape[1]
        if query.is_cuda and triton is not None:  # one pass over the metadata (kernels/page_bound.py)
            scores = page_bound(query[:, :, 0], kmin, kmax)
        else:
            scores = page_scores(query[:, :, 0], kmin.float(), kmax.float())
        scores = scores.view(b, hk, hq // hk, P)  # (b, hk, g, P) fp32
        cur = (s.write[layer_idx] // self.page)[..., None]  # (b, hk, 1): the page being written
        live = self._page_ids <= cur  # (b, hk, P)
        if self.gqa == "raw":
            agg = scores.amax(2)
        else:
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            est = torch.softmax((scores * scale).masked_fill(~live[:, :, None], float("-inf")), dim=-1)
            agg = est.amax(2) if self.gqa == "max" else est.mean(2)
        agg = agg.masked_fill(~live, float("-inf"))
        agg = agg.masked_fill(self._page_ids == cur, float("inf"))
        held = s.valid[layer_idx].view(b, hk, P, self.page).any(-1)
        agg = agg.masked_fill(~held, float("-inf"))
        # the k largest in increasing order: one Triton program per row on CUDA (kernels/topk.py; torch.topk and
        # an index sort took 1.4 ms of a 7.8 ms step at 128k on the H200), torch.topk + sort elsewhere
        pages = topk_increasing(agg, self.k_pages)
        self.chosen[layer_idx].copy_(pages)
        return pages

    def observe(self, layer_idx: int, query: torch.Tensor, scaling: float | None, pages: torch.Tensor,
                keys: torch.Tensor | None = None, frames: torch.Tensor | None = None) -> None:
        """Nothing: Quest keeps no state from a step's attention (its metadata follows the writes, `refresh`); the
        selector protocol's hook after `select` (see `StaticAttentionPredictor.observe`)."""

    def nbytes(self) -> int:
        """Bytes of the page metadata (every sparse layer's kmin and kmax)."""
        return sum(t.numel() * t.element_size() for t in (*self.kmin, *self.kmax) if t is not None)


def _masked_minmax(keys: torch.Tensor, ok: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-wise min and max of `keys` (..., n, d) over the slots where `ok` (..., n) along `dim` (the slot
    axis, >= 0); 0 where no slot is valid."""
    m = ok[..., None]
    mn = keys.masked_fill(~m, float("inf")).amin(dim)
    mx = keys.masked_fill(~m, float("-inf")).amax(dim)
    some = ok.any(dim)[..., None]
    return torch.where(some, mn, torch.zeros_like(mn)), torch.where(some, mx, torch.zeros_like(mx))
