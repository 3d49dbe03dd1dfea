"""`QuantizedLayer`: a `CompressedLayer` whose kept slots are stored compressed (fewer bits), not only fewer.

Slots keep the core's meaning (positions, valid, method state are slot-aligned and unchanged); only how keys and
values are held differs:

    slots [0, n_c)   compressed stores, in slot order (`self._stores`: packed codes + scales/zeros + extras)
    slots [n_c, n)   a full-precision residual of the most recent tokens (`self._k_res`, `self._v_res`)

`commit()` moves the oldest residual tokens into the stores in whole groups of `group` tokens, leaving between
`residual` and `residual + group - 1` tokens in full precision (KIVI's residual window R, a multiple of the group
size G). It runs at the end of every `update`: between forwards the layer really holds only the compressed bytes.

Reference attention path. `update(k, v)` returns dequantize(stores) ++ residual ++ new tokens, in the model's
dtype, to the model's own kernel (sdpa or eager, CPU or GPU): the new tokens of the current forward are attended
to in full precision, older ones as stored. That returned pair is also the layer's *live view* for the rest of
the forward: while the attention call holds it, `layer.keys` / `layer.values` return it (a weak reference, so it
costs no memory after the forward), so methods score, and `evict` gathers, what attention saw (full precision
for the tokens of this forward) instead of a second dequantization. Outside a forward, `layer.keys` dequantizes.

Composition with eviction: a method picks slots (`evict(scores, n_keep)`); the kept slots are gathered from the
live view and stored compressed (`commit`). At the prefill, every token is still in full precision in the live
view, so eviction-then-quantization quantizes exactly the kept tokens once. A later eviction (decode-time
`compression_interval`, chunked prefill) regroups tokens that were already quantized: they are re-quantized from their
dequantized values (a second rounding, documented deviation).

Left-padded batches: the kept slots of each row are those it keeps alone (the core's selection), but stores are
cut into groups of `group` slots shared by every row, so in a padded row a group may hold padding or hidden slots
and other real tokens than alone: schemes quantizing across tokens (KIVI's and GEAR's per-channel keys) can then
differ from the row alone once tokens leave the residual window (known limit; per-token schemes, MiKV/ZipCache,
do not).
"""

from __future__ import annotations

import weakref

import torch

