"""Fixed-capacity slots for a compiled decode step: every layer's kept KV entries in preallocated buffers.

In the spirit of transformers' `StaticLayer` and gpt-fast's KV module, but for a *compressed* cache whose
(row, kv head) pairs hold different numbers of entries. All shapes are fixed when the slots are built; a decoding
step only writes into them, so the step can be compiled (`torch.compile(..., mode="reduce-overhead")`, CUDA graphs):

    keys[l], values[l] : (b, kv_heads, capacity, head_dim)  one buffer pair per layer, in the model's dtype
    positions          : (layers, b, kv_heads, capacity) long  the token position of each slot (-1: empty)
    valid              : (layers, b, kv_heads, capacity) bool  which slots hold an entry attention may see
    priority           : (layers, b, kv_heads, capacity) float32 | None  decode-time eviction order: the slot
                         with the lowest priority is overwritten first (None: the cache never evicts while decoding)
    limit              : (layers, b, kv_heads) long  entries each (layer, row, kv head) may hold (its budget)
    write              : (layers, b, kv_heads) long  the slot the next decoding token is written to

Nothing that changes per step is a Python number: the write slots, the fill levels (`valid`) and the eviction
victims are device tensors, so a step never synchronises with the host. A decoding token is written into the slot
`write` names (`write_kv` for keys and values, `begin_token` for positions and validity); `end_token` then picks
the next write slot per (layer, row, kv head): the first empty slot, after turning the lowest-priority entries of
a (layer, row, kv head) holding more than its `limit` into empty slots (eviction = choosing which slot the next
write overwrites: no reallocation, no concatenation, no gather).

Memory: every layer holds `capacity` slots per (row, kv head), whatever it keeps. Capacity is what the budget
allows: the largest (layer, row, kv head) fill after the prefill plus the decoding room (the tokens still to be
generated), or, for a cache that evicts while decoding, its largest budget plus the eviction interval (the runtime
rounds it up to 16 slots). So a
head-wise (AdaKV) or layer-wise (PyramidKV) budget holds its widest head's slots everywhere: the empty slots are
hidden by `valid`, not freed (the eager `DenseStore` frees them but cannot be captured in a graph).

Offloading (`host_layers`): those layers' keys and values live in mapped host memory (`storage/mapped.py`: pinned
CPU memory the step's kernels access in place over the host link), everything else on the device. A step then
reads over the link only what its attention touches (Quest's selected pages) and writes its token there; the
tables above stay on the device.

The order of the slots is not the order of positions (a write goes where a victim was): attention never depends
on slot order, and `positions` says what each slot holds.
"""

from __future__ import annotations

import torch

from ..errors import KVSqueezeError
from .mapped import mapped_zeros


def _static(t: torch.Tensor) -> torch.Tensor:
    """Mark `t`'s storage as a static address for CUDA graphs (as transformers' StaticLayer does), where torch
    supports it; returns `t`."""
    mark = getattr(getattr(torch, "_dynamo", None), "mark_static_address", None)
    if mark is not None:
        try:
            mark(t)
        except Exception:  # pragma: no cover - older torch or an unsupported tensor
            pass
    return t


