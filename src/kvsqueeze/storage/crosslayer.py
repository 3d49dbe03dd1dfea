"""Cross-layer storage: KV state shared by several layers (MiniCache's merged pairs, xKV's shared SVD basis).

A cross-layer scheme is storage, like quantization: a method only plans it (`CrossLayerPlan`: which layers form a
group and the scheme's parameters, `methods/minicache.py`, `methods/xkv.py`); the runtime applies the plan once the
last layer of a group has been prefilled (`CompressedCache.after_attention` -> `apply_plan`), and from then on each
layer of the group holds a `CrossLayerStore`:

    prefix   the slots held at the merge, reconstructed on read from
               - `shared`  a `SharedKV`: tensors held ONCE for the whole group (MiniCache: the merged unit
                           directions; xKV: the token-side factor A), referenced by every member's store;
               - `own`     the member's own tensors (MiniCache: per-token magnitudes, the retained / unmatched
                           entries and which slots are merged; xKV: the member's coefficient block B_l);
    tail     a `DenseStore` of the slots appended after the merge (the question, decoded tokens), full precision.

Memory: `tensors()` names the shared tensors `shared.*`; `CacheStats` (runtime `CompressedCache.stats`) and the
16-bit sizes (`evaluation/sizes.py`) count every tensor once across layers (`unique_tensors`, by storage pointer,
offset, shape and dtype), so a group's shared state is counted once, not once per member.

Any operation that changes which slots are held (`keep`: an eviction after the merge, a chunked prefill's next
chunk; `index_batch`; assigning keys / values) first dissolves the member into a plain `DenseStore` of its
reconstruction (its share of the group is then its own; the other members keep theirs). The runtime re-applies
the plan after each prefill forward, so a chunked prefill merges again what every chunk left: tokens merged by an
earlier chunk are merged again from their reconstruction (a second approximation, as a quantized store
re-quantizes after a later eviction).

Scope: full-attention `CompressedLayer`s with full-precision storage (`DenseStore`); a group holding a sliding-window
layer, a quantized store or an uninitialised layer, or whose layers are on different devices (a model split by
`device_map` at that group), is left as it is (`apply_plan` skips it).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch

from ..errors import KVSqueezeError
from .stores import DenseStore, KVStore


@dataclass
class CrossLayerPlan:
    """What a method asks of the storage: `kind` ("minicache" or "xkv"), the layer `groups` (tuples of adjacent
    layer indices, each merged once its last layer is prefilled) and the scheme's `params` (keyword arguments of
    `share_minicache` / `share_xkv`)."""

    kind: str
    groups: list[tuple[int, ...]]
    params: dict = field(default_factory=dict)

    def group_ending_at(self, layer_idx: int) -> tuple[int, ...] | None:
        """The group whose last layer is `layer_idx` (None if none ends there)."""
        for g in self.groups:
            if g and g[-1] == layer_idx:
                return g
        return None


class SharedKV:
    """Tensors held once for a group of layers (`tensors`: name -> tensor), referenced by each member's store."""

    def __init__(self, tensors: dict[str, torch.Tensor], layers: tuple[int, ...]):
        self.tensors = tensors
        self.layers = layers

    def to(self, device) -> None:
        """Move the shared tensors to `device` (once: members calling it after the first find them there)."""
        self.tensors = {k: (t if t.device == torch.device(device) else t.to(device, non_blocking=True))
                        for k, t in self.tensors.items()}


def unique_tensors(groups) -> list[torch.Tensor]:
    """Every tensor of `groups` (an iterable of name -> tensor dicts, e.g. each layer's `kv_tensors()`), each
    counted once: tensors sharing storage pointer, offset, shape, stride and dtype are the same held memory (a
    cross-layer store's shared tensors appear in every member's dict)."""
    seen, out = set(), []
    for d in groups:
        for t in d.values():
            if t is None:
                continue
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if t.numel() and key in seen:
                continue
            seen.add(key)
            out.append(t)
    return out


