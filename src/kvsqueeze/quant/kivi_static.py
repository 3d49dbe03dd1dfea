"""KIVI storage with fixed capacity for the static, compiled decode step (issue 12, item 2).

The eager `KIVIStore` (kivi.py) grows its segments and residual by concatenation; `StaticKIVI` holds the same data
in preallocated buffers, stacked over the layers, so that one decoding step only writes into them (no allocation,
no host synchronisation, no data-dependent Python branch: capturable by `torch.compile(fullgraph=True,
mode="reduce-overhead")`, CUDA graphs). Layout (L layers, b rows, h kv heads, d = head_dim, CQ the quantized
capacity in tokens, a multiple of the group G; RC = R + G the residual capacity; p = 8 / bits codes per byte):

    kc : (L, b, h, CQ / p, d) uint8     key codes, packed along tokens (KIVI's layout; kivi.py, packing.py)
    ks, kz : (L, b, h, CQ / G, d) bf16  per-channel key scales / zero points, one row per group of G tokens
    vc : (L, b, h, CQ / p, d) uint8     value codes, packed along tokens
    vs, vz : (L, b, h, CQ, d / G_v) bf16  per-token value scales / zero points
    kr, vr : (L, b, h, RC, d)           the full-precision residual (the model's dtype), a ring per layer:
                                        residual token j (oldest first) in slot (r0 + j) mod RC
    valid : (L, b, h, CQ + RC) bool     which slots attention may see: quantized slots, then residual slots
    nq, nr : (L,) long                  quantized tokens held (a multiple of G) and residual tokens held per layer
    r0 : (L,) long                      the residual ring's start (a multiple of G)

A step (the `StaticSlots` protocol of `storage/static.py`, so `StaticCompressedCache` drives both):
`begin_token` claims residual slot (r0 + nr) mod RC of every layer (`nr += 1`, its valid bit set); `write_kv`
writes the layer's new key / value there (`index_put_` at a device index; every write is in place when
compiled); the attention (`attention`) reads the quantized slots [0, nq) and the nr residual tokens from r0 on;
`end_token` then quantizes the residual's oldest G tokens of every layer (slots [r0, r0 + G): RC and r0 are
multiples of G, so they never wrap) into the next packed group (slot group nq / G) *every step* and only counts
them where the residual is full (nr == R + G: nq += G, their residual slots freed, r0 += G mod RC, nr = R) --
writing a group that is not counted yet is harmless (its slots are invalid), so no step depends on a host-side
decision. The ring moves its start instead of shifting the R + G residual tokens of every layer down by G, which
the compiled step did every step (a select between the buffers and their roll, written back whole: some 60 MB of
memory traffic per step at 32 layers on Llama-3.1-8B's shapes, whether a layer flushed or not); the attention does
not depend on the order of the tokens it sees (their positions are in the keys' RoPE). This is the eager rule exactly
(`QuantStore.commit` after each forward: R..R+G-1 tokens stay in full precision, the oldest G quantized as one
key group), with the same `quantize` call, so the static and eager caches hold the same codes.

Bytes held (`nbytes`): every buffer at capacity: per token and kv head d*bits/8 (keys) + d*bits/8 (values)
+ 2*2*d/G (key scales and zeros) + 2*2*d/G_v (value scales and zeros), plus the residual buffers RC*d*2*s
(s the model dtype's size) -- what the eager `KIVIStore.tensors()` counts, at the static capacity.

The attention: `kernel="triton"` runs the fused split-KV kernel over the packed buffers with the lengths read on
the device (`kernels/kivi_decode.kivi_decode_static`; the masks only where a slot inside the lengths is hidden,
e.g. left padding); any other kernel dequantizes the whole capacity with torch and runs two matrix products
(the reference path, any device).
"""

from __future__ import annotations

import torch

from ..errors import KVSqueezeError
from ..kernels.slot_decode import grouped_matmul_decode
from ..storage.static import _static
from .kivi import KIVIStore, channel_group
from .packing import PER_CHANNEL, PER_TOKEN, QTensor, quantize


def _ar(n: int, dim: int, ndim: int, device) -> torch.Tensor:
    """arange(n) shaped to broadcast along `dim` of `ndim` dims (an index grid for `index_put_`)."""
    return torch.arange(n, device=device).view([n if i == dim else 1 for i in range(ndim)])


