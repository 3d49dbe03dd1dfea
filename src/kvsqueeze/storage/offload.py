"""Offloaded KV: every slot of a layer in host memory, a fixed budget of pages of it on the compute device.

Two tiers per layer (AttentionPredictor's offloading setting, Yang et al. 2025, section "cross-token critical cache
prefetching"; FlexGen / InfiniGen / ShadowKV keep the full KV on the host the same way):

- **host tier**: keys and values of every slot, (batch, kv_heads, capacity, head_dim) in the model's dtype, in
  page-locked (pinned) CPU memory when the compute device is CUDA (plain CPU memory otherwise). Appends write in
  place; the capacity grows by a quarter when full.
- **device tier**: `frames` page frames of `page` slots each, allocated once, (batch, kv_heads, frames * page,
  head_dim) on the compute device, and a page table per (row, kv head): `page_frame` (batch, kv_heads, pages) long,
  the frame holding a page or -1, and `frame_page` (batch, kv_heads, frames), the page a frame holds or -1. The
  table lives on the host (the decisions: which pages to copy) and is mirrored on the device (the gather of a
  step's slots from the frames, without a host round trip).

A page (16 slots by default, `selection.base`) is the unit that travels. `gather(idx)` returns the keys and values of
the slots `idx` (batch, kv_heads, k) from the frames, copying first (on demand) the pages not resident; `prefetch`
copies a page set ahead (the next step's pages, predicted by AttentionPredictor) without blocking: on CUDA on a side
stream, the next `gather` waiting on its event; elsewhere synchronously through the same code (optionally delayed by
`latency_s` per copy, a simulated slow link for tests). Only pages not already resident travel, into frames whose
pages are not needed (free frames first). A resident page always equals its host copy for every slot stored: a
decoding step writes its token into the host tier and, when the page is resident, into its frame.

When more pages are needed than there are frames (a dense step over more slots than the budget), the slots needed
are copied from the host tier for that step only (counted in `OffloadCounters.full_fetches`).

`OffloadLayer` is the `CompressedLayer` over this store (see its docstring for what a forward reads).

The host tier's form is the store's: here full precision; a subclass holds another form behind five hooks
(`_init_host`, `_write_host`, `_grow_host`, `_stage` / `_unstage`: what travels for a set of pages and how the
device turns it into the pages' keys and values, `_fetch_slots`: the full fetch) plus the protocol calls that
change the slots (`keep`, `index_batch`, `set_dense`, `adopt`, `commit`), while the frames, the page table, the
prefetch and the counters stay here. `kvsqueeze.quant.offload.KIVIOffloadStore` is such a subclass: KIVI's packed
storage on the host, pages dequantized on the device, frames of the pages a residual flush quantizes dropped
(`--quant kivi-<bits> --offload cpu|disk`; other `--quant` schemes are refused upstream). `OffloadLayer` takes
the tier's class as `store_factory`.

Tier 'disk' keeps the host tier in memory-mapped files instead, with a third tier between them and the device
(LeoAM's GPU-CPU-disk tiers, Sun et al. 2025, arXiv:2506.20187; its chunks and abstracts are a selector,
`selection/leoam.py`): a bounded **CPU cache** of `cpu_cache_pages` pages per layer (over its rows and kv heads;
pinned on CUDA), least recently used out first. A page that travels to the device is read from the CPU cache when
it is there (`cache_hits`) and from the files otherwise (`disk_pages`, `disk_bytes`), and then kept in the cache.
Writes go through: a decoding step's token is written into the file and into its page's cached copy, and any other
change of the slots empties the cache (as it forgets the frames), so every read equals what was written. Where the
next step's pages are known early (AttentionPredictor's `predict_next`), the pages of them the cache lacks are read
from the files into the cache by a background thread while the rest of the step computes (`disk_prefetch_pages`),
and the ones already cached are copied on to the device frames ahead (as on tier 'cpu'); the thread's result
enters the cache at the store's next call (each call waits for it first, so the thread never races a write), and
those pages are copied to the device on demand, from the cache, at the step that needs them. The page of the
current token, which the next step writes, is never read ahead. `cpu_cache_pages=0`: no CPU cache, the operating system's page
cache plays that tier, as before the fourteenth session.
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .layer import CompressedLayer
from .slots import take
from .stores import DenseStore, KVStore, nbytes


@dataclass
class OffloadCounters:
    """Page traffic of offloaded layers (summed over layers by `CompressedCache.offload_stats`).

    needed: pages a step attended to (per row and kv head, every offloaded layer); hits: those already resident when
    the step asked (a prefetched page counts as a hit); demand_pages / prefetch_pages: pages copied host -> device
    on demand / ahead; bytes_moved: host -> device bytes (keys + values, pages and full fetches); full_fetches:
    steps that needed more pages than frames (their slots copied for that step only); steps: offloaded layer-steps
    (one per layer and decoding step); invalidated: resident pages dropped from their frames because their stored
    value changed in the host tier (a quantized tier's residual flush, `kvsqueeze.quant.offload`).

    Tier 'disk': disk_pages / disk_bytes: pages (and their key + value bytes) read from the memory-mapped files to
    travel to the device (a full fetch counts its slots' bytes); cache_hits: pages that travelled from the CPU
    cache instead; disk_prefetch_pages: pages read from the files into the CPU cache ahead, in the background
    (their later use counts as a cache hit)."""

    needed: int = 0
    hits: int = 0
    demand_pages: int = 0
    prefetch_pages: int = 0
    bytes_moved: int = 0
    full_fetches: int = 0
    steps: int = 0
    invalidated: int = 0
    disk_pages: int = 0
    disk_bytes: int = 0
    cache_hits: int = 0
    disk_prefetch_pages: int = 0

    def add(self, other: "OffloadCounters") -> "OffloadCounters":
        for f in self.__dataclass_fields__:
            setattr(self, f, getattr(self, f) + getattr(other, f))
        return self


class CopyEngine:
    """Host -> device copies: on CUDA, prefetches run on a side stream and `wait()` makes the current stream wait
    for the last one's event; on another device every copy is synchronous (after `latency_s` seconds of simulated
    link latency, 0 by default)."""

    def __init__(self, device, latency_s: float = 0.0):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.latency_s = float(latency_s)
        self.pending = None  # the last prefetch's CUDA event

    def run(self, fn, background: bool) -> None:
        """Run the copy function `fn()`: on the side stream (after the work already queued on the current stream,
        whose frames it may overwrite) when `background` and on CUDA, else now on the current stream."""
        if self.latency_s:
            time.sleep(self.latency_s)
        if self.cuda and background:
            main = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self.stream):
                self.stream.wait_stream(main)
                fn()
                self.pending = self.stream.record_event()
            return
        self.wait()
        fn()

    def wait(self) -> None:
        """Make the current stream wait for the last prefetch (nothing to wait for off CUDA)."""
        if self.pending is not None:
            torch.cuda.current_stream(self.device).wait_event(self.pending)
            self.pending = None


_READER: ThreadPoolExecutor | None = None  # the disk tier's background reader (one thread for every store)


def _reader() -> ThreadPoolExecutor:
    global _READER
    if _READER is None:
        _READER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvsqueeze-disk")
    return _READER


class OffloadStore(KVStore):
    """Host tier + device page frames of one layer (see the module docstring).

    frames: page frames on the device (the budget in pages, plus the partial page: `budget // page + 1`); page:
    slots per page; tier: 'cpu' (host memory, pinned on CUDA) or 'disk' (memory-mapped files in `disk_dir`, default
    the system's temporary directory: the operating system pages them in and out, so the KV may exceed CPU memory;
    a file is deleted when the store replaces or drops it); latency_s: simulated latency per copy off CUDA;
    cpu_cache_pages: tier 'disk' only, the pages of the CPU cache between the files and the device frames (0: none).
    Raises ValueError for fewer than 2 frames, another tier, a negative cache or a CPU cache with tier 'cpu'."""

    ragged_heads = False  # every head keeps the layer's slots; a per-head budget hides (the table's valid)

    def __init__(self, frames: int, page: int = 16, tier: str = "cpu", latency_s: float = 0.0,
                 disk_dir: str | None = None, cpu_cache_pages: int = 0):
        if frames < 2:
            raise ValueError(f"an offloaded layer needs at least 2 page frames, got {frames}")
        if tier not in ("cpu", "disk"):
            raise ValueError(f"tier must be 'cpu' or 'disk', got {tier!r}")
        if cpu_cache_pages < 0 or (cpu_cache_pages and tier != "disk"):
            raise ValueError(f"a CPU cache of pages ({cpu_cache_pages}) sits in front of tier 'disk' only, "
                             f"and is not negative")
        self.cpu_cache_pages = int(cpu_cache_pages)
        self._reading = None  # the background reader's future: (bi, hi, p, keys, values) of pages read ahead
        self.frames, self.page, self.host = int(frames), int(page), torch.device("cpu")
        self.tier, self.disk_dir = tier, disk_dir
        self._files: list[str] = []  # the memory-mapped files of the current host tier (tier 'disk')
        self.latency_s = latency_s
        self.counters = OffloadCounters()
        self.n = 0
        self.kh = self.vh = None  # host tier (b, h, capacity, d)
        self.kd = self.vd = None  # device frames (b, h, frames * page, d)
        self._d2h = None  # CUDA event of the last device -> host write

    # --- set-up --------------------------------------------------------------------------------------------
    def init(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """An empty store for tensors shaped like keys, values (batch, kv_heads, q, head_dim) on the compute
        device (their device), in their dtype."""
        b, h, _, d = keys.shape
        self.device, self.dtype = keys.device, keys.dtype
        self.cuda = keys.device.type == "cuda"  # staging buffers pinned, copies asynchronous
        self.pin = self.cuda and self.tier == "cpu"  # the host tier itself pinned (a mapped file is not)
        self.engine = CopyEngine(keys.device, self.latency_s)
        self.b, self.h, self.dk, self.dv = b, h, d, values.shape[-1]
        self.n = 0
        self._init_host(keys, values)
        self.kd = self.vd = None
        if self.cpu_cache_pages:
            S, kw = self.cpu_cache_pages, dict(dtype=self.dtype, pin_memory=self.cuda)
            self.ck = torch.empty(S, self.page, self.dk, **kw)  # the CPU cache's pages
            self.cv = torch.empty(S, self.page, self.dv, **kw)
        self._flush()

    def _init_host(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """An empty host tier for tensors shaped like keys, values (batch, kv_heads, q, head_dim)."""
        self.kh, self.vh = self._host_empty(0)
        self._drop_files(2)

    def _host_empty(self, cap: int):
        """Uninitialised host buffers for `cap` slots (rounded up to whole pages): pinned memory, plain memory, or
        memory-mapped files (tier 'disk'; the previous files are deleted by `_drop_files` once copied)."""
        cap = -(-cap // self.page) * self.page
        if self.tier == "cpu":
            kw = dict(dtype=self.dtype, device=self.host, pin_memory=self.pin)
            return (torch.empty(self.b, self.h, cap, self.dk, **kw), torch.empty(self.b, self.h, cap, self.dv, **kw))
        out = []
        for d in (self.dk, self.dv):
            fd, path = tempfile.mkstemp(prefix="kvsqueeze-kv-", suffix=".bin", dir=self.disk_dir)
            os.close(fd)
            self._files.append(path)
            n = self.b * self.h * cap * d
            t = torch.from_file(path, shared=True, size=max(n, 1), dtype=self.dtype)[:n]
            out.append(t.view(self.b, self.h, cap, d))
        return tuple(out)

    def _drop_files(self, keep: int) -> None:
        """Delete the mapped files but the last `keep` (the current host tier's); mappings still alive stay valid."""
        old, self._files = self._files[: len(self._files) - keep], self._files[len(self._files) - keep :]
        for path in old:
            try:
                os.unlink(path)
            except OSError:
                pass

    def __del__(self):
        if getattr(self, "_files", None):
            self._drop_files(0)

    @property
    def capacity(self) -> int:
        return self.kh.shape[2]

    def _flush(self) -> None:
        """Forget what the frames and the CPU cache hold (after any change of which slots are stored other than an
        append)."""
        self._join(keep=False)
        pages = self.capacity // self.page
        if self.cpu_cache_pages:
            S = self.cpu_cache_pages
            self.cache_slot = torch.full((self.b, self.h, pages), -1, dtype=torch.long)  # page -> cache slot
            self.slot_bh = torch.full((S,), -1, dtype=torch.long)  # cache slot -> row * h + head, page
            self.slot_p = torch.full((S,), -1, dtype=torch.long)
            self.slot_used = torch.full((S,), -1, dtype=torch.long)  # LRU clock of the last use (-1: free)
            self.clock = 0
        self.page_frame = torch.full((self.b, self.h, pages), -1, dtype=torch.long)
        self.frame_page = torch.full((self.b, self.h, self.frames), -1, dtype=torch.long)
        self.page_frame_dev = self.page_frame.to(self.device)
        self._ahead = None  # (idx, pages) of the last prefetch: all resident, `gather(idx)` needs no host sync

    def _grow(self, n: int) -> None:
        """Room for `n` slots in the host tier (growing by a quarter), the page tables widened to match."""
        if n <= self.capacity:
            return
        self._grow_host(max(n, self.capacity + self.capacity // 4, 4 * self.page))
        extra = self.capacity // self.page - self.page_frame.shape[2]
        pad = torch.full((self.b, self.h, extra), -1, dtype=torch.long)
        self.page_frame = torch.cat([self.page_frame, pad], 2)
        if self.cpu_cache_pages:
            self.cache_slot = torch.cat([self.cache_slot, pad], 2)
        self.page_frame_dev = torch.cat([self.page_frame_dev, pad.to(self.device)], 2)

    def _grow_host(self, cap: int) -> None:
        """Reallocate the host tier for `cap` slots (rounded up to whole pages), the stored slots copied over."""
        kh, vh = self._host_empty(cap)
        self._sync_host()
        self._join()
        kh[:, :, : self.n], vh[:, :, : self.n] = self.kh[:, :, : self.n], self.vh[:, :, : self.n]
        self.kh, self.vh = kh, vh
        self._drop_files(2)

    def _frames(self):
        if self.kd is None:
            s = self.frames * self.page
            self.kd = torch.zeros(self.b, self.h, s, self.dk, dtype=self.dtype, device=self.device)
            self.vd = torch.zeros(self.b, self.h, s, self.dv, dtype=self.dtype, device=self.device)
        return self.kd, self.vd

    def _sync_host(self) -> None:
        """Wait until the device -> host writes issued so far have landed (CUDA: they are asynchronous)."""
        if self._d2h is not None:
            self._d2h.synchronize()
            self._d2h = None

    # --- protocol --------------------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """New slots (batch, kv_heads, q, head_dim) on the compute device: written into the host tier (and, for a
        single token whose page is resident, into its frame; several tokens: the frames are forgotten)."""
        q, n0 = keys.shape[2], self.n
        self._join()  # the background reader's pages enter the CPU cache before any write
        self.engine.wait()  # a prefetch may be writing the frames and the page table's mirror
        self._grow(n0 + q)
        self._write_host(keys, values, n0)
        self.n = n0 + q
        if q > 1:
            self._flush()
            return
        if self.kd is None:
            return
        p, off = divmod(n0, self.page)
        fr = self.page_frame_dev[:, :, p]  # (b, h)
        resident = (fr >= 0)[..., None, None]
        slot = (fr.clamp(min=0) * self.page + off)[..., None]  # (b, h, 1)
        for dev, new in ((self.kd, keys), (self.vd, values)):
            j = slot[..., None].expand(*slot.shape, dev.shape[-1])
            dev.scatter_(2, j, torch.where(resident, new.to(dev.dtype), dev.gather(2, j)))

    def _write_host(self, keys: torch.Tensor, values: torch.Tensor, n0: int) -> None:
        """Write the new slots (batch, kv_heads, q, head_dim) into the host tier at slots n0 .. n0 + q - 1
        (asynchronously from CUDA into pinned memory: `_sync_host` waits for it)."""
        q = keys.shape[2]
        self.kh[:, :, n0 : n0 + q].copy_(keys, non_blocking=self.pin)
        self.vh[:, :, n0 : n0 + q].copy_(values, non_blocking=self.pin)
        if self.pin:
            self._d2h = torch.cuda.current_stream(self.device).record_event()
        if self.cpu_cache_pages and q == 1 and n0 // self.page < self.cache_slot.shape[2]:  # write through
            p, off = divmod(n0, self.page)
            bi, hi = (self.cache_slot[:, :, p] >= 0).nonzero(as_tuple=True)
            if bi.numel():
                s = self.cache_slot[bi, hi, p]
                self.ck[s, off] = self.kh[bi, hi, n0]
                self.cv[s, off] = self.vh[bi, hi, n0]

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot from the host tier (batch, kv_heads, n, head_dim), on the host device."""
        self._join()
        self._sync_host()
        return self.kh[:, :, : self.n], self.vh[:, :, : self.n]

    def key_slots(self, lo: int, hi: int) -> torch.Tensor:
        """Keys (batch, kv_heads, hi - lo, head_dim) of slots lo .. hi - 1 from the host tier."""
        return self.view()[0][:, :, lo:hi]

    def keep(self, idx: torch.Tensor, held: torch.Tensor | None = None) -> None:
        k, v = self.view()
        idx = idx.to(self.host)
        self._replace(take(k, idx), take(v, idx))

    def index_batch(self, fn) -> None:
        k, v = self.view()
        k, v = fn(k), fn(v)
        self.b = k.shape[0]
        self.kd = self.vd = None
        self._replace(k, v)

    def _replace(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Hold exactly the slots k, v (b, h, n, d) (host copies); the frames are forgotten."""
        self.n = 0
        self.kh, self.vh = self._host_empty(k.shape[2])
        self._flush()
        self.kh[:, :, : k.shape[2]], self.vh[:, :, : k.shape[2]] = k, v
        self.n = k.shape[2]
        self._drop_files(2)

    def adopt(self, src: KVStore) -> None:
        """Hold what the device store `src` holds, in this tier's form (here: full precision, every slot copied to
        the host tier; the frames empty). Raises TypeError for a store this tier cannot hold (here anything but
        `DenseStore`; a quantized tier, `kvsqueeze.quant.offload`, takes its scheme's store)."""
        if not isinstance(src, DenseStore):
            raise TypeError(f"only full-precision layers can be offloaded to this tier, not {type(src).__name__}")
        k, v = src.view()
        self._replace(k.to(self.host), v.to(self.host))

    def set_dense(self, which: int, t: torch.Tensor) -> None:
        """Replace every slot's keys (which=0) or values (1) with `t` (batch, kv_heads, n, d)."""
        k, v = self.view()
        k, v = (t, v) if which == 0 else (k, t)
        if k.shape[2] != v.shape[2]:  # the other half follows once it is assigned too
            v = v.new_zeros(*v.shape[:2], k.shape[2], v.shape[-1]) if which == 0 else v
            k = k.new_zeros(*k.shape[:2], v.shape[2], k.shape[-1]) if which == 1 else k
        self._replace(k.to(self.host), v.to(self.host))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"keys": self.kh, "values": self.vh}
        if self.kd is not None:
            out.update(frame_keys=self.kd, frame_values=self.vd)
        return out

    def host_nbytes(self) -> int:
        """Bytes of the host tier (its capacity: what is allocated, in memory or in mapped files)."""
        return nbytes(self.kh) + nbytes(self.vh)

    def device_nbytes(self) -> int:
        """Bytes of the device frames (0 before the first decoding step)."""
        return nbytes(self.kd) + nbytes(self.vd)

    def offload(self) -> None:
        """Free the device frames (the host tier holds everything)."""
        self.kd = self.vd = None
        self._flush()

    def prefetch(self, device) -> None:
        """Nothing to bring back: pages travel per step (`gather`, `prefetch_pages`)."""

    # --- the device tier -------------------------------------------------------------------------------------
    def _need(self, pages: torch.Tensor) -> torch.Tensor:
        """(b, h, k) page indices (host) -> (b, h, pages of the table) bool."""
        need = torch.zeros(self.page_frame.shape, dtype=torch.bool)
        return need.scatter_(2, pages, True)

    def _make_resident(self, need: torch.Tensor, background: bool) -> bool:
        """Copy the pages marked in `need` (b, h, P) that are not resident into frames whose pages are not needed.
        Returns False (nothing done) when a (row, head) needs more pages than there are frames."""
        if int(need.sum(-1).max()) > self.frames:
            return False
        miss = need & (self.page_frame < 0)
        if not bool(miss.any()):
            return True
        fp = self.frame_page
        keep = (fp >= 0) & need.gather(2, fp.clamp(min=0))
        order = keep.to(torch.int8).argsort(dim=-1, stable=True)  # frames holding no needed page first
        rank = miss.long().cumsum(-1) - 1
        bi, hi, p = miss.nonzero(as_tuple=True)
        fr = order[bi, hi, rank[bi, hi, p]]
        old = fp[bi, hi, fr]
        had = old >= 0
        self.page_frame[bi[had], hi[had], old[had]] = -1
        self.page_frame[bi, hi, p] = fr
        fp[bi, hi, fr] = p
        m = p.shape[0]
        if background:
            self.counters.prefetch_pages += m
        else:
            self.counters.demand_pages += m
        staged, moved = self._stage(bi, hi, p)
        self.counters.bytes_moved += moved
        ar = torch.arange(self.page)
        dst = ((bi * self.h + hi) * (self.frames * self.page))[:, None] + fr[:, None] * self.page + ar
        pages = self.page_frame.shape[2]
        row = bi * self.h + hi
        cleared = (row[had] * pages + old[had]), (row * pages + p)

        def copy():
            kd, vd = self._frames()
            dev, nb = self.device, self.cuda
            kst, vst = self._unstage(staged)
            kd.view(-1, self.dk).index_copy_(0, dst.view(-1).to(dev, non_blocking=nb), kst)
            vd.view(-1, self.dv).index_copy_(0, dst.view(-1).to(dev, non_blocking=nb), vst)
            mirror = self.page_frame_dev.view(-1)
            mirror[cleared[0].to(dev, non_blocking=nb)] = -1
            mirror[cleared[1].to(dev, non_blocking=nb)] = fr.to(dev, non_blocking=nb)

        self.engine.run(copy, background)
        return True

    def _stage(self, bi: torch.Tensor, hi: torch.Tensor, p: torch.Tensor):
        """Gather on the host what travels for the pages `p` of (row `bi`, kv head `hi`) (m,) long each: here
        their keys and values, (m * page, head_dim) in the model's dtype (pinned on CUDA). Returns (staged, bytes
        that will cross host -> device); `_unstage(staged)` runs on the compute stream (or the copy stream)."""
        self._sync_host()
        m = p.shape[0]
        kst = torch.empty(m * self.page, self.dk, dtype=self.dtype, pin_memory=self.cuda)
        vst = torch.empty(m * self.page, self.dv, dtype=self.dtype, pin_memory=self.cuda)
        if not self.cpu_cache_pages:
            src = self._host_slots(bi, hi, p)
            torch.index_select(self.kh.view(-1, self.dk), 0, src, out=kst)
            torch.index_select(self.vh.view(-1, self.dv), 0, src, out=vst)
            if self.tier == "disk":
                self.counters.disk_pages += m
                self.counters.disk_bytes += nbytes(kst) + nbytes(vst)
            return (kst, vst), nbytes(kst) + nbytes(vst)
        s = self.cache_slot[bi, hi, p]
        hit = s >= 0
        self.counters.cache_hits += int(hit.sum())
        self.clock += 1
        self.slot_used[s[hit]] = self.clock  # the pages of this call are the last to leave
        kst3, vst3 = kst.view(m, self.page, self.dk), vst.view(m, self.page, self.dv)
        if bool(hit.any()):
            kst3[hit], vst3[hit] = self.ck[s[hit]], self.cv[s[hit]]
        miss = ~hit
        if bool(miss.any()):
            src = self._host_slots(bi[miss], hi[miss], p[miss])
            k, v = self.kh.view(-1, self.dk)[src], self.vh.view(-1, self.dv)[src]
            self.counters.disk_pages += int(miss.sum())
            self.counters.disk_bytes += nbytes(k) + nbytes(v)
            k, v = k.view(-1, self.page, self.dk), v.view(-1, self.page, self.dv)
            kst3[miss], vst3[miss] = k, v
            self._cache_put(bi[miss], hi[miss], p[miss], k, v)
        return (kst, vst), nbytes(kst) + nbytes(vst)

    # --- the CPU cache (tier 'disk') ---------------------------------------------------------------------------
    def _host_slots(self, bi: torch.Tensor, hi: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Flat host-tier slot indices (m * page,) of the pages p of (row bi, kv head hi) (m,) long each."""
        ar = torch.arange(self.page)
        return (((bi * self.h + hi) * self.capacity)[:, None] + p[:, None] * self.page + ar).view(-1)

    def _cache_put(self, bi: torch.Tensor, hi: torch.Tensor, p: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> None:
        """Keep the pages p of (row bi, kv head hi) (m,) long, not cached, with their keys (m, page, dk) and values
        (m, page, dv), in the least recently used cache slots (free ones first); the pages used by the current
        call (clock now) are the last to go. As many as fit when m exceeds the others."""
        m = min(p.shape[0], int((self.slot_used < self.clock).sum()))
        if m <= 0:
            return
        bi, hi, p, k, v = bi[:m], hi[:m], p[:m], k[:m], v[:m]
        slots = self.slot_used.argsort(stable=True)[:m]
        old = self.slot_bh[slots] >= 0
        if bool(old.any()):
            ob, op = self.slot_bh[slots[old]], self.slot_p[slots[old]]
            self.cache_slot.view(-1, self.cache_slot.shape[2])[ob, op] = -1
        self.cache_slot[bi, hi, p] = slots
        self.slot_bh[slots], self.slot_p[slots] = bi * self.h + hi, p
        self.slot_used[slots] = self.clock
        self.ck[slots], self.cv[slots] = k, v

    def _read_ahead(self, need: torch.Tensor) -> None:
        """Start reading, in the background thread, the pages marked in `need` (b, h, P) bool that are neither in
        the frames nor in the CPU cache, up to the last full page (the current token's page is written by the next
        step: never read ahead), from the files; `_join` puts them into the cache."""
        self._join()
        full = self.n // self.page
        want = need[..., :full] & (self.cache_slot[..., :full] < 0) & (self.page_frame[..., :full] < 0)
        bi, hi, p = want.nonzero(as_tuple=True)
        if not bi.numel():
            return
        bi, hi, p = bi[: self.cpu_cache_pages], hi[: self.cpu_cache_pages], p[: self.cpu_cache_pages]
        src = self._host_slots(bi, hi, p)
        kh, vh = self.kh.view(-1, self.dk), self.vh.view(-1, self.dv)

        def read():
            return kh[src].view(-1, self.page, self.dk), vh[src].view(-1, self.page, self.dv)

        self._reading = (bi, hi, p, _reader().submit(read))

    def _join(self, keep: bool = True) -> None:
        """Wait for the background reader and put its pages into the CPU cache (keep=False: drop them)."""
        job, self._reading = getattr(self, "_reading", None), None
        if job is None:
            return
        bi, hi, p, fut = job
        k, v = fut.result()
        if not keep:
            return
        fresh = self.cache_slot[bi, hi, p] < 0
        self.counters.disk_prefetch_pages += int(fresh.sum())
        self.counters.disk_pages += int(fresh.sum())
        self.counters.disk_bytes += int(fresh.sum()) * self.page * (self.dk + self.dv) * self.kh.element_size()
        self.clock += 1
        self._cache_put(bi[fresh], hi[fresh], p[fresh], k[fresh], v[fresh])

    def cpu_cache_nbytes(self) -> int:
        """Bytes of the CPU cache's pages (0 without one, or before the first append)."""
        return nbytes(getattr(self, "ck", None)) + nbytes(getattr(self, "cv", None)) if self.cpu_cache_pages else 0

    def _unstage(self, staged) -> tuple[torch.Tensor, torch.Tensor]:
        """`_stage`'s result -> the pages' keys (m * page, dk) and values (m * page, dv) on the compute device, in
        the model's dtype, page after page."""
        kst, vst = staged
        return kst.to(self.device, non_blocking=self.cuda), vst.to(self.device, non_blocking=self.cuda)

    def _fetch_slots(self, idx: torch.Tensor, idx_h: torch.Tensor, need: torch.Tensor):
        """The full fetch (more pages needed than frames): keys and values (batch, kv_heads, k, head_dim) of the
        slots `idx` on the compute device, copied from the host tier for this step only (here the slots alone);
        `need` (b, h, pages) bool marks their pages. Counted in `full_fetches` and `bytes_moved`."""
        k, v = self.view()
        self.counters.full_fetches += 1
        self.counters.bytes_moved += idx.numel() * (self.dk + self.dv) * self.kh.element_size()
        if self.tier == "disk":
            self.counters.disk_bytes += idx.numel() * (self.dk + self.dv) * self.kh.element_size()
        return take(k, idx_h).to(self.device), take(v, idx_h).to(self.device)

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (batch, kv_heads, k, head_dim) on the compute device of the slots `idx` (batch,
        kv_heads, k) long (any slots < n, in any order), from the frames; the pages not resident are copied first
        (on demand). More pages than frames: the slots are copied from the host tier for this step only."""
        self.counters.steps += 1
        self._join()
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] is idx:  # prefetched: every page resident, no host round trip
            self.counters.needed += ahead[1]
            self.counters.hits += ahead[1]
            self.engine.wait()
            kd, vd = self._frames()
            slot = self.page_frame_dev.gather(2, idx // self.page) * self.page + idx % self.page
            return take(kd, slot), take(vd, slot)
        idx_h = idx.to(self.host)
        need = self._need(idx_h // self.page)
        self.counters.needed += int(need.sum())
        self.counters.hits += int((need & (self.page_frame >= 0)).sum())
        self.engine.wait()
        if not self._make_resident(need, background=False):
            return self._fetch_slots(idx, idx_h, need)
        self.engine.wait()
        kd, vd = self._frames()
        slot = self.page_frame_dev.gather(2, idx // self.page) * self.page + idx % self.page
        return take(kd, slot), take(vd, slot)

    def prefetch_slots(self, idx: torch.Tensor) -> None:
        """Start copying the pages of the slots `idx` (batch, kv_heads, k) long (on any device; slots of the next
        step may lie one past the slots stored) that are not resident into frames, without waiting (CUDA: a side
        stream after the work queued so far; the next `gather` or decode append waits for it)."""
        idx_h = idx.to(self.host)
        self.engine.wait()  # the previous prefetch's mirror writes come first
        self._grow(int(idx_h.max()) + 1)  # the next token may open a page: room in the page table for it
        need = self._need(idx_h // self.page)
        if self.cpu_cache_pages:
            # disk -> CPU cache in the background for the pages the cache lacks (copied to the device on demand at
            # the next step, from the cache); the cached ones go on to the device frames ahead now, as on tier 'cpu'
            self._read_ahead(need)
            self._make_resident(need & ((self.page_frame >= 0) | (self.cache_slot >= 0)), background=True)
            return
        if self._make_resident(need, background=True):
            self._ahead = (idx, int(need.sum()))


class OffloadLayer(CompressedLayer):
    """A `CompressedLayer` whose slots live in an `OffloadStore` (host tier + device page frames).

    What the model's attention reads: a forward of several tokens (prefill chunk, appended question) attends to
    every slot, on the device for that forward only (`keys` / `values` are then that transient; released by
    `end_attention`); a one-token forward (a decoding step) reads only what `attend_kv(idx)` gathers from the
    frames, and its `end_attention` copies the next step's pages ahead when the selector predicts them. Outside
    a forward, `keys` / `values` are the host tier (what a calibration row or a page summary reads). The
    attention wrapper calls only `attend_kv` and `end_attention`, as for any layer: the offloading protocol
    (gather, prefetch, release) stays here. frames, page, latency_s, cpu_cache_pages: see `OffloadStore` (the CPU
    cache is the full-precision tier's: with a `store_factory` it is not passed on)."""

    def __init__(self, frames: int, page: int = 16, latency_s: float = 0.0, tier: str = "cpu",
                 disk_dir: str | None = None, store_factory=None, cpu_cache_pages: int = 0):
        self.offload_args = dict(frames=frames, page=page, latency_s=latency_s, tier=tier, disk_dir=disk_dir)
        if cpu_cache_pages and store_factory is None:  # the full-precision tier's CPU cache (a quantized tier: none)
            self.offload_args["cpu_cache_pages"] = cpu_cache_pages
        self.host_store = store_factory or OffloadStore  # (**offload_args) -> an empty OffloadStore (or subclass)
        super().__init__(store_factory=lambda: self.host_store(**self.offload_args))
        self._forward_kv = None  # (keys, values) on the device during a multi-token forward
        self._gathered = None  # (idx, keys, values) of the current step

    @classmethod
    def from_layer(cls, layer: CompressedLayer, frames: int, page: int = 16, latency_s: float = 0.0,
                   tier: str = "cpu", disk_dir: str | None = None, store_factory=None,
                   cpu_cache_pages: int = 0) -> "OffloadLayer":
        """An offloaded layer holding what `layer` holds (its slot table taken over, its store's content copied to
        the host tier in the tier's form, `OffloadStore.adopt`; `layer` should not be used afterwards).
        `store_factory`: the host tier's class (default `OffloadStore`, full precision; a quantized layer needs
        its scheme's tier, `kvsqueeze.quant.offload`). Raises TypeError for a store the tier cannot hold or a
        sliding-window layer."""
        if layer.sliding_window:
            raise TypeError("sliding-window layers are not offloaded (they hold a window only)")
        out = cls(frames=frames, page=page, latency_s=latency_s, tier=tier, disk_dir=disk_dir,
                  store_factory=store_factory, cpu_cache_pages=cpu_cache_pages)
        if not layer.is_initialized:
            return out
        k, v = layer.keys, layer.values
        out.lazy_initialization(k[:, :, :0], v[:, :, :0])
        out.store.adopt(layer.store)
        out.table = layer.table
        for name in ("cumulative_length", "n_new", "n_evicted", "row_keep"):
            setattr(out, name, getattr(layer, name))
        return out

    def _kv(self, i: int):
        if self._forward_kv is not None:
            return self._forward_kv[i]
        return super()._kv(i)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n0, q = self.n_stored, key_states.shape[-2]
        self.store.append(key_states, value_states)
        self._track_new(q)
        self._gathered = None
        if q == 1:  # a decoding step: the attention wrapper gathers the selected slots (`attend_kv`)
            return self.store._frames()
        if n0 == 0:
            self._forward_kv = (key_states, value_states)
        else:
            k, v = self.store.view()
            self._forward_kv = (k.to(key_states.device), v.to(value_states.device))
        return self._forward_kv

    def keep(self, idx, visible=None, plan=None) -> None:
        self._forward_kv = self._gathered = None
        super().keep(idx, visible, plan)

    def _index_batch(self, fn):
        self._forward_kv = self._gathered = None
        super()._index_batch(fn)

    def reset(self):
        self._forward_kv = self._gathered = None
        super().reset()

    def attend_kv(self, idx, keys, values):
        """The keys and values a one-token step attends to: the slots `idx` (batch, kv_heads, k), or every slot
        (idx None), gathered from the frames."""
        if idx is None:
            b, h, n = self.positions.shape
            idx = torch.arange(n, device=self.positions.device).expand(b, h, n)
        g = self._gathered
        if g is None or g[0] is not idx:
            k, v = self.store.gather(idx)
            self._gathered = g = (idx, k, v)
        return g[1], g[2]

    def selected_keys(self, idx):
        return self.attend_kv(idx, None, None)[0]

    def key_slots(self, lo: int, hi: int) -> torch.Tensor:
        if self._forward_kv is not None:
            return self._forward_kv[0][:, :, lo:hi]
        return self.store.key_slots(lo, hi)

    def end_attention(self, selector=None, layer_idx: int | None = None, decoding: bool = False) -> None:
        """After a decoding step's attention, ask `selector` for the next step's slots (`predict_next`: only a
        selector that knows them one token ahead has it, AttentionPredictor) and copy their pages ahead
        (`prefetch_slots`), while the rest of the step computes; then release the forward's transient device
        copy and the step's gathered keys and values."""
        predict_next = getattr(selector, "predict_next", None)
        if decoding and predict_next is not None:
            ahead = predict_next(layer_idx, self)  # (batch, kv_heads, k) slot indices, or None: a dense step
            if ahead is not None:
                self.prefetch_slots(ahead)
        self._forward_kv = self._gathered = None

    def prefetch_slots(self, idx: torch.Tensor) -> None:
        """Copy ahead the pages of the slots `idx` (batch, kv_heads, k) the next step will attend to (see
        `OffloadStore.prefetch_slots`)."""
        self.store.prefetch_slots(idx)

    def offload_bytes(self) -> tuple[int, int]:
        """(bytes on the compute device, bytes on the host) of keys and values."""
        if not self.is_initialized:
            return 0, 0
        return self.store.device_nbytes(), self.store.host_nbytes()

    def stack_rows(self, rows, room: int = 0) -> None:
        raise NotImplementedError("offloaded layers are not stacked (the sweep's merged batch); decode per sample")