class CrossLayerStore(KVStore):
    """A member of a cross-layer group (see the module docstring): a reconstructed prefix from `shared` + `own`,
    then a full-precision `tail`. Subclasses implement `_reconstruct() -> (keys, values)`, each
    (batch, kv_heads, m, head_dim) in the model's dtype, m = `self.m` prefix slots (empty slots read as zeros)."""

    ragged_heads = True

    def __init__(self, shared: SharedKV, own: dict[str, torch.Tensor], m: int, tail_like: torch.Tensor,
                 held: torch.Tensor | None):
        self.shared = shared
        self.own = own
        self.m = m
        self.prefix_held = held  # (b, h, m) bool: prefix slots that hold an entry (None: all)
        b, h, _, d = tail_like.shape
        self.dtype = tail_like.dtype
        self.tail = DenseStore(tail_like.new_empty(b, h, 0, d), tail_like.new_empty(b, h, 0, d))
        self._view = None

    # --- reading ---------------------------------------------------------------------------------------------
    def _reconstruct(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shared is None:
            return self.tail.view()
        if self._view is not None:
            k, v = self._view[0](), self._view[1]()
            if k is not None and v is not None and k.shape[2] == self.m + self.tail.shape[2]:
                return k, v
        k, v = self._reconstruct()
        if self.tail.shape[2]:
            tk, tv = self.tail.view()
            k, v = torch.cat([k, tk], dim=2), torch.cat([v, tv], dim=2)
        self._view = (weakref.ref(k), weakref.ref(v))
        return k, v

    # --- changes -----------------------------------------------------------------------------------------------
    def dissolve(self) -> None:
        """Become a plain `DenseStore` of the reconstruction (this member's share of the group becomes its own)."""
        if self.shared is None:
            return
        k, v = self.view()
        held = self.prefix_held
        if self.tail.held is not None or held is not None:
            tail_held = self.tail.held if self.tail.held is not None else torch.ones(
                *self.tail.shape[:3], dtype=torch.bool, device=k.device)
            held = torch.cat([held if held is not None else torch.ones(*k.shape[:2], self.m, dtype=torch.bool,
                                                                      device=k.device), tail_held], dim=2)
        store = DenseStore(k, v)
        if held is not None and not bool(held.all()):
            idx = torch.arange(k.shape[2], device=k.device).expand(*k.shape[:3])
            store.keep(idx, held)
        self.tail, self.shared, self.own, self.m, self.prefix_held, self._view = store, None, {}, 0, None, None

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.tail.append(keys, values)
        self._view = None

    def keep(self, idx: torch.Tensor, held: torch.Tensor | None = None) -> None:
        self.dissolve()
        self.tail.keep(idx, held)

    def index_batch(self, fn) -> None:
        self.dissolve()
        self.tail.index_batch(fn)

    def set_dense(self, which: int, t: torch.Tensor) -> None:
        self.dissolve()
        self.tail.set_dense(which, t)

    # --- memory ------------------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Own tensors, the shared ones (`shared.*`, the same objects in every member) and the tail's (`tail.*`)."""
        out = dict(self.own)
        if self.shared is not None:
            out.update({f"shared.{k}": t for k, t in self.shared.tensors.items()})
        out.update({f"tail.{k}": t for k, t in self.tail.tensors().items()})
        return out

    def offload(self) -> None:
        self.own = {k: t.to("cpu", non_blocking=True) for k, t in self.own.items()}
        if self.shared is not None:
            self.shared.to("cpu")
        self.prefix_held = None if self.prefix_held is None else self.prefix_held.to("cpu")
        self.tail.offload()
        self._view = None

    def prefetch(self, device) -> None:
        self.own = {k: t.to(device, non_blocking=True) for k, t in self.own.items()}
        if self.shared is not None:
            self.shared.to(device)
        self.prefix_held = None if self.prefix_held is None else self.prefix_held.to(device)
        self.tail.prefetch(device)
        self._view = None


# --- MiniCache ------------------------------------------------------------------------------------------------
def slerp_directions(xa: torch.Tensor, xb: torch.Tensor, t: float):
    """MiniCache's merge of paired state vectors (Liu et al., 2024, arXiv:2405.14366, Eq. 3).

    xa, xb: (..., d) (layer l-1's and layer l's state of the same token). Returns (e, na, nb, omega): the merged
    unit direction e = sin((1-t) W)/sin W * xa/|xa| + sin(t W)/sin W * xb/|xb| (..., d) float32, the magnitudes
    |xa|, |xb| (...,) float32 and the angle W = arccos(cos(xa, xb)) in [0, pi] (...,). Nearly parallel pairs
    (W < 1e-6) take the normalised linear interpolation instead (the SLERP weights are 0/0 there)."""
    xa, xb = xa.float(), xb.float()
    na, nb = xa.norm(dim=-1), xb.norm(dim=-1)
    ua = xa / na.clamp_min(1e-12)[..., None]
    ub = xb / nb.clamp_min(1e-12)[..., None]
    cos = (ua * ub).sum(-1).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    small = omega < 1e-6
    safe = torch.where(small, torch.ones_like(sin), sin)
    wa = torch.where(small, torch.full_like(sin, 1.0 - t), torch.sin((1.0 - t) * omega) / safe)
    wb = torch.where(small, torch.full_like(sin, t), torch.sin(t * omega) / safe)
    e = wa[..., None] * ua + wb[..., None] * ub
    e = torch.where(small[..., None], e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12), e)
    return e, na, nb, omega


