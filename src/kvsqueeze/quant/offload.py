"""KIVI's packed storage as the host tier of an offloaded layer (`--quant kivi-<bits> --offload cpu|disk`).

`KIVIOffloadStore` is an `OffloadStore` (storage/offload.py: device page frames, page table, on-demand fetch and
prefetch, counters) whose host tier holds what `KIVIStore` holds on the device with `--quant kivi-<bits>`, in the
same form and the same bytes, through a `KIVIStore` (the codec: its append / commit / keep / view rules, nothing
re-implemented):

    slots [0, n_c)   one quantized segment: keys per channel (codes (b, h, n_c * bits / 8, d) uint8 packed along
                     tokens, scale / zero (b, h, n_c / G, d) bfloat16), values per token (codes likewise, scale /
                     zero (b, h, n_c, d / G_v) bfloat16)
    slots [n_c, n)   the full-precision residual, (b, h, r, d) in the model's dtype, R <= r < R + G once n >= R

Tier 'cpu': in host memory, pinned when the compute device is CUDA; tier 'disk': the segment's six tensors in
memory-mapped files (replaced, and the old files deleted, at each residual flush, as `KIVIStore` replaces its
tensors), the residual (at most R + G - 1 tokens per (row, kv head)) in host memory. `host_nbytes()` is
`KIVIStore.nbytes()` for the same content: `--quant kivi-2 --offload cpu` holds on the host what `--quant kivi-2`
holds on the device.

The device tier is the `OffloadStore`'s: fixed page frames holding *dequantized* pages in the model's dtype. A page
(`page` slots, 16 by default) must divide the key group G (32): a quantized page travels as its packed codes
(`page * bits / 8` rows of keys and of values), its key group's scale and zero row (the group's two pages each
carry it) and its tokens' value scales and zeros; a page of the residual travels in full precision. The frames
are written by dequantizing on the compute device with `QTensor.dequantize` (float32 `code * s + z`, then the
model's dtype: the values `KIVIStore.view()` gives, bit for bit). `bytes_moved` counts the bytes that cross:
packed codes, scales and zeros of quantized pages, full-precision slots of residual pages (a page opening or
partial counted whole, as the full-precision tier does).

Invariant: a resident page equals its host copy, dequantized. A decoding step's token goes to the residual and,
when its page is resident, into its frame (`OffloadStore.append`). `commit()` (after each forward, the runtime's
call) quantizes the oldest residual tokens in whole groups once they exceed R + G - 1 (KIVI's flush): their
stored value changes, so the pages they cover are dropped from their frames (`OffloadCounters.invalidated`) and
fetched again, dequantized, when next needed (AttentionPredictor's prefetch runs after the commit, so it brings
them back in the same step). Every other change of the slots (a prefill's eviction, a batch operation) forgets
every frame, as for full precision.

What reads the whole layer outside a decoding step's gather (a multi-token forward's attention, Quest's page
summaries, AttentionPredictor's calibration row: `layer.keys`) reads `KIVIStore.view()` of the host tier,
dequantized on the host: the values the device's `--quant kivi-2` shows at that moment, so Quest's page bounds
and every selection are those of `--quant kivi-2 --select ...` on the device.

Not built: other schemes (GEAR's low-rank and outlier terms, MiKV's / ZipCache's mixed precision have no paged
form here; `host_tier_for` refuses them), a page that does not divide the key group, the compiled static step
(`StaticCompressedCache` refuses a quantized host tier).
"""

from __future__ import annotations

import functools
import os
import tempfile

import torch

from ..errors import KVSqueezeError
from ..storage.offload import OffloadStore
from ..storage.stores import nbytes
from .kivi import KIVISegment, KIVIStore
from .packing import PER_CHANNEL, PER_TOKEN, QTensor