class StaticKIVI:
    """KIVI buffers of every layer at fixed capacity (see the module docstring for the layout and the step).

    n_layers, batch, kv_heads, head_dim: the cache's shape; q_capacity: quantized tokens the buffers hold (rounded
    up to a multiple of `group`); bits, group, value_group, residual: the KIVI settings (`KIVIStore`'s); dtype:
    the model's (residual) dtype. Raises KVSqueezeError for settings the static path does not hold."""

    def __init__(self, n_layers: int, batch: int, kv_heads: int, head_dim: int, q_capacity: int, bits: int,
                 group: int, value_group: int, residual: int, dtype, device):
        per = 8 // bits
        if group % per or residual % group:
            raise KVSqueezeError(f"KIVI with group {group}, residual {residual} at {bits} bits cannot be held by the "
                                 "static decode path (the group must be a multiple of the codes per byte)")
        self.n_layers, self.batch, self.kv_heads, self.head_dim = n_layers, batch, kv_heads, head_dim
        self.bits, self.group, self.residual = bits, group, residual
        self.value_group = channel_group(head_dim, value_group)
        self.q_capacity = -(-max(q_capacity, 1) // group) * group
        self.res_capacity = residual + group
        self.capacity = self.q_capacity + self.res_capacity  # the slot mask's width
        self.dtype = dtype
        L, b, h, d, cq = n_layers, batch, kv_heads, head_dim, self.q_capacity
        u8, bf = torch.uint8, torch.bfloat16
        z = lambda *s, dt: _static(torch.zeros(*s, dtype=dt, device=device))  # noqa: E731
        self.kc, self.vc = z(L, b, h, cq // per, d, dt=u8), z(L, b, h, cq // per, d, dt=u8)
        self.ks, self.kz = z(L, b, h, cq // group, d, dt=bf), z(L, b, h, cq // group, d, dt=bf)
        self.vs, self.vz = z(L, b, h, cq, d // self.value_group, dt=bf), z(L, b, h, cq, d // self.value_group, dt=bf)
        self.kr, self.vr = z(L, b, h, self.res_capacity, d, dt=dtype), z(L, b, h, self.res_capacity, d, dt=dtype)
        self.valid = z(L, b, h, self.capacity, dt=torch.bool)
        self.nq = z(L, dt=torch.long)
        self.nr = z(L, dt=torch.long)
        self.r0 = z(L, dt=torch.long)  # the residual ring's start per layer
        self.w = z(L, dt=torch.long)  # the residual slot of the token being written, per layer
        self.masked = False  # whether a slot inside the lengths is hidden (the fused kernel then reads the masks)
        self.priority = None  # never evicts while decoding (StaticSlots' protocol)

    # --- filling from the eager store -------------------------------------------------------------------------
    def load(self, layer_idx: int, store: KIVIStore, valid: torch.Tensor | None) -> None:
        """Copy one layer's eager `KIVIStore` in (its one packed segment and its residual, in slot order) with
        the layer's slot mask `valid` (b, h, n) bool or None (all held). Raises KVSqueezeError for a store laid
        out otherwise (other bits / groups, more tokens than the capacity, an uncommitted residual)."""
        if (store.bits, store.group, store.residual, channel_group(self.head_dim, store.value_group)) != \
                (self.bits, self.group, self.residual, self.value_group):
            raise KVSqueezeError(f"layer {layer_idx}: KIVI settings differ between layers; the static decode path "
                                 "holds one setting for the whole cache")
        segs = store.segments
        seg = segs[0] if segs else None
        if len(segs) > 1:
            seg = segs[0]
            for s in segs[1:]:
                seg = seg.cat(s)
        nq = seg.n if seg is not None else 0
        kr, vr = store.residual_keys, store.residual_values
        nr = kr.shape[2]
        if nq + self.group > self.q_capacity or nr >= self.res_capacity:
            raise KVSqueezeError(f"layer {layer_idx} holds {nq} quantized and {nr} residual tokens, more than the "
                                 f"static KIVI buffers take ({self.q_capacity - self.group} and "
                                 f"{self.res_capacity - 1}); commit the store first")
        if seg is not None and (seg.k.packed_along != "token" or seg.v.packed_along != "token"):
            raise KVSqueezeError("the static KIVI buffers take codes packed along tokens")
        per = 8 // self.bits
        i = layer_idx
        for buf in (self.kc, self.vc, self.ks, self.kz, self.vs, self.vz, self.kr, self.vr, self.valid):
            buf[i].zero_()
        if seg is not None:
            self.kc[i, :, :, :nq // per] = seg.k.codes
            self.ks[i, :, :, :nq // self.group] = seg.k.scale
            self.kz[i, :, :, :nq // self.group] = seg.k.zero
            self.vc[i, :, :, :nq // per] = seg.v.codes
            self.vs[i, :, :, :nq] = seg.v.scale
            self.vz[i, :, :, :nq] = seg.v.zero
        self.kr[i, :, :, :nr] = kr.to(self.dtype)
        self.vr[i, :, :, :nr] = vr.to(self.dtype)
        held = torch.ones(kr.shape[0], kr.shape[1], nq + nr, dtype=torch.bool, device=kr.device) if valid is None \
            else valid.to(torch.bool)
        self.valid[i, :, :, :nq] = held[:, :, :nq]
        self.valid[i, :, :, self.q_capacity:self.q_capacity + nr] = held[:, :, nq:]
        self.masked = self.masked or not bool(held.all())
        self.nq[i] = nq
        self.nr[i] = nr
        self.r0[i] = 0

    # --- one decoding token (graph-friendly) --------------------------------------------------------------------
    def begin_token(self, position: torch.Tensor, priority: torch.Tensor | None = None) -> None:
        """Claim residual slot (r0 + nr) mod RC of every layer for the next token (`position` is not stored: the
        keys carry their RoPE; `priority` is ignored: no decode-time eviction)."""
        self.nr.add_(1)
        self.w.copy_((self.r0 + self.nr - 1) % self.res_capacity)
        L, b, h = self.n_layers, self.batch, self.kv_heads
        dev = self.w.device
        at = (_ar(L, 0, 3, dev), _ar(b, 1, 3, dev), _ar(h, 2, 3, dev), (self.w + self.q_capacity).view(L, 1, 1))
        self.valid.index_put_(at, torch.ones((), dtype=torch.bool, device=dev))

    def write_kv(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor,
                 priority: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one token's keys / values (b, h, 1, d) of layer `layer_idx` into its claimed residual slot; return
        the layer's residual buffers (b, h, RC, d) (the attention reads the packed buffers through `attention`)."""
        i = layer_idx
        # index_put_ on the stacked buffers (as storage/static.py's writes): inductor re-inplaces it on the compiled
        # step's inputs, while `self.kr[i].index_copy_` on a layer's view compiled to a copy of that layer's whole
        # residual buffer before the write (every layer, keys and values, every step)
        dev = self.w.device
        at = (torch.full((1, 1), i, dtype=torch.long, device=dev), _ar(self.batch, 0, 2, dev),
              _ar(self.kv_heads, 1, 2, dev), self.w[i].view(1, 1))
        self.kr.index_put_(at, keys[:, :, 0].to(self.dtype))
        self.vr.index_put_(at, values[:, :, 0].to(self.dtype))
        return self.kr[i], self.vr[i]

    def end_token(self, evict=False, max_victims: int = 0) -> None:
        """After the token's attention: quantize every layer's oldest G residual tokens into packed group nq / G,
        and where the residual is full (R + G tokens) count them (nq += G, their residual slots freed, the ring's
        start r0 moved by G, nr = R); see the module docstring."""
        L, b, h, d, G = self.n_layers, self.batch, self.kv_heads, self.head_dim, self.group
        per = 8 // self.bits
        rows, ngv, cq = G // per, d // self.value_group, self.q_capacity
        full = self.nr == self.res_capacity  # (L,)
        dev = full.device
        oldest = (self.r0[:, None] + torch.arange(G, device=dev)).view(L, 1, 1, G, 1)  # their residual slots
        qk = quantize(self.kr.gather(3, oldest.expand(L, b, h, G, d)).reshape(L * b, h, G, d), self.bits,
                      PER_CHANNEL, G, pack_along="token")
        qv = quantize(self.vr.gather(3, oldest.expand(L, b, h, G, d)).reshape(L * b, h, G, d), self.bits,
                      PER_TOKEN, self.value_group, pack_along="token")
        g = self.nq // G  # (L,) the next group slot
        # every write below is an index_put_ (advanced-index assignment), never a scatter_: inductor re-inplaces
        # index_put on the compiled step's inputs, while a scatter_ compiled to a copy of the whole buffer back
        # each step (see storage/static.py StaticSlots.begin_token)
        lbh = (_ar(L, 0, 5, dev), _ar(b, 1, 5, dev), _ar(h, 2, 5, dev))
        r_at = (*lbh, (g[:, None] * rows + torch.arange(rows, device=dev)).view(L, 1, 1, rows, 1), _ar(d, 4, 5, dev))
        self.kc.index_put_(r_at, qk.codes.view(L, b, h, rows, d))
        self.vc.index_put_(r_at, qv.codes.view(L, b, h, rows, d))
        g_at = (*lbh, g.view(L, 1, 1, 1, 1), _ar(d, 4, 5, dev))
        self.ks.index_put_(g_at, qk.scale.view(L, b, h, 1, d))
        self.kz.index_put_(g_at, qk.zero.view(L, b, h, 1, d))
        t = (g[:, None] * G + torch.arange(G, device=dev)).view(L, 1, 1, G, 1)
        t_at = (*lbh, t, _ar(ngv, 4, 5, dev))
        self.vs.index_put_(t_at, qv.scale.view(L, b, h, G, ngv))
        self.vz.index_put_(t_at, qv.zero.view(L, b, h, G, ngv))
        # where full: the quantized slots take the oldest residual tokens' valid bits, and those residual slots
        # are freed
        fb = full.view(L, 1, 1, 1)
        lbh4 = tuple(x[..., 0] for x in lbh)
        at_old = (*lbh4, cq + oldest[..., 0])
        old_valid = self.valid[at_old]  # (L, b, h, G)
        self.valid.index_put_((*lbh4, t[..., 0]), old_valid & fb)
        self.valid.index_put_(at_old, old_valid & ~fb)
        self.r0.copy_(torch.where(full, (self.r0 + G) % self.res_capacity, self.r0))
        self.nq.add_(full.long() * G)
        self.nr.sub_(full.long() * G)

    # --- attention --------------------------------------------------------------------------------------------
    def dequantized(self, layer_idx: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer_idx`'s keys and values (b, h, CQ + RC, d) in `dtype`: the packed capacity dequantized
        (as `QTensor.dequantize`, the eager view's rule) followed by the residual buffers; `valid[layer_idx]` says
        which count."""
        i, d = layer_idx, self.head_dim
        k = QTensor(self.kc[i], self.ks[i], self.kz[i], self.bits, PER_CHANNEL, self.group, d, "token")
        v = QTensor(self.vc[i], self.vs[i], self.vz[i], self.bits, PER_TOKEN, self.value_group, d, "token")
        return (torch.cat([k.dequantize(dtype), self.kr[i].to(dtype)], 2),
                torch.cat([v.dequantize(dtype), self.vr[i].to(dtype)], 2))

    def attention(self, layer_idx: int, query: torch.Tensor, scaling: float | None, kernel: str | None) -> torch.Tensor:
        """One decode query (b, hq, 1, d) over layer `layer_idx`; returns (b, 1, hq, d). kernel "triton": the fused
        kernel (`kivi_decode_static`); otherwise dequantize + two matrix products per kv-head group, softmax in
        float32 (the reference path)."""
        i, cq = layer_idx, self.q_capacity
        if kernel == "triton":
            from ..kernels.kivi_decode import kivi_decode_static

            qv = self.valid[i, :, :, :cq] if self.masked else None
            rv = self.valid[i, :, :, cq:] if self.masked else None
            out = kivi_decode_static(query[:, :, 0], self.kc[i], self.ks[i], self.kz[i], self.vc[i], self.vs[i],
                                     self.vz[i], self.kr[i], self.vr[i], self.nq[i:i + 1], self.nr[i:i + 1],
                                     self.bits, self.group, self.value_group, scale=scaling, q_valid=qv, r_valid=rv,
                                     r0=self.r0[i:i + 1])
            return out[:, None]
        keys, values = self.dequantized(i, query.dtype)
        return grouped_matmul_decode(query, keys, values, self.valid[i][:, :, None, :], scaling)

    # --- reading ----------------------------------------------------------------------------------------------
    def held_counts(self) -> torch.Tensor:
        """(layers, b, kv_heads) long: entries each (layer, row, kv head) holds now."""
        return self.valid.sum(-1)

    def nbytes(self) -> int:
        """Bytes of keys and values held at capacity: packed codes, scales, zero points and the residual."""
        return sum(t.numel() * t.element_size()
                   for t in (self.kc, self.ks, self.kz, self.vc, self.vs, self.vz, self.kr, self.vr))

    def table_nbytes(self) -> int:
        """Bytes of the bookkeeping (valid, nq, nr, the ring's start, the write index)."""
        return sum(t.numel() * t.element_size() for t in (self.valid, self.nq, self.nr, self.r0, self.w))
