"""`QuantStore`: the `KVStore` (storage/stores.py protocol) of quantized keys and values, base of every scheme here.

A layer with quantized storage is a plain `CompressedLayer` whose `store` is a `QuantStore`: slots keep the core's
meaning (positions, valid, method state live in the layer's slot table); only how keys and values are held differs:

    slots [0, n_c)   quantized segments, in slot order (`_stores`: packed codes + scales/zeros + extras)
    slots [n_c, n)   a full-precision residual of the most recent tokens (`_k_res`, `_v_res`)

A segment is a run of consecutive slots held in one compressed form (one commit's tokens, or several of them
concatenated; MiKV's low- and high-precision parts). `commit()` moves the oldest residual tokens into segments in
whole groups of `group` tokens, leaving between
`residual` and `residual + group - 1` tokens in full precision (KIVI's residual window R, a multiple of the group
size G). `append` never quantizes: the runtime calls `commit()` once per layer and forward, *after* the method's
eviction (`CompressedCache.after_attention`), so at a prefill with eviction only the kept tokens are quantized, once.
A layer driven by hand (no cache) calls `layer.commit()` itself.

The view. `view()` returns dequantize(segments) ++ residual, (batch, kv_heads, n, head_dim) in the model's dtype:
what the reference attention path (sdpa or eager, CPU or GPU) and scoring read. It is built once per forward and
remembered by weak references only, so attention, scoring and eviction of that forward share one dequantization
and nothing full-precision outlives the forward (tokens appended by the forward are seen in full precision by it,
older ones as stored). The remembered view is dropped when the slots change (append, keep, index_batch, split).

Composition with eviction: `keep(idx)` gathers the kept slots from the view and holds them as the residual;
`commit()` quantizes them. A later eviction (decode-time `compression_interval`, chunked prefill, a sliding window) regroups
tokens that were already quantized: they are re-quantized from their dequantized values (a second rounding,
documented deviation). Whole groups are spared that: in a store whose segment can copy whole groups (KIVI,
`_takes_groups`), `keep_order(idx)` puts, per (row, kv head), the kept slots of quantized groups the eviction
left whole first (in their order), and `keep` copies the leading whole groups every (row, kv head) has, packed
codes and scales as they are; only the other kept slots (groups the eviction broke, the residual, the forward's
new tokens) become the residual and are quantized by `commit()`. In a chunked prefill the work per chunk is then
the tokens the chunk adds and the groups its eviction breaks, not every kept token (`keep_whole_groups = False`
restores the reference: every kept slot re-quantized).

Head-wise budgets: quantized stores are rectangular (`ragged_heads = False`). A head keeping fewer slots than the
widest head keeps its extra slots, hidden by the slot table's `valid` mask; their bytes are held and counted
(`nbytes` is the rectangle of the widest head, not the sum over heads).

Left-padded batches: the kept slots of each row are those it keeps alone (the core's selection), but segments are
cut into groups of `group` slots shared by every row, so in a padded row a group may hold padding or hidden slots
and other real tokens than alone: schemes quantizing across tokens (KIVI's and GEAR's per-channel keys) can then
differ from the row alone once tokens leave the residual window (known limit; per-token schemes, MiKV/ZipCache,
do not).
"""

from __future__ import annotations

import weakref

import torch

from ..storage.slots import take
from ..storage.stores import KVStore