def retention_mask(omega: torch.Tensor, paired: torch.Tensor, gamma: float) -> torch.Tensor:
    """MiniCache's token retention (module docstring of `methods/minicache.py`): of the paired slots, those whose
    angular distance d = W / pi lies in the top `gamma` of its row's range, d > d_max - (d_max - d_min) * gamma,
    with d_min, d_max over the row's paired slots of every kv head.

    omega, paired: (batch, kv_heads, n) float / bool. Returns (batch, kv_heads, n) bool (retained; never an
    unpaired slot). gamma 0 retains nothing, gamma 1 every paired slot."""
    d = omega / math.pi
    inf = torch.tensor(float("inf"), device=d.device)
    d_min = torch.where(paired, d, inf).flatten(1).amin(1)  # (b,)
    d_max = torch.where(paired, d, -inf).flatten(1).amax(1)
    thr = d_max - (d_max - d_min) * gamma
    if gamma >= 1.0:
        return paired.clone()
    return paired & (d > thr[:, None, None])


def _partners(layer_a, layer_b) -> tuple[torch.Tensor, torch.Tensor]:
    """For each slot of `layer_a`: whether `layer_b` holds a valid slot of the same token in the same (row, kv head),
    and that slot's index. Returns (paired (b, h, na) bool, idx (b, h, na) long)."""
    pa, pb = layer_a.positions.long(), layer_b.positions.long()
    va = torch.ones_like(pa, dtype=torch.bool) if layer_a.valid is None else layer_a.valid
    vb = torch.ones_like(pb, dtype=torch.bool) if layer_b.valid is None else layer_b.valid
    big = torch.iinfo(torch.long).max
    key_b = pb.masked_fill(~vb, big)
    sorted_b, order = key_b.sort(dim=-1, stable=True)
    at = torch.searchsorted(sorted_b, pa.contiguous()).clamp_max(max(sorted_b.shape[-1] - 1, 0))
    if sorted_b.shape[-1] == 0:
        return torch.zeros_like(va), torch.zeros_like(pa)
    found = sorted_b.gather(-1, at) == pa
    paired = va & found
    return paired, order.gather(-1, at)


class MiniCacheStore(CrossLayerStore):
    """One layer of a MiniCache pair: slots where `merged` reconstruct as magnitude * the pair's shared unit
    direction (`shared.<half>_dir`, (merged entries, d), in (row, head, slot) order of the pair's first layer, the
    same order in both layers); the other held slots are this layer's own entries (`<half>_own`, full precision,
    packed in (row, head, slot) order). Own tensors per half: `<half>_mag` (merged entries,), `<half>_merged`
    (b, h, m) bool, `<half>_own` (own entries, d)."""

    def _reconstruct(self):
        b, h, m = self.own["keys_merged"].shape
        out = []
        for half in ("keys", "values"):
            d = self.own[f"{half}_own"].shape[-1]
            x = torch.zeros(b, h, m, d, dtype=self.dtype, device=self.own[f"{half}_own"].device)
            merged = self.own[f"{half}_merged"]
            x[merged] = (self.shared.tensors[f"{half}_dir"].float() * self.own[f"{half}_mag"].float()[:, None]).to(
                self.dtype)
            own = ~merged if self.prefix_held is None else (~merged & self.prefix_held)
            x[own] = self.own[f"{half}_own"]
            out.append(x)
        return out[0], out[1]