class StaticSlots:
    """Preallocated KV slots of every layer of a cache (see the module docstring for the fields and shapes)."""

    def __init__(self, n_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype, device,
                 evicts: bool = False, value_dim: int | None = None, host_layers=()):
        if capacity < 1:
            raise KVSqueezeError(f"a static cache needs a capacity of at least 1 slot, got {capacity}")
        self.n_layers, self.batch, self.kv_heads, self.capacity = n_layers, batch, kv_heads, capacity
        self.head_dim = head_dim
        self.host_layers = frozenset(int(i) for i in host_layers)
        vd = value_dim or head_dim
        shape = (batch, kv_heads, capacity)

        # offloaded layers: one block of host memory the step's kernels read in place (storage/mapped.py), carved
        # into their buffers (one allocation: the pinned allocator rounds each up to a power of two)
        per = batch * kv_heads * capacity
        host = mapped_zeros((len(self.host_layers) * per * (head_dim + vd),), dtype, device) if self.host_layers \
            else None
        parts = iter(host.split([per * d for _ in self.host_layers for d in (head_dim, vd)])) if host is not None \
            else iter(())

        def buffer(i: int, d: int) -> torch.Tensor:
            if i in self.host_layers:
                return _static(next(parts).view(*shape, d))
            return _static(torch.zeros(*shape, d, dtype=dtype, device=device))

        self.keys, self.values = [], []
        for i in range(n_layers):
            self.keys.append(buffer(i, head_dim))
            self.values.append(buffer(i, vd))
        self.positions = _static(torch.full((n_layers, *shape), -1, dtype=torch.long, device=device))
        self.valid = _static(torch.zeros((n_layers, *shape), dtype=torch.bool, device=device))
        self.priority = _static(torch.zeros((n_layers, *shape), dtype=torch.float32, device=device)) if evicts \
            else None
        self.limit = _static(torch.full((n_layers, batch, kv_heads), capacity, dtype=torch.long, device=device))
        self.write = _static(torch.zeros((n_layers, batch, kv_heads), dtype=torch.long, device=device))

    # --- filling from a compressed layer ---------------------------------------------------------------------
    def load(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
             valid: torch.Tensor | None, priority: torch.Tensor | None = None) -> None:
        """Copy one layer's held entries in: keys / values (b, kv_heads, n, d), positions (b, kv_heads, n),
        valid (b, kv_heads, n) bool or None (all held), priority (b, kv_heads, n) float (eviction order; needed
        when the slots evict). Each (row, kv head)'s valid entries go to its first slots, in position order; the
        next write slot is the first empty one. Raises KVSqueezeError when a (row, kv head) holds more entries
        than the capacity."""
        b, h, n = positions.shape
        pos = positions.long()
        held = torch.ones_like(pos, dtype=torch.bool) if valid is None else valid
        counts = held.sum(-1)  # (b, h)
        width = int(counts.max()) if counts.numel() else 0
        if width > self.capacity:
            raise KVSqueezeError(f"layer {layer_idx} holds {width} entries per kv head, more than the static "
                                 f"capacity of {self.capacity} slots")
        big = torch.iinfo(torch.long).max
        order = pos.masked_fill(~held, big).argsort(dim=-1, stable=True)[..., :width]  # (b, h, width)

        def take(t):
            j = order.view(b, h, width, *([1] * (t.dim() - 3))).expand(b, h, width, *t.shape[3:])
            return t.gather(2, j)

        slot = torch.arange(width, device=pos.device)
        filled = slot[None, None, :] < counts[..., None]  # (b, h, width)
        k_dst, v_dst = self.keys[layer_idx], self.values[layer_idx]
        mapped = layer_idx in self.host_layers and k_dst.device.type == "cuda"
        # a host layer's buffers are assembled on the device and cross the link once, as one copy each
        k_buf, v_buf = (torch.zeros_like(k_dst), torch.zeros_like(v_dst)) if mapped else (k_dst.zero_(), v_dst.zero_())
        k_buf[:, :, :width] = take(keys) * filled[..., None].to(keys.dtype)
        v_buf[:, :, :width] = take(values) * filled[..., None].to(values.dtype)
        if mapped:
            k_dst.copy_(k_buf)
            v_dst.copy_(v_buf)
        self.positions[layer_idx].fill_(-1)
        self.positions[layer_idx, :, :, :width] = take(pos).masked_fill(~filled, -1)
        self.valid[layer_idx].zero_()
        self.valid[layer_idx, :, :, :width] = filled
        if self.priority is not None:
            if priority is None:
                raise KVSqueezeError("these static slots evict while decoding: load() needs each slot's priority")
            self.priority[layer_idx].zero_()
            self.priority[layer_idx, :, :, :width] = take(priority.float())
        self.write[layer_idx] = counts.clamp(max=self.capacity - 1)

    # --- one decoding token (graph-friendly: no host synchronisation) ----------------------------------------
    def _grid(self, *lead: int) -> tuple[torch.Tensor, ...]:
        """Index grids (broadcastable to `lead`) over the leading dims of a slot tensor, for `index_put_`."""
        dev = self.write.device
        return tuple(torch.arange(n, device=dev).view(*([1] * i), n, *([1] * (len(lead) - i - 1)))
                     for i, n in enumerate(lead))

    def begin_token(self, position: torch.Tensor, priority: torch.Tensor | None = None) -> None:
        """Claim every layer's write slot for the next token: position (b,) long is the token's position per row,
        priority (layers or 1, b, kv_heads) float its eviction priority where the priority does not depend on the
        token's key (position-based rules); key-based priorities come with `write_kv`.

        Every write of a step is an `index_put_` (advanced-index assignment), never a `scatter_`: inductor
        re-inplaces `index_put` on a compiled graph's inputs, while a `scatter_` on them became an out-of-place
        scatter plus a copy back of the whole buffer (measured on the H200: two full-buffer kernels per layer
        and step, 0.8 ms of a 6.7 ms step at 32k / 8x; tests/test_static.py checks the generated code)."""
        idx = (*self._grid(self.n_layers, self.batch, self.kv_heads), self.write)
        pos = position.view(1, -1, 1).expand(self.n_layers, self.batch, self.kv_heads)
        self.positions.index_put_(idx, pos)
        self.valid.index_put_(idx, torch.ones((), dtype=torch.bool, device=self.valid.device))
        if priority is not None and self.priority is not None:
            self.priority.index_put_(idx, priority.float().expand(self.n_layers, self.batch, self.kv_heads))

    def write_kv(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor,
                 priority: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one token's keys / values (b, kv_heads, 1, d) of layer `layer_idx` into its write slot (in place,
        `index_put_`: see `begin_token`), with its eviction priority (b, kv_heads) float when it depends on the
        key; return the layer's whole buffers (b, kv_heads, capacity, d), what attention reads (`valid` says which
        slots count)."""
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        idx = (*self._grid(self.batch, self.kv_heads), self.write[layer_idx])  # each (b, h) -> its write slot
        k_buf.index_put_(idx, keys[:, :, 0].to(k_buf.dtype))
        v_buf.index_put_(idx, values[:, :, 0].to(v_buf.dtype))
        if priority is not None and self.priority is not None:
            self.priority[layer_idx].index_put_(idx, priority.float())
        return k_buf, v_buf

    def end_token(self, evict: torch.Tensor | bool = True, max_victims: int = 1) -> None:
        """After the token's attention: where due (`evict`: a bool, or a 0-dim bool tensor, e.g. every N steps),
        empty the up to `max_victims` lowest-priority slots of each (layer, row, kv head) holding more than its
        `limit`; then point `write` at each one's first empty slot. Without priorities nothing is evicted (the
        write moves on to the next free slot; the caller keeps the steps within the capacity)."""
        if self.priority is not None and max_victims > 0:
            n_valid = self.valid.sum(-1)  # (L, b, h)
            over = (n_valid - self.limit).clamp(min=0)
            if isinstance(evict, torch.Tensor):
                over = over * evict.to(over.dtype)
            elif not evict:
                over = torch.zeros_like(over)
            k = min(max_victims, self.capacity)
            pr = self.priority.masked_fill(~self.valid, float("inf"))
            cand = pr.topk(k, dim=-1, largest=False).indices  # (L, b, h, k)
            drop = torch.arange(k, device=cand.device) < over[..., None]
            k_idx = (*self._grid(self.n_layers, self.batch, self.kv_heads, k)[:3], cand)
            self.valid.index_put_(k_idx, self.valid.gather(3, cand) & ~drop)
        if self.priority is None:  # never evicts: the slots fill in order (the caller keeps within the capacity)
            self.write.add_(1).clamp_(max=self.capacity - 1)
            return
        free = ~self.valid
        self.write.copy_(free.to(torch.int8).argmax(-1))  # the first empty slot (0 when none: past the capacity)

    # --- reading ---------------------------------------------------------------------------------------------
    def held_counts(self) -> torch.Tensor:
        """(layers, b, kv_heads) long: entries each (layer, row, kv head) holds now."""
        return self.valid.sum(-1)

    def nbytes(self) -> int:
        """Bytes of keys and values held: every layer's buffers at full capacity (host layers included)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def host_nbytes(self) -> int:
        """Bytes of keys and values in host memory (the `host_layers`' buffers)."""
        return sum(self.keys[i].numel() * self.keys[i].element_size() +
                   self.values[i].numel() * self.values[i].element_size() for i in self.host_layers)

    def table_nbytes(self) -> int:
        """Bytes of the slot bookkeeping (positions, valid, priority, limit, write)."""
        ts = [self.positions, self.valid, self.limit, self.write]
        if self.priority is not None:
            ts.append(self.priority)
        return sum(t.numel() * t.element_size() for t in ts)