class QuantStore(KVStore):
    """Base class of the quantized stores: subclasses implement `_compress(k, v) -> segment` (an object with `n`,
    `keys(dtype)`, `values(dtype)`, `tensors()`, `map(fn)` and optionally `cat(other)`).

    residual: tokens kept in full precision (a multiple of `group`); group: tokens quantized together. Raises
    ValueError for group < 1, residual < 0 or a residual that is not a multiple of the group."""

    ragged_heads = False
    scheme = "quantized"
    keep_whole_groups = True  # an eviction copies the quantized groups it leaves whole (False: re-quantize all kept)

    def __init__(self, residual: int = 32, group: int = 32):
        if group < 1 or residual < 0:
            raise ValueError("group must be >= 1 and residual >= 0")
        if residual % group:
            raise ValueError(f"the residual window ({residual}) must be a multiple of the group size ({group})")
        self.residual = residual
        self.group = group
        self.dtype: torch.dtype | None = None
        self._stores: list = []
        self._k_res: torch.Tensor | None = None
        self._v_res: torch.Tensor | None = None
        self._view: list = [None, None]  # weak references to this forward's view (keys, values)

    # --- shape --------------------------------------------------------------------------------------------------
    def init(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """An empty store for tensors shaped like keys, values (batch, kv_heads, q, head_dim) in their dtype."""
        b, h, _, d = keys.shape
        self.dtype = keys.dtype
        self._stores = []
        self._k_res = keys.new_empty(b, h, 0, d)
        self._v_res = values.new_empty(b, h, 0, values.shape[-1])
        self._view = [None, None]

    @property
    def n_compressed(self) -> int:
        """Slots held quantized (the rest is the full-precision residual)."""
        return sum(s.n for s in self._stores)

    @property
    def n(self) -> int:
        """Slots held (quantized + residual)."""
        return self.n_compressed + (0 if self._k_res is None else self._k_res.shape[-2])

    @property
    def segments(self) -> list:
        """The quantized segments, in slot order (read-only use: tests, kernels, benchmarks)."""
        return self._stores

    @property
    def residual_keys(self) -> torch.Tensor | None:
        """(batch, kv_heads, r, head_dim): the full-precision residual's keys (the last r slots)."""
        return self._k_res

    @property
    def residual_values(self) -> torch.Tensor | None:
        return self._v_res

    # --- the view -----------------------------------------------------------------------------------------------
    def _materialize(self, i: int) -> torch.Tensor:
        res = self._k_res if i == 0 else self._v_res
        parts = [(s.keys if i == 0 else s.values)(res.dtype) for s in self._stores]
        return torch.cat(parts + [res], dim=-2) if parts else res

    def half(self, i: int) -> torch.Tensor | None:
        """The view's keys (i=0) or values (i=1), dequantized only when this forward's view is not alive."""
        if self._k_res is None:
            return None
        ref = self._view[i]
        t = None if ref is None else ref()
        if t is not None and t.shape[-2] == self.n:
            return t
        t = self._materialize(i)
        self._view[i] = weakref.ref(t)
        return t

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.half(0), self.half(1)

    def _forget_view(self) -> None:
        self._view = [None, None]

    # --- protocol -----------------------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self._k_res is None:
            self.init(keys, values)
        self._k_res = torch.cat([self._k_res, keys], dim=-2)
        self._v_res = torch.cat([self._v_res, values], dim=-2)
        self._forget_view()

    def _takes_groups(self) -> bool:
        """Whether this scheme's segment can copy whole groups of `group` slots exactly (`take_groups`)."""
        return False

    def _group_segment(self):
        """The one segment whole groups are copied from, or None (the scheme cannot, `keep_whole_groups` is off,
        or the quantized slots are not one segment)."""
        if not (self.keep_whole_groups and self._takes_groups() and len(self._stores) == 1):
            return None
        return self._stores[0] if hasattr(self._stores[0], "take_groups") else None

    def keep_order(self, idx: torch.Tensor, visible: torch.Tensor | None = None):
        """The slots `idx` (batch, kv_heads, k) long, ascending, reordered per (row, kv head) so that the kept
        slots of quantized groups kept whole come first (in their order), then the others (in theirs); `visible`
        ((batch, kv_heads, k) bool or None) follows. Returns (idx, visible); unchanged when this store cannot copy
        whole groups. The caller keeps the slots in the returned order (`CompressedLayer.evict(reorder=True)`):
        `keep` then copies the leading whole groups instead of re-quantizing them."""
        seg = self._group_segment()
        g, nc = self.group, self.n_compressed
        if seg is None or nc < g:
            return idx, visible
        ng = nc // g
        in_q = idx < ng * g
        grp = torch.where(in_q, idx // g, ng)  # (b, h, k): the group of each kept slot (ng: not quantized)
        count = torch.zeros(*idx.shape[:2], ng + 1, dtype=torch.int32, device=idx.device)
        count.scatter_add_(2, grp, torch.ones_like(grp, dtype=torch.int32))
        whole = (count == g).gather(2, grp) & in_q  # the slot's group is kept whole (slots are distinct)
        perm = (~whole).to(torch.uint8).argsort(dim=-1, stable=True)
        return idx.gather(2, perm), None if visible is None else visible.gather(2, perm)

    def _leading_groups(self, idx: torch.Tensor) -> int:
        """How many leading runs of `group` kept slots are, in every (row, kv head), one whole quantized group in
        order (slots r * group .. r * group + group - 1). One host synchronisation."""
        g, nc = self.group, self.n_compressed
        ng = min(idx.shape[-1], nc) // g
        if ng == 0:
            return 0
        b, h = idx.shape[:2]
        head = idx[..., : ng * g].view(b, h, ng, g)
        first = head[..., :1]
        ok = ((first % g == 0) & (first + g <= nc)).squeeze(-1) & (head == first + torch.arange(g, device=idx.device)).all(-1)
        return int(ok.all(0).all(0).to(torch.int32).cumprod(0).sum())

    def keep(self, idx: torch.Tensor, held: torch.Tensor | None = None) -> None:
        """Keep slots idx (batch, kv_heads, k) in that order (`held` is ignored: not ragged, see the module doc).
        The leading runs of `group` slots that are whole quantized groups in every (row, kv head) (see
        `keep_order`) are copied as they are (packed codes and scales); the other kept slots become the
        full-precision residual, quantized by the next `commit()`."""
        keys, values = self.view()
        seg = self._group_segment()
        m = 0 if seg is None else self._leading_groups(idx)
        rest = idx[..., m * self.group :]
        self._k_res, self._v_res = take(keys, rest), take(values, rest)
        self._stores = [seg.take_groups(idx[..., : m * self.group : self.group] // self.group, self.group)] if m else []
        self._forget_view()

    def keep_merged(self, idx: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    held: torch.Tensor | None = None) -> None:
        """As `keep`, the kept slots holding the merged entries `keys`, `values` (batch, kv_heads, k, d): they
        become the full-precision residual, quantized by the next `commit()` (merge before the commit: what is kept
        is quantized once)."""
        self._k_res, self._v_res = keys.to(self.dtype).contiguous(), values.to(self.dtype).contiguous()
        self._stores = []
        self._forget_view()

    def set_dense(self, which: int, t: torch.Tensor) -> None:
        """Replace every slot's keys (which=0) or values (1) with the full-precision `t` (uncommitted until
        `commit()`); the other half is dequantized first so that it is kept."""
        if self._stores:
            other = self._materialize(1 - which)
            if which == 0:
                self._v_res = other
            else:
                self._k_res = other
            self._stores = []
        if self.dtype is None:
            self.dtype = t.dtype
        if which == 0:
            self._k_res = t
        else:
            self._v_res = t
        self._forget_view()

    def _map_extra(self, fn) -> None:
        """Subclasses holding per-batch tensors outside the segments apply fn to them."""

    def _map_all(self, fn) -> None:
        self._stores = [s.map(fn) for s in self._stores]
        self._k_res, self._v_res = fn(self._k_res), fn(self._v_res)
        self._map_extra(fn)
        self._forget_view()

    def index_batch(self, fn) -> None:
        if self._k_res is not None:
            self._map_all(fn)

    def offload(self) -> None:
        """Move the packed segments, scales, extras and residual to the CPU (still quantized)."""
        if self._k_res is not None:
            self._map_all(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self, device) -> None:
        if self._k_res is not None and self._k_res.device != torch.device(device):
            self._map_all(lambda t: t.to(device, non_blocking=True))

    # --- compression ----------------------------------------------------------------------------------------
    def _compress(self, k: torch.Tensor, v: torch.Tensor):
        raise NotImplementedError

    def _absorb(self, stores: list, new) -> list:
        """Add a newly compressed segment after the existing ones (concatenated when the segment type allows)."""
        if stores and hasattr(stores[-1], "cat"):
            return stores[:-1] + [stores[-1].cat(new)]
        return stores + [new]

    def _flush_count(self, n_res: int) -> int:
        extra = n_res - self.residual
        return (extra // self.group) * self.group if extra >= self.group else 0

    def commit(self) -> None:
        """Quantize the oldest residual tokens in whole groups, keeping `residual`..`residual + group - 1` tokens.
        The view of the current forward (if alive) stays valid: it is what this forward's attention saw."""
        if self._k_res is None:
            return
        m = self._flush_count(self._k_res.shape[-2])
        if m == 0:
            return
        new = self._compress(self._k_res[:, :, :m], self._v_res[:, :, :m])
        self._stores = self._absorb(self._stores, new)
        self._k_res = self._k_res[:, :, m:].clone()  # a clone: a view would keep the whole old tensor alive
        self._v_res = self._v_res[:, :, m:].clone()

    # --- memory -----------------------------------------------------------------------------------------------
    def _extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors other than the segments and the residual that encode keys/values (e.g. channel scales)."""
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor that encodes keys and values: packed codes, scales, zeros, extras, residual."""
        if self._k_res is None:
            return {}
        out = {}
        for i, s in enumerate(self._stores):
            out.update({f"store{i}.{k}": t for k, t in s.tensors().items()})
        out.update(self._extra_tensors())
        out["residual.keys"], out["residual.values"] = self._k_res, self._v_res
        return out
