"""KV stores: how one layer's keys and values are held, behind one small protocol.

A store holds the keys and values of a layer's slots (the slot table beside it, `slots.SlotTable`, holds their
positions). Every store answers the same calls:

    append(keys, values)        new slots after the existing ones; keys, values (batch, kv_heads, q, head_dim)
    view() -> (keys, values)    every slot as (batch, kv_heads, n, head_dim) in the model's dtype: what attention
                                and scoring read (a slot that holds nothing reads as zeros; the mask hides it)
    keep(idx, held=None)        keep slots idx (batch, kv_heads, k), in that order; `held` (batch, kv_heads, k)
                                bool marks the kept slots that still hold an entry (False: an empty slot, its
                                memory freed)
    keep_merged(idx, k, v, held=None)  as keep, the kept slots holding the new entries k, v (batch, kv_heads, k,
                                d) instead of their own (a merge, `storage.merge.MergePlan`)
    index_batch(fn)             a batch operation on every per-row tensor (beam search, batch selection)
    nbytes() -> int             bytes of keys and values really held (what `CacheStats.kv_bytes` reports)
    tensors() -> dict           every tensor that encodes keys and values
    offload() / prefetch()      move what is held to the CPU / back to the layer's device (in the store's own
                                form: a quantized store moves its packed tensors and stays quantized)
    commit()                    bring what was appended into the stored form (quantized stores quantize their
                                residual here; called by the runtime once per forward, after the eviction)
    half(i)                     keys (0) or values (1) of the view alone (`layer.keys` / `layer.values`)

`DenseStore` is the full-precision store. While every kv head holds the same number of entries it is two
rectangular tensors, so its view is the storage itself (no copy). When heads hold different numbers of entries
(head-wise budgets, e.g. AdaKV; per-row budgets of a left-padded batch; a sliding window that heads cross at
different slots) it becomes *ragged*: the entries of all (row, head) pairs are packed one after another into
(entries, head_dim) tensors, in (row, head, slot) order, with a `held` (batch, kv_heads, n) mask saying which slots
hold them. The bytes held are then the sum of what each head keeps, not the widest head times the number of heads;
the rectangular view is built per forward (a transient the size of the widest head) for the reference kernels.
Quantized stores (`kvsqueeze.quant`) implement the same protocol.
"""

from __future__ import annotations

import weakref

import torch

from .slots import take


def nbytes(t: torch.Tensor | None) -> int:
    """Bytes of a tensor's elements (0 for None)."""
    return 0 if t is None else t.numel() * t.element_size()