from ..storage.layer import CompressedLayer


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class QuantizedLayer(CompressedLayer):
    """Base class: subclasses implement `_compress(k, v) -> store` (an object with `n`, `keys(dtype)`,
    `values(dtype)`, `tensors()`, `map(fn)` and optionally `cat(other)`)."""

    scheme = "quantized"

    def __init__(self, residual: int = 32, group: int = 32, **kwargs):
        if group < 1 or residual < 0:
            raise ValueError("group must be >= 1 and residual >= 0")
        if residual % group:
            raise ValueError(f"the residual window ({residual}) must be a multiple of the group size ({group})")
        self.residual = residual
        self.group = group
        self._stores: list = []
        self._k_res: torch.Tensor | None = None
        self._v_res: torch.Tensor | None = None
        self._live = None
        super().__init__(**kwargs)  # sets self.keys = self.values = None through the properties below

    # --- keys / values: the slots' full view (live during a forward, dequantized otherwise) ----------------------
    def _view(self, i: int) -> torch.Tensor | None:
        res = self._k_res if i == 0 else self._v_res
        if res is None:
            return None
        if self._live is not None:
            t = self._live[i]()
            if t is not None and t.shape[-2] == self.n_stored:
                return t
        return self._materialize(i)

    def _materialize(self, i: int) -> torch.Tensor:
        res = self._k_res if i == 0 else self._v_res
        parts = [(s.keys if i == 0 else s.values)(res.dtype) for s in self._stores]
        return torch.cat(parts + [res], dim=-2) if parts else res

    def _set(self, i: int, t: torch.Tensor | None):
        """Assigning keys (or values) replaces every slot's keys with full-precision `t` (uncommitted until
        `commit()`); the other half is dequantized first so that it is kept."""
        if self._stores:
            other = self._materialize(1 - i)
            if i == 0:
                self._v_res = other
            else:
                self._k_res = other
            self._stores = []
        if i == 0:
            self._k_res = t
        else:
            self._v_res = t
        self._live = None

    keys = property(lambda self: self._view(0), lambda self, t: self._set(0, t))
    values = property(lambda self: self._view(1), lambda self, t: self._set(1, t))

    # --- what the cache and HF ask ----------------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self._stores = []
        self._k_res = key_states.new_empty(b, h, 0, d)
        self._v_res = value_states.new_empty(b, h, 0, value_states.shape[-1])
        self._live = None
        self.positions = torch.empty(b, h, 0, dtype=torch.int32, device=self.device)
        self.is_initialized = True

    @property
    def n_stored(self) -> int:
        return 0 if self.positions is None else self.positions.shape[-1]

    @property
    def n_compressed(self) -> int:
        return sum(s.n for s in self._stores)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._stores:
            keys = torch.cat([self._materialize(0), key_states], dim=-2)
            values = torch.cat([self._materialize(1), value_states], dim=-2)
            self._k_res = torch.cat([self._k_res, key_states], dim=-2)
            self._v_res = torch.cat([self._v_res, value_states], dim=-2)
        else:  # everything is residual: the returned tensors are the residual (commit copies what it keeps)
            keys = self._k_res = torch.cat([self._k_res, key_states], dim=-2)
            values = self._v_res = torch.cat([self._v_res, value_states], dim=-2)
        self._track_new(key_states.shape[-2])
        self._live = (weakref.ref(keys), weakref.ref(values))
        self.commit()
        return keys, values

    def append(self, key_states, value_states) -> None:
        """Store new tokens without building the full view (for a fused kernel that reads the storage itself,
        e.g. `KIVILayer.fused_decode_attention`)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._k_res = torch.cat([self._k_res, key_states], dim=-2)
        self._v_res = torch.cat([self._v_res, value_states], dim=-2)
        self._track_new(key_states.shape[-2])
        self._live = None
        self.commit()

    # --- compression ------------------------------------------------------------------------------------------
    def _compress(self, k: torch.Tensor, v: torch.Tensor):
        raise NotImplementedError

    def _absorb(self, stores: list, new) -> list:
        """Add a newly compressed block after the existing stores (concatenated when the store type allows)."""
        if stores and hasattr(stores[-1], "cat"):
            return stores[:-1] + [stores[-1].cat(new)]
        return stores + [new]

    def _flush_count(self, n_res: int) -> int:
        extra = n_res - self.residual
        return (extra // self.group) * self.group if extra >= self.group else 0

    def commit(self) -> None:
        """Compress the oldest residual tokens in whole groups, keeping `residual`..`residual + group - 1` tokens."""
        if self._k_res is None:
            return
        m = self._flush_count(self._k_res.shape[-2])
        if m == 0:
            return
        new = self._compress(self._k_res[:, :, :m], self._v_res[:, :, :m])
        self._stores = self._absorb(self._stores, new)
        self._k_res = self._k_res[:, :, m:].clone()  # a clone: a view would keep the whole old tensor alive
        self._v_res = self._v_res[:, :, m:].clone()

    @staticmethod
    def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        b, h, k = idx.shape
        j = idx.view(b, h, k, *([1] * (t.dim() - 3))).expand(b, h, k, *t.shape[3:])
        return t.gather(2, j).contiguous()

    def _reorder_slots(self, idx: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        """Keep slots idx (b, h, k) in that order: positions, valid and state follow; the keys and values given
        (the full view) become the full-precision residual, to be compressed by `commit`."""
        self._k_res, self._v_res = self._take(keys, idx), self._take(values, idx)
        self._stores = []
        self.table.keep(idx)
        self._live = None

    def evict(self, scores: torch.Tensor, n_keep: int, row_keep: torch.Tensor | None = None):
        """Keep the top `n_keep` slots per (batch, kv head), then store them compressed (the selection is the
        core's `CompressedLayer._keep_index`, per-row budgets `row_keep` included)."""
        n = self.n_stored
        if n_keep >= n and row_keep is None:
            return
        n_keep = min(n_keep, n)
        idx, visible = self._keep_index(scores, n_keep, row_keep)
        self._reorder_slots(idx, self.keys, self.values)
        self.table.hide(visible)
        self.n_evicted += n - n_keep
        self.commit()

    # --- batch operations, reset ------------------------------------------------------------------------------
    def _map_extra(self, fn) -> None:
        """Subclasses holding per-batch tensors outside the stores apply fn to them."""

    def _index_batch(self, fn):
        if not self.is_initialized:
            return
        self._stores = [s.map(fn) for s in self._stores]
        self._k_res, self._v_res, self.positions = fn(self._k_res), fn(self._v_res), fn(self.positions)
        if self.valid is not None:
            self.valid = fn(self.valid)
        self.n_pad = None if self.n_pad is None else fn(self.n_pad)
        self.row_keep = None if self.row_keep is None else fn(self.row_keep)
        self.state = {k: fn(v) for k, v in self.state.items()}
        self._map_extra(fn)
        self._live = None

    def reset(self):
        self._stores = []
        self._k_res = self._v_res = None
        self._live = None
        self.positions = self.valid = None
        self.n_pad = self.row_keep = None
        self.state = {}
        self.n_new = self.n_evicted = 0
        self.cumulative_length = 0
        self.is_initialized = False

    # --- memory -----------------------------------------------------------------------------------------------
    def _extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors other than the stores and the residual that encode keys/values (e.g. channel scales)."""
        return {}

    def kv_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor that encodes keys and values: packed codes, scales, zeros, extras, residual."""
        if not self.is_initialized:
            return {}
        out = {}
        for i, s in enumerate(self._stores):
            out.update({f"store{i}.{k}": t for k, t in s.tensors().items()})
        out.update(self._extra_tensors())
        out["residual.keys"], out["residual.values"] = self._k_res, self._v_res
        return out

    def kv_nbytes(self) -> int:
        """Bytes really held for keys and values (what `CompressedCache.stats()` reports as kv_bytes)."""
        return sum(nbytes(t) for t in self.kv_tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        if not self.is_initialized:
            return {}
        out = dict(self.kv_tensors())
        out["positions"] = self.positions
        if self.valid is not None:
            out["valid"] = self.valid
        out.update({f"state.{k}": v for k, v in self.state.items()})
        return out