def share_minicache(layers, t: float = 0.6, gamma: float = 0.05, group: tuple[int, ...] = ()) -> None:
    """Merge two adjacent layers' KV state (MiniCache, arXiv:2405.14366; the rule: `methods/minicache.py`).

    layers: [layer l-1, layer l] (`CompressedLayer`s, full precision, the same batch and kv heads). Per (row, kv
    head), a slot of layer l-1 is paired with layer l's slot of the same token (both valid); after an eviction
    that kept different tokens in the two layers, unpaired slots stay their layer's own. Paired slots are merged
    (`slerp_directions`) unless retained (`retention_mask`, keys and values decided separately). Replaces both
    layers' stores by `MiniCacheStore`s sharing the merged directions. Raises ValueError for other than 2 layers."""
    if len(layers) != 2:
        raise ValueError(f"MiniCache merges pairs of layers, got {len(layers)}")
    la, lb = layers
    paired, idx = _partners(la, lb)
    ka, va_ = la.store.view()
    kb, vb_ = lb.store.view()
    dtype = ka.dtype
    own_a, own_b, shared = {}, {}, {}
    held_a = la.valid
    held_b = lb.valid
    for half, xa, xb in (("keys", ka, kb), ("values", va_, vb_)):
        xb_at = xb.gather(2, idx[..., None].expand(*idx.shape, xb.shape[-1]))  # layer l's partner of each a-slot
        e, na, nb, omega = slerp_directions(xa, xb_at, t)
        keep = retention_mask(omega, paired, gamma)
        merged_a = paired & ~keep  # (b, h, na)
        nb_slots = lb.positions.shape[-1]
        merged_b = torch.zeros(*lb.positions.shape[:2], nb_slots + 1, dtype=torch.bool, device=merged_a.device)
        merged_b.scatter_(2, idx.masked_fill(~merged_a, nb_slots), merged_a)  # unmerged a-slots: a spare column
        merged_b = merged_b[..., :nb_slots].contiguous()
        _check_order(idx, merged_a, nb_slots)
        # the merged entries, in a's (row, head, slot) order: b's partners come in the same order (positions grow
        # along the slots of both layers)
        shared[f"{half}_dir"] = e[merged_a].to(dtype)
        own_a[f"{half}_mag"] = na[merged_a].to(dtype)
        own_a[f"{half}_merged"] = merged_a
        own_b[f"{half}_mag"] = nb[merged_a].to(dtype)  # a's order of the pairs is b's order (`_check_order`)
        own_b[f"{half}_merged"] = merged_b
        ha = ~merged_a if held_a is None else (~merged_a & held_a)
        hb = ~merged_b if held_b is None else (~merged_b & held_b)
        own_a[f"{half}_own"] = xa[ha]
        own_b[f"{half}_own"] = xb[hb]
    sh = SharedKV(shared, tuple(group))
    for layer, own, held in ((la, own_a, held_a), (lb, own_b, held_b)):
        m = layer.positions.shape[-1]
        k = layer.store.view()[0]
        layer.store = MiniCacheStore(sh, own, m, k, held)
        layer.table.version += 1  # key values changed (decode-time selectors recompute their summaries)


def _check_order(idx: torch.Tensor, merged_a: torch.Tensor, nb_slots: int) -> None:
    """The merged pairs, listed in the first layer's (row, head, slot) order, must list the second layer's slots in
    its own (row, head, slot) order too (both layers hold their slots in position order), so one shared tensor
    serves both without an index. Raises ValueError otherwise (slots out of position order)."""
    b, h, _ = idx.shape
    rows = torch.arange(b * h, device=idx.device).view(b, h, 1).expand_as(idx)
    flat = (rows * nb_slots + idx)[merged_a]
    if flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
        raise ValueError("MiniCache: a layer's slots are not in position order; cannot share one merged tensor")


# --- xKV --------------------------------------------------------------------------------------------------------
def xkv_ranks(n_tokens: int, n_layers: int, features: int, keep: float, value_share: float = 0.6):
    """xKV's ranks (r_k, r_v) for a group of `n_layers` layers holding `n_tokens` tokens of `features` (kv heads *
    head_dim) each, so that the factors hold `keep` of the group's full keys + values:
    r_k + r_v = 2 keep L T F / (T + L F) (a rank r holds T*r + r*L*F numbers per half), split (1 - value_share) :
    value_share (the paper's ranks 512 : 768 for keys : values give 0.6). Each rank is clamped to
    [1, min(T, L F)]."""
    total = 2.0 * keep * n_layers * n_tokens * features / (n_tokens + n_layers * features)
    cap = min(n_tokens, n_layers * features)
    rk = int(max(1, min(cap, math.floor(total * (1.0 - value_share)))))
    rv = int(max(1, min(cap, math.floor(total * value_share))))
    return rk, rv


class XKVStore(CrossLayerStore):
    """One layer of an xKV group: per row r, per half, X_l[r] = A[r] @ B_l[r] with A[r] (tokens_r, rank) the
    group's shared token-side factor (`shared.<half>_a<r>`) and B_l[r] (rank, kv_heads * head_dim) this layer's
    coefficients (`<half>_b<r>`); the rows' tokens are the slots where `shared.rows_held` (b, m) is True."""

    def _reconstruct(self):
        held = self.shared.tensors["rows_held"]
        b, m = held.shape
        h = self.heads
        out = []
        for half in ("keys", "values"):
            d = self.own[f"{half}_b0"].shape[-1] // h
            x = torch.zeros(b, h, m, d, dtype=self.dtype, device=held.device)
            for r in range(b):
                a = self.shared.tensors[f"{half}_a{r}"]
                rec = (a.float() @ self.own[f"{half}_b{r}"].float()).to(self.dtype)  # (tokens_r, h * d)
                x[r][:, held[r]] = rec.view(-1, h, d).transpose(0, 1)
            out.append(x)
        return out[0], out[1]