class KVStore:
    """The protocol every store implements (see the module docstring). Subclasses: `DenseStore` here; the
    quantized stores of `kvsqueeze.quant`."""

    ragged_heads = False  # whether kv heads may hold different numbers of entries with the memory freed

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        raise NotImplementedError

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def half(self, i: int) -> torch.Tensor:
        return self.view()[i]

    def commit(self) -> None:
        """Nothing to do for full precision."""

    def keep(self, idx: torch.Tensor, held: torch.Tensor | None = None) -> None:
        raise NotImplementedError

    def keep_merged(self, idx: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    held: torch.Tensor | None = None) -> None:
        """Keep slots `idx` (batch, kv_heads, k) as `keep`, their entries replaced by `keys`, `values` (batch,
        kv_heads, k, d) (the merged entries). Raises TypeError for a store that cannot hold replaced entries."""
        raise TypeError(f"{type(self).__name__} cannot hold merged entries")

    def index_batch(self, fn) -> None:
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(nbytes(t) for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def offload(self) -> None:
        raise NotImplementedError

    def prefetch(self, device) -> None:
        raise NotImplementedError


class DenseStore(KVStore):
    """Full-precision keys and values: rectangular while every head holds the same number of entries, ragged
    (packed entries + a `held` mask, memory freed per head) otherwise."""

    ragged_heads = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.k, self.v = keys, values  # (b, h, n, d) rectangular, or (entries, d) packed when `held` is set
        self.held: torch.Tensor | None = None  # (b, h, n) bool, set only when ragged
        self._view = None  # weak references to the last ragged view (alive while a forward holds it)
        self._room: tuple[torch.Tensor, torch.Tensor] | None = None  # (b, h, capacity, d) buffers k, v view into

    # --- capacity: appending without copying -----------------------------------------------------------------
    def reserve(self, room: int) -> None:
        """Hold the slots in buffers with `room` free slots after them, so that the next appends (up to `room`
        slots) write in place instead of concatenating (copying every slot). Only for a rectangular store; the
        buffers are bytes held (`nbytes`). A `keep`, a batch operation or an append past the room drops them."""
        if self.held is not None or room <= 0:
            return
        b, h, n, d = self.k.shape
        bk = self.k.new_empty(b, h, n + room, d)
        bv = self.v.new_empty(b, h, n + room, self.v.shape[-1])
        bk[:, :, :n], bv[:, :, :n] = self.k, self.v
        self._room = (bk, bv)
        self.k, self.v = bk[:, :, :n], bv[:, :, :n]

    @classmethod
    def stacked(cls, rows: list["DenseStore"], n: int, room: int = 0) -> "DenseStore":
        """One store holding `rows` (stores of batch 1) as the rows of a batch, each padded with zero slots to `n`
        slots *in front of* its own (right-aligned: row i's m_i slots are slots n - m_i .. n - 1, so each row's
        slots and everything appended after them are one contiguous run; the slot table marks the padding
        invalid), with `room` free slots after them (see `reserve`). Each row is copied once, straight into its
        place."""
        views = [r.view() for r in rows]
        k0, v0 = views[0]
        b, h = len(rows), k0.shape[1]
        bk = k0.new_zeros(b, h, n + room, k0.shape[-1])
        bv = v0.new_zeros(b, h, n + room, v0.shape[-1])
        for i, (k, v) in enumerate(views):
            bk[i, :, n - k.shape[2] : n], bv[i, :, n - v.shape[2] : n] = k[0], v[0]
        out = cls(bk[:, :, :n], bv[:, :, :n])
        out._room = (bk, bv) if room > 0 else None
        return out

    @property
    def room(self) -> int:
        """Free slots left in the reserved buffers (0 without)."""
        if self._room is None or self.held is not None:
            return 0
        return self._room[0].shape[2] - self.k.shape[2]

    @property
    def ragged(self) -> bool:
        return self.held is not None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(batch, kv_heads, n, head_dim) of the view."""
        if self.held is None:
            return tuple(self.k.shape)
        return (*self.held.shape, self.k.shape[-1])

    # --- protocol --------------------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        q = keys.shape[-2]
        if self._room is not None and self.held is None and q <= self.room and self.k.data_ptr() == \
                self._room[0].data_ptr():
            bk, bv = self._room
            n = self.k.shape[2]
            bk[:, :, n : n + q], bv[:, :, n : n + q] = keys, values
            self.k, self.v = bk[:, :, : n + q], bv[:, :, : n + q]
            return
        self._room = None
        if self.held is None:
            self.k = torch.cat([self.k, keys], dim=-2)
            self.v = torch.cat([self.v, values], dim=-2)
            return
        n = self.held.shape[-1]
        k, v = self._unpack(q)  # the view with room for the new slots: one copy of the entries, no concatenation
        k[:, :, n:], v[:, :, n:] = keys, values
        self.held = torch.cat([self.held, self.held.new_ones(*keys.shape[:3])], dim=-1)
        self.k, self.v = k[self.held], v[self.held]
        self._remember(k, v)

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.held is None:
            return self.k, self.v
        if self._view is not None:
            k, v = self._view[0](), self._view[1]()
            if k is not None and v is not None:
                return k, v
        k, v = self._unpack(0)
        self._remember(k, v)
        return k, v

    def _unpack(self, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed entries of a ragged store scattered into zero (b, h, n + extra, d) tensors (the last `extra`
        slots left for the caller to fill)."""
        b, h, n = self.held.shape
        k = self.k.new_zeros(b, h, n + extra, self.k.shape[-1])
        v = self.v.new_zeros(b, h, n + extra, self.v.shape[-1])
        k[:, :, :n][self.held] = self.k
        v[:, :, :n][self.held] = self.v
        return k, v

    def _remember(self, k, v) -> None:
        self._view = (weakref.ref(k), weakref.ref(v))

    def keep(self, idx: torch.Tensor, held: torch.Tensor | None = None) -> None:
        k, v = self.view()
        self._hold(idx, take(k, idx), take(v, idx), held)

    def keep_merged(self, idx: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    held: torch.Tensor | None = None) -> None:
        """As `keep`, the kept slots holding `keys`, `values` (batch, kv_heads, k, d): rectangular or ragged alike
        (an empty slot of a head-wise budget, `held` False, is freed whatever it was given)."""
        self._hold(idx, keys.contiguous(), values.contiguous(), held)

    def _hold(self, idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor, held: torch.Tensor | None) -> None:
        """Hold k, v (batch, kv_heads, k, d) as the slots `idx` kept (packed when some of them are not held)."""
        self._room = None
        old = None if self.held is None else take(self.held, idx)
        if held is not None and old is not None:
            held = held & old
        elif held is None:
            held = old
        if held is None or bool(held.all()):
            self.k, self.v, self.held, self._view = k, v, None, None
            return
        self.held = held
        self.k, self.v = k[held], v[held]
        self._remember(k, v)

    def index_batch(self, fn) -> None:
        self._room = None
        if self.held is None:
            self.k, self.v = fn(self.k), fn(self.v)
            return
        k, v = self.view()
        k, v, self.held = fn(k), fn(v), fn(self.held)
        self.k, self.v = k[self.held], v[self.held]
        self._remember(k, v)

    def tensors(self) -> dict[str, torch.Tensor]:
        if self._room is not None:  # the reserved buffers are what is held
            return {"keys": self._room[0], "values": self._room[1]}
        return {"keys": self.k, "values": self.v}

    def offload(self) -> None:
        self._room = None
        self.k, self.v = self.k.to("cpu", non_blocking=True), self.v.to("cpu", non_blocking=True)
        self.held = None if self.held is None else self.held.to("cpu")
        self._view = None

    def prefetch(self, device) -> None:
        if self.k.device != torch.device(device):
            self.k, self.v = self.k.to(device, non_blocking=True), self.v.to(device, non_blocking=True)
            self.held = None if self.held is None else self.held.to(device)
            self._view = None
            self._room = None

    # --- replacing every slot (what assigning `layer.keys` / `layer.values` does) -----------------------------
    def set_dense(self, which: int, t: torch.Tensor) -> None:
        """Replace every slot's keys (which=0) or values (1) with the rectangular `t`; a ragged store becomes
        rectangular first (its other half is kept)."""
        if self.held is not None:
            self.k, self.v = self.view()
            self.held = None
            self._view = None
        self._room = None
        if which == 0:
            self.k = t
        else:
            self.v = t