class _TierKIVI(KIVIStore):
    """The codec of `KIVIOffloadStore`: a `KIVIStore` on the host whose quantized segment grows in the tier's
    memory (`alloc(shape, dtype)` -> an uninitialised tensor: pinned, plain or memory-mapped), one copy per flush as
    `KIVIStore`'s own concatenation."""

    def __init__(self, alloc, **kw):
        super().__init__(**kw)
        self.alloc = alloc

    def _cat(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = self.alloc((*a.shape[:2], a.shape[2] + b.shape[2], a.shape[3]), a.dtype)
        out[:, :, : a.shape[2]] = a
        out[:, :, a.shape[2] :] = b
        return out

    def _absorb(self, stores: list, new) -> list:
        if not stores:
            return [new]  # placed by the store (`KIVIOffloadStore._place`)
        old = stores[-1]

        def cat(x: QTensor, y: QTensor) -> QTensor:
            return QTensor(self._cat(x.codes, y.codes), self._cat(x.scale, y.scale), self._cat(x.zero, y.zero),
                           x.bits, x.axis, x.group, x.d, x.packed_along)

        return stores[:-1] + [KIVISegment(cat(old.k, new.k), cat(old.v, new.v))]


class KIVIOffloadStore(OffloadStore):
    """An offloaded layer's store whose host tier is KIVI's packed storage (see the module docstring).

    frames, page, tier, latency_s, disk_dir: `OffloadStore`'s; bits, group, residual, value_group: `KIVIStore`'s.
    Raises ValueError when a page is not whole packed bytes (page % (8 // bits)) or does not divide the key
    group (group % page), or for KIVI's own argument errors."""

    def __init__(self, frames: int, page: int = 16, tier: str = "cpu", latency_s: float = 0.0,
                 disk_dir: str | None = None, *, bits: int = 2, group: int = 32, residual: int = 32,
                 value_group: int | None = None):
        super().__init__(frames, page=page, tier=tier, latency_s=latency_s, disk_dir=disk_dir)
        KIVIStore(bits, group, residual, value_group)  # KIVI's own checks
        if page % (8 // bits) or group % page:
            raise ValueError(f"a page of {page} slots must divide the key group ({group}) and be whole bytes of "
                             f"{bits}-bit codes ({8 // bits} tokens per byte)")
        self.kivi_args = dict(bits=bits, group=group, residual=residual, value_group=value_group)
        self.codec: _TierKIVI | None = None
        self._cap = 0
        self._mapped: dict[str, torch.Tensor] = {}  # tier 'disk': file -> the tensor mapping it

    # --- the host tier ---------------------------------------------------------------------------------------
    def _init_host(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._cap = 0
        self._unmap(set())
        self.codec = _TierKIVI(self._alloc, **self.kivi_args)
        self.codec.init(keys[:, :, :0].to(self.host), values[:, :, :0].to(self.host))

    @property
    def capacity(self) -> int:
        """Slots the page table covers (whole pages; the packed tensors themselves hold exactly n slots)."""
        return self._cap

    def _grow_host(self, cap: int) -> None:
        self._cap = -(-cap // self.page) * self.page

    def _alloc(self, shape, dtype) -> torch.Tensor:
        """An uninitialised host tensor in the tier's memory: pinned (tier 'cpu' on CUDA), plain, or a
        memory-mapped file (tier 'disk')."""
        if self.tier == "cpu":
            return torch.empty(shape, dtype=dtype, pin_memory=self.pin)
        fd, path = tempfile.mkstemp(prefix="kvsqueeze-kivi-", suffix=".bin", dir=self.disk_dir)
        os.close(fd)
        n = 1
        for s in shape:
            n *= s
        t = torch.from_file(path, shared=True, size=max(n, 1), dtype=dtype)[:n].view(shape)
        self._mapped[path] = t
        return t

    def _placed(self, t: torch.Tensor) -> bool:
        if self.tier == "disk":
            return any(m.data_ptr() == t.data_ptr() for m in self._mapped.values())
        return t.device == self.host and (not self.pin or t.is_pinned())

    def _place(self) -> None:
        """Move every tensor of the codec not yet in the tier's memory there (the residual stays in host memory
        for tier 'disk'), and delete the mapped files nothing holds any more."""
        c = self.codec

        def put(t: torch.Tensor) -> torch.Tensor:
            if self._placed(t):
                return t
            out = self._alloc(t.shape, t.dtype)
            out.copy_(t)
            return out

        c._stores = [s.map(put) for s in c._stores]
        if self.tier == "cpu":
            c._k_res, c._v_res = put(c._k_res), put(c._v_res)
        c._forget_view()
        self._unmap({t.data_ptr() for t in c.tensors().values()})

    def _unmap(self, live: set) -> None:
        """Delete the mapped files whose tensors are not in `live` (data pointers); mappings alive stay valid."""
        for path in [p for p, t in self._mapped.items() if t.data_ptr() not in live]:
            del self._mapped[path]
            try:
                os.unlink(path)
            except OSError:
                pass

    def __del__(self):
        if getattr(self, "_mapped", None):
            self._unmap(set())

    def _settle(self) -> None:
        """After a change of which slots are held (eviction, batch operation, replaced halves): the codec's
        tensors placed, the page table as wide as the slots, every frame forgotten."""
        self._place()
        self.n = self.codec.n
        self.b = self.codec.residual_keys.shape[0]
        self._grow_host(max(self._cap, self.n))
        self._flush()

    def _write_host(self, keys: torch.Tensor, values: torch.Tensor, n0: int) -> None:
        """New slots go to the codec's residual (copied to the host synchronously)."""
        self.codec.append(keys.to(self.host), values.to(self.host))
        self._place()

    # --- protocol --------------------------------------------------------------------------------------------
    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot (batch, kv_heads, n, head_dim) in the model's dtype, on the host: `KIVIStore.view()` of the
        host tier (the segment dequantized on the host, then the residual)."""
        return self.codec.view()

    def half(self, i: int) -> torch.Tensor:
        return self.codec.half(i)

    def key_slots(self, lo: int, hi: int) -> torch.Tensor:
        """Keys (batch, kv_heads, hi - lo, head_dim) of slots lo .. hi - 1 as `view()` shows them, dequantizing on
        the host only the key groups they fall in (Quest's summaries of the newest pages, each step)."""
        c, g = self.codec, self.codec.group
        nc = c.n_compressed
        parts = []
        if lo < min(hi, nc):
            g0, g1 = lo // g * g, min(nc, -(-hi // g) * g)
            parts.append(c.segments[0].k.slice_tokens(g0, g1).dequantize(c.dtype)[:, :, lo - g0 : hi - g0])
        if hi > nc:
            parts.append(c.residual_keys[:, :, max(lo, nc) - nc : hi - nc])
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts, 2) if parts else c.residual_keys[:, :, :0]

    def commit(self) -> None:
        """KIVI's flush (`KIVIStore.commit`): the oldest residual tokens quantized in whole groups; the pages
        they cover are dropped from their frames (their stored value changed)."""
        nc0 = self.codec.n_compressed
        self.codec.commit()
        nc1 = self.codec.n_compressed
        if nc1 == nc0:
            return
        self._place()
        self._invalidate(nc0 // self.page, -(-nc1 // self.page))

    def _invalidate(self, p0: int, p1: int) -> None:
        """Drop pages p0 .. p1 - 1 of every (row, kv head) from their frames (host table and device mirror)."""
        self.engine.wait()  # a prefetch may be writing the table's mirror
        pf = self.page_frame[:, :, p0:p1]
        bi, hi, j = (pf >= 0).nonzero(as_tuple=True)
        if bi.numel():
            self.frame_page[bi, hi, pf[bi, hi, j]] = -1
            self.counters.invalidated += bi.numel()
        self.page_frame[:, :, p0:p1] = -1
        self.page_frame_dev[:, :, p0:p1] = -1
        self._ahead = None

    def keep(self, idx: torch.Tensor, held: torch.Tensor | None = None) -> None:
        """`KIVIStore.keep` on the host tier (whole quantized groups copied, the rest back to the residual; the
        next `commit()` quantizes it); the frames are forgotten."""
        self.engine.wait()
        self.codec.keep(idx.to(self.host))
        self._settle()

    def index_batch(self, fn) -> None:
        self.engine.wait()
        self.codec.index_batch(fn)
        self.kd = self.vd = None
        self._settle()

    def set_dense(self, which: int, t: torch.Tensor) -> None:
        """`KIVIStore.set_dense`: every slot's keys (0) or values (1) replaced by `t` (batch, kv_heads, n, d), held
        in the residual until `commit()`."""
        self.engine.wait()
        self.codec.set_dense(which, t.to(self.host))
        self._settle()

    def adopt(self, src) -> None:
        """Hold exactly what the device `KIVIStore` `src` holds (its packed segment and residual copied to the host
        tier, nothing re-quantized). Raises TypeError for another store or other KIVI parameters."""
        a = self.kivi_args
        mine = (a["bits"], a["group"], a["residual"], a["value_group"] or a["group"])
        if not isinstance(src, KIVIStore) or (src.bits, src.group, src.residual, src.value_group) != mine:
            raise TypeError(f"this host tier holds KIVI storage (bits, group, residual, value group) {mine}, not "
                            f"{type(src).__name__}")
        c = self.codec
        c._stores = [s.map(lambda t: t.to(self.host)) for s in src.segments]
        c._k_res, c._v_res = src.residual_keys.to(self.host), src.residual_values.to(self.host)
        c.dtype = src.dtype
        self._settle()

    def tensors(self) -> dict[str, torch.Tensor]:
        out = dict(self.codec.tensors())
        if self.kd is not None:
            out.update(frame_keys=self.kd, frame_values=self.vd)
        return out

    def host_nbytes(self) -> int:
        """Bytes of the host tier: the packed segment (codes, scales, zeros) and the residual, exactly what
        `KIVIStore.nbytes()` counts for the same slots."""
        return sum(nbytes(t) for t in self.codec.tensors().values())

    # --- what travels ----------------------------------------------------------------------------------------
    def _rows(self, t: torch.Tensor, row: torch.Tensor, start: torch.Tensor, unit: int) -> torch.Tensor:
        """Rows start .. start + unit - 1 along dim 2 of t (b, h, N, c) for each (row = b * h + head, start) (m,):
        (m * unit, c), pinned on CUDA."""
        c = t.shape[-1]
        src = (row * t.shape[2] + start)[:, None] + torch.arange(unit)
        out = torch.empty(src.numel(), c, dtype=t.dtype, pin_memory=self.cuda)
        return torch.index_select(t.reshape(-1, c), 0, src.view(-1), out=out)

    def _stage(self, bi: torch.Tensor, hi: torch.Tensor, p: torch.Tensor):
        """What travels for pages `p` of (row `bi`, kv head `hi`): a quantized page's packed codes, its key group's
        scale / zero row and its tokens' value scales / zeros; a residual page's full-precision slots."""
        c, page = self.codec, self.page
        per = 8 // self.kivi_args["bits"]
        nc = c.n_compressed
        row = bi * self.h + hi
        quantized = (p + 1) * page <= nc
        jq, jr = quantized.nonzero().squeeze(1), (~quantized).nonzero().squeeze(1)
        parts = []
        if jq.numel():
            seg = c.segments[0]
            rq, pq = row[jq], p[jq]
            cr = page // per  # packed rows per page
            parts = [self._rows(seg.k.codes, rq, pq * cr, cr), self._rows(seg.k.scale, rq, pq * page // c.group, 1),
                     self._rows(seg.k.zero, rq, pq * page // c.group, 1), self._rows(seg.v.codes, rq, pq * cr, cr),
                     self._rows(seg.v.scale, rq, pq * page, page), self._rows(seg.v.zero, rq, pq * page, page)]
        res = []
        if jr.numel():
            pad = (0, 0, 0, page)  # a page opening after the last slot reads zeros
            kr = torch.nn.functional.pad(c.residual_keys, pad)
            vr = torch.nn.functional.pad(c.residual_values, pad)
            off = p[jr] * page - nc
            res = [self._rows(kr, row[jr], off, page), self._rows(vr, row[jr], off, page)]
        moved = sum(nbytes(t) for t in parts + res)
        return (p.shape[0], jq, jr, parts, res, None if not parts else (seg.k.group, seg.v.group)), moved

    def _unstage(self, staged) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantize the staged quantized pages on the compute device and put every page in order: keys
        (m * page, dk), values (m * page, dv) in the model's dtype."""
        m, jq, jr, parts, res, groups = staged
        dev, nb, page = self.device, self.cuda, self.page
        bits = self.kivi_args["bits"]
        k = torch.empty(m, page, self.dk, dtype=self.dtype, device=dev)
        v = torch.empty(m, page, self.dv, dtype=self.dtype, device=dev)
        if parts:
            kc, ks, kz, vc, vs, vz = (t.to(dev, non_blocking=nb) for t in parts)
            mq, cr, gv = jq.numel(), page * bits // 8, groups[1]
            # one key group row per page: its `page` tokens share it (QTensor's group = page; the values computed
            # are those of the whole group's dequantization, elementwise)
            kt = QTensor(kc.view(1, mq, cr, self.dk), ks.view(1, mq, 1, self.dk), kz.view(1, mq, 1, self.dk), bits,
                         PER_CHANNEL, page, self.dk, "token")
            vt = QTensor(vc.view(1, mq, cr, self.dv), vs.view(1, mq, page, self.dv // gv),
                         vz.view(1, mq, page, self.dv // gv), bits, PER_TOKEN, gv, self.dv, "token")
            j = jq.to(dev, non_blocking=nb)
            k[j] = kt.dequantize(self.dtype)[0]
            v[j] = vt.dequantize(self.dtype)[0]
        if res:
            j = jr.to(dev, non_blocking=nb)
            k[j] = res[0].to(dev, non_blocking=nb).view(-1, page, self.dk)
            v[j] = res[1].to(dev, non_blocking=nb).view(-1, page, self.dv)
        return k.view(-1, self.dk), v.view(-1, self.dv)

    def _fetch_slots(self, idx: torch.Tensor, idx_h: torch.Tensor, need: torch.Tensor):
        """The full fetch: the pages of the slots `idx` staged and dequantized as for frames, into a buffer of this
        step only, then the slots gathered from it on the device."""
        bi, hi, p = need.nonzero(as_tuple=True)
        staged, moved = self._stage(bi, hi, p)
        self.counters.full_fetches += 1
        self.counters.bytes_moved += moved
        kp, vp = self._unstage(staged)
        pos = torch.full(need.shape, -1, dtype=torch.long)
        pos[bi, hi, p] = torch.arange(p.shape[0])
        slot = pos.to(self.device).gather(2, idx // self.page) * self.page + idx % self.page
        return kp[slot], vp[slot]


def host_tier_for(store, page: int = 16):
    """The host tier's store factory (for `OffloadLayer(store_factory=...)`) of layers whose device store is
    `store` (a `KVStore` instance; None or full precision: None, the default tier). KIVI -> `KIVIOffloadStore`
    with its parameters. Raises KVSqueezeError for other quantized schemes, or a page the key group does not
    divide."""
    if store is None or not hasattr(store, "scheme"):
        return None
    if type(store) is not KIVIStore:
        raise KVSqueezeError(f"--offload composes with --quant kivi-<bits> only: {store.scheme} storage "
                             f"has no host tier yet")
    args = dict(bits=store.bits, group=store.group, residual=store.residual, value_group=store.value_group)
    try:
        KIVIOffloadStore(2, page=page, **args)
    except ValueError as e:
        raise KVSqueezeError(f"--offload with --quant kivi-{store.bits}: {e}") from None
    return functools.partial(KIVIOffloadStore, **args)


def host_tier_for_layers(layer_factory, page: int = 16):
    """`host_tier_for` the store of the layers `layer_factory` builds (a `--quant` scheme's; None: None)."""
    if layer_factory is None:
        return None
    return host_tier_for(getattr(layer_factory(), "store", None), page)