def share_xkv(layers, keep: float = 0.5, value_share: float = 0.6, group: tuple[int, ...] = ()) -> None:
    """Factor a group of layers' keys and values through one shared low-rank token basis (xKV, arXiv:2503.18893;
    the rule: `methods/xkv.py`).

    layers: the group's `CompressedLayer`s (full precision). Every layer and kv head must hold the same tokens
    (the same positions and the same validity, per row): raises KVSqueezeError otherwise (xKV concatenates the
    layers' features token by token). Per row r: X = [X_1 | ... | X_L] (tokens_r, L * kv_heads * head_dim),
    float32 SVD, ranks from `xkv_ranks`; A = U_r S_r is shared, B_l = the l-th column block of V_r^T is layer l's.
    keep >= 1 leaves the layers as they are."""
    if keep >= 1.0:
        return
    pos0, val0 = layers[0].positions, layers[0].valid
    for layer in layers:
        same = layer.positions.shape == pos0.shape and bool((layer.positions == pos0).all())
        vl = layer.valid
        same = same and ((vl is None and val0 is None) or (vl is not None and val0 is not None
                                                            and bool((vl == val0).all())))
        if not same:
            raise KVSqueezeError("xkv: the layers of a group hold different tokens (an eviction kept different "
                                 "ones); xKV factors the same tokens of every layer and kv head, use it without "
                                 "eviction")
    b, h, m = pos0.shape
    rows_held = torch.ones(b, m, dtype=torch.bool, device=pos0.device)
    if val0 is not None:
        if not bool((val0 == val0[:, :1]).all()):
            raise KVSqueezeError("xkv: kv heads hold different tokens (head-wise budgets); xKV needs the same "
                                 "tokens in every kv head")
        rows_held = val0[:, 0]
    views = [layer.store.view() for layer in layers]
    dtype = views[0][0].dtype
    d = views[0][0].shape[-1]
    shared, owns = {"rows_held": rows_held}, [{} for _ in layers]
    for i, half in enumerate(("keys", "values")):
        for r in range(b):
            sel = rows_held[r]
            x = torch.cat([v[i][r][:, sel].transpose(0, 1).reshape(int(sel.sum()), h * d) for v in views], dim=1)
            t = x.shape[0]
            rk, rv = xkv_ranks(t, len(layers), h * d, keep, value_share)
            rank = rk if half == "keys" else rv
            if t == 0:
                rank = 0
            u, s, vh = torch.linalg.svd(x.float(), full_matrices=False)
            shared[f"{half}_a{r}"] = (u[:, :rank] * s[:rank]).to(dtype)
            for j, own in enumerate(owns):
                own[f"{half}_b{r}"] = vh[:rank, j * h * d : (j + 1) * h * d].to(dtype)
    sh = SharedKV(shared, tuple(group))
    held = None if val0 is None else val0
    for layer, own, (k, _) in zip(layers, owns, views):
        store = XKVStore(sh, own, m, k, held)
        store.heads = h
        layer.store = store
        layer.table.version += 1


SCHEMES = {"minicache": share_minicache, "xkv": share_xkv}


def apply_plan(plan: CrossLayerPlan, layers, layer_idx: int) -> bool:
    """Apply `plan` to the group whose last layer is `layer_idx`, if every member is an initialised full-attention
    `CompressedLayer` with full-precision storage (a `DenseStore`, or a member merged by an earlier prefill forward,
    which is dissolved and merged again) and all are on one device (shared tensors live on one device; a group
    across a split model's device boundary keeps its layers' own KV). Returns whether a group was merged."""
    from .layer import CompressedLayer

    group = plan.group_ending_at(layer_idx)
    if group is None:
        return False
    members = [layers[i] for i in group]
    for layer in members:
        if not isinstance(layer, CompressedLayer) or not layer.is_initialized or layer.sliding_window:
            return False
        if not isinstance(layer.store, (DenseStore, CrossLayerStore)):
            return False
    if len({layer.device for layer in members}) > 1:
        return False
    for layer in members:
        if isinstance(layer.store, CrossLayerStore):
            layer.store.dissolve()
    SCHEMES[plan.kind](members, group=group, **plan.params)
    return True
