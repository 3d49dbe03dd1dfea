"""The attention wrapper: masks from the cache's slots, decode-time selection, then compression after attention.

kvsqueeze registers the attention implementations `kvsqueeze_sdpa` and `kvsqueeze_eager` (their mask functions
are transformers' own `sdpa_mask` / `eager_mask`, so masks are unchanged), each wrapping the model's own kernel:

1. when the layer's cache is a `CompressedLayer` whose stored slots no longer line up with the mask transformers
   built (after eviction, with per-layer budgets, with padding slots), it builds the layer's own mask from the
   cache: every valid stored slot is in the past of every new query, so old slots are visible wherever they
   are valid and the new tokens keep transformers' causal + padding mask (the mask's last `q` columns);
2. it runs the wrapped kernel (sdpa stays sdpa: the model is never switched to eager); a decoding step over a
   right-aligned stack of caches of different sizes (`CompressedLayer.row_runs`, the sweep's merged answer batch)
   runs it row by row over each row's own slots, with the mask each row alone would get, so padding is never
   read and finished rows (`CompressedCache.idle_rows`) are skipped; a prefill chunk over a layer whose stored
   slots are all visible (no padding, no hidden slot, no sliding window) and no longer aligned (evicted) runs as
   two mask-free flash calls merged by their log-sum-exp instead (`chunk_attention`: no mask of chunk x stored
   slots, no copy of the stored keys per query head, so a chunk's transient does not grow with what the layer
   holds beyond the attention itself);
3. at a decoding step, a cache `selector` (Quest, AttentionPredictor) may pick a subset of slots per kv head;
   only those keys and values are gathered and attended to; forwards of several tokens are shown to the
   selector's `observe` (AttentionPredictor starts its attention history from the prompt's last queries);
4. it hands the post-RoPE queries to the cache, which lets its method score the slots and evicts;
5. it tells the layer its attention call is over (`end_attention(selector, layer_idx, decoding)`). The selected
   keys and values come from the layer (`attend_kv`) and the end of the call goes to it, the same two calls
   whatever the layer: where the slots live (an offloaded layer's host tier and device frames, its prefetch of
   the next step's pages) is the layer's concern (`storage/offload.py`), not the wrapper's.

Query recorders (`record_queries`) see every layer's post-RoPE queries; Q-Filters calibration uses them.
When the model is switched, and how the wrapper finds its forward's cache: `routing.py`.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from ..errors import KVSqueezeError
from ..storage.layer import CompressedLayer
from .routing import PREFIX, current_cache

_RECORDERS: list = []

# Whether a prefill chunk over a layer whose stored slots are all visible attends as two mask-free flash calls
# merged by their log-sum-exp (`chunk_attention`: no (chunk x stored) mask, no copy of the stored keys per query
# head) instead of one masked call over everything (True), or through the model's kernel with the layer's mask
# (False: the reference). Only after an eviction: an aligned layer keeps transformers' own path. Both give the
# same outputs (tests/test_prefill_long.py); bench/prefill_chunks.py times them.
SPLIT_CHUNKS = True

# Whether a decoding step over a right-aligned stack of caches (`CompressedLayer.row_runs`) attends row by row (True)
# or as one masked batch (False: the general path, padding read and masked). Both give the same logits
# (tests/test_sweep_room.py); `bench/sweep_vs_reprefill.py --answer-attention` times the two.
ROW_BY_ROW = True


def _eager_of(module):
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise KVSqueezeError(f"{type(module).__name__} has no eager_attention_forward; use attn_implementation='sdpa'")
    return fn


def _layer_mask(layer: CompressedLayer, hf_mask, q_len: int, n_heads: int, eager: bool, dtype):
    """The mask over (stored old slots + new tokens) for this layer, or the HF mask when it is already right."""
    n_total = layer.n_stored
    n_old = n_total - q_len
    lines_up = hf_mask is None or hf_mask.shape[-1] == n_total
    if layer.aligned and lines_up:
        return hf_mask
    window = layer.sliding_window
    if q_len == 1 and hf_mask is None and layer.valid is None and window is None:  # decoding, nothing to hide
        return None
    b = layer.positions.shape[0]
    device = layer.positions.device  # the compute device (the layer's stored keys need not be on it)
    if hf_mask is None:
        new = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()[None, None]
    elif hf_mask.dtype == torch.bool:
        new = hf_mask[..., -q_len:]
    else:
        new = hf_mask[..., -q_len:] == 0
    if layer.valid is None:
        old = torch.ones(1, 1, 1, n_old, dtype=torch.bool, device=device)
    else:  # per kv head -> per query head
        old = layer.valid[:, :, None, :n_old].repeat_interleave(n_heads // layer.valid.shape[1], dim=1)
    if window:  # sliding layer: an old slot is seen by the queries within `window` positions of it
        q_pos = layer.cumulative_length - q_len + torch.arange(q_len, device=device)
        inside = layer.positions[:, :, None, :n_old] > q_pos[None, None, :, None] - window
        old = old & inside.repeat_interleave(n_heads // inside.shape[1], dim=1)
    heads = max(old.shape[1], new.shape[1])
    mask = torch.cat(
        [old.expand(b, heads, q_len, n_old), new.expand(b, heads, q_len, q_len)], dim=-1
    )
    if heads == 1 and not eager and bool(mask.all()):
        return None if q_len == 1 else mask
    if eager:
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def _gather_mask(mask, idx: torch.Tensor, n_heads: int, eager: bool, dtype):
    """The decode-step mask restricted to the selected slots (None stays None)."""
    if mask is None:
        return None
    b, hk, k = idx.shape
    m = mask if mask.dtype == torch.bool else mask == 0
    m = m.expand(b, -1, 1, -1)
    if m.shape[1] == 1:
        m = m.expand(b, hk, 1, m.shape[-1])
    elif m.shape[1] != hk:  # per query head -> one row per kv head (rows agree within a group)
        m = m[:, :: n_heads // hk]
    m = m.gather(3, idx[:, :, None, :]).repeat_interleave(n_heads // hk, dim=1)
    if eager:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
    return m


def _new_tokens_valid(hf_mask, q_len: int):
    """(batch, q) bool: which new tokens are real (read off the last query row of the HF mask)."""
    if hf_mask is None:
        return None
    row = hf_mask[:, 0, -1, -q_len:]
    return row if row.dtype == torch.bool else row == 0


def _attend_row_runs(inner, module, query, key, value, runs: list[int], idle: frozenset, kwargs, hf_mask=None,
                     eager: bool = False):
    """Attention over a batch whose rows see contiguous runs of slots (`CompressedLayer.row_runs`: a right-aligned
    stack of caches of different sizes): each row attends to its own run alone, with the mask a batch-1 cache of
    that row gets (`_layer_mask`: none for one new token; for q new tokens every old slot visible and the new
    tokens' own causal part of transformers' mask), so the padding in front of shorter rows is never read. Rows in
    `idle` (finished rows whose output the caller ignores, `CompressedCache.idle_rows`) are not attended: their
    output is zeros. query (batch, heads, q, head_dim), key / value (batch, kv_heads, n, head_dim), hf_mask
    transformers' mask or None; returns the wrapped kernel's (output (batch, q, heads, head_dim), None)."""
    q_len = query.shape[2]
    n = key.shape[2]
    outs = []
    for i, start in enumerate(runs):
        if i in idle:
            outs.append(None)
            continue
        mask = None
        if q_len > 1:
            if hf_mask is None:
                new = torch.ones(q_len, q_len, dtype=torch.bool, device=key.device).tril()[None, None]
            else:
                new = hf_mask[i : i + 1, :1, :, -q_len:]
                new = new if new.dtype == torch.bool else new == 0
            old = torch.ones(1, 1, q_len, n - q_len - start, dtype=torch.bool, device=key.device)
            mask = torch.cat([old, new.expand(1, 1, q_len, q_len)], dim=-1)
            if eager:
                mask = torch.zeros(mask.shape, dtype=query.dtype, device=key.device).masked_fill(
                    ~mask, torch.finfo(query.dtype).min)
        outs.append(inner(module, query[i : i + 1], key[i : i + 1, :, start:], value[i : i + 1, :, start:], mask,
                          **kwargs)[0])
    ref = next((o for o in outs if o is not None), None)
    if ref is None:  # every row idle
        ref = query.new_zeros(1, query.shape[2], query.shape[1], value.shape[-1])
    zero = ref.new_zeros(ref.shape)
    return torch.cat([zero if o is None else o for o in outs]), None


def _flash_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """torch's flash attention with its log-sum-exp: q (b, h, s, d), k / v (b, h, n, d), the same heads ->
    (out (b, h, s, d) in q's dtype, lse (b, h, s) float32). `causal`: query i sees keys 0..i (s == n here)."""
    if q.device.type == "cuda":
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    else:
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out[0], out[1][..., : q.shape[2]]


def _split_supported(query: torch.Tensor) -> bool:
    """Whether `chunk_attention` can run on this query's device and dtype (torch's flash kernels: on CUDA fp16 /
    bf16 with head_dim a multiple of 8 up to 256, flash available and enabled; on the CPU any float dtype)."""
    if query.device.type == "cpu":
        return query.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    if query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    d = query.shape[-1]
    return (d % 8 == 0 and d <= 256 and torch.backends.cuda.flash_sdp_enabled()
            and torch.backends.cuda.is_flash_attention_available())


def chunk_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_len: int,
                    scale: float | None = None) -> torch.Tensor:
    """Attention of a prefill chunk over a layer's stored slots, all visible, and its own tokens, causal.

    query (b, hq, q, d); key, value (b, hk, n_old + q, d): the stored slots (every one visible to every query:
    a compressed layer's kept slots are all in the chunk's past) followed by the chunk's own q tokens, which see
    each other causally. Returns (b, q, hq, d), as transformers' `sdpa_attention_forward`.

    Two mask-free flash calls (FlashAttention's split into blocks merged by the softmax's log-sum-exp, Dao et al.
    2022; flash-decoding's merge of splits): (1) the chunk's queries over the stored slots, the hq / hk query heads
    sharing a kv head laid out as one longer query sequence (GQA without repeating keys); (2) the chunk over its
    own tokens, causal (its keys repeated per query head: q tokens only). out = sum_i o_i exp(lse_i - lse),
    lse = log(exp(lse_1) + exp(lse_2)), in float32. Nothing of size q x n_old is built (transformers' path
    builds a (q, n_old + q) mask and copies the stored keys and values per query head, hq / hk times).
    """
    b, hq, _, d = query.shape
    hk = key.shape[1]
    rep = hq // hk
    n_old = key.shape[2] - q_len
    scale = d ** -0.5 if scale is None else scale
    q_packed = query.reshape(b, hk, rep * q_len, d)  # query heads j * rep .. j * rep + rep - 1 share kv head j
    o1, l1 = _flash_lse(q_packed, key[:, :, :n_old], value[:, :, :n_old], False, scale)
    k_new, v_new = key[:, :, n_old:], value[:, :, n_old:]
    if rep > 1:
        k_new = k_new.repeat_interleave(rep, dim=1)
        v_new = v_new.repeat_interleave(rep, dim=1)
    o2, l2 = _flash_lse(query, k_new, v_new, True, scale)
    l1 = l1.reshape(b, hq, q_len)
    lse = torch.logaddexp(l1, l2)
    out = o1.reshape(b, hq, q_len, d).float() * (l1 - lse).exp()[..., None]
    out += o2.float() * (l2 - lse).exp()[..., None]
    return out.to(query.dtype).transpose(1, 2).contiguous()


def _splits(layer: CompressedLayer, query, key, value, valid_new, kwargs, eager: bool) -> bool:
    """Whether this forward's attention on `layer` is a prefill chunk `chunk_attention` computes exactly: several
    new tokens, none padding, after stored slots all visible (no `valid` mask, no sliding window) that are no longer
    the contiguous past transformers' mask describes (an eviction ran: while the layer is `aligned` the model's own
    path stays, bit for bit a DynamicCache's), no softcap, no
    dropout, the sdpa wrapper, keys and values of one head_dim, and a device / dtype torch's flash kernels take."""
    q_len = query.shape[2]
    return (SPLIT_CHUNKS and not eager and q_len > 1 and key.shape[2] > q_len and not layer.aligned
            and layer.table.valid is None
            and value.shape[-1] == key.shape[-1]
            and not layer.sliding_window and (valid_new is None or bool(valid_new.all()))
            and kwargs.get("softcap") is None and not kwargs.get("dropout") and kwargs.get("position_bias") is None
            and not kwargs.get("output_attentions") and query.shape[1] % key.shape[1] == 0
            and _split_supported(query))


def _wrap(inner_name: str):
    eager = inner_name == "eager"

    def attention(module, query, key, value, attention_mask, **kwargs):
        inner = _eager_of(module) if eager else sdpa_attention_forward
        for rec in _RECORDERS:
            rec(module, query)
        cache = current_cache(module)
        layer = None
        if cache is not None and cache.awaiting is not None:
            layer_idx = cache.attend()
            layer = cache.layers[layer_idx]
            if getattr(module, "layer_idx", layer_idx) != layer_idx:
                raise KVSqueezeError("attention modules and cache layers are out of step")
        if not isinstance(layer, CompressedLayer):
            return inner(module, query, key, value, attention_mask, **kwargs)
        q_len = query.shape[2]
        valid_new = _new_tokens_valid(attention_mask, q_len)
        if valid_new is not None:
            layer.mark_invalid(valid_new)
        selector = cache.selector
        if ROW_BY_ROW and selector is None and (q_len == 1 or valid_new is None or bool(valid_new.all())):
            runs = layer.row_runs()
            if runs is not None and len(runs) == query.shape[0]:
                out = _attend_row_runs(inner, module, query, key, value, runs, cache.idle_rows, kwargs,
                                       attention_mask, eager)
                cache.after_attention(module, layer_idx, query, kwargs.get("scaling"))
                return out
        if selector is None and _splits(layer, query, key, value, valid_new, kwargs, eager):
            out = chunk_attention(query, key, value, q_len, kwargs.get("scaling"))
            cache.after_attention(module, layer_idx, query, kwargs.get("scaling"))
            layer.end_attention(selector, layer_idx, decoding=False)
            return out, None
        mask = _layer_mask(layer, attention_mask, q_len, query.shape[1], eager, query.dtype)
        if selector is not None and q_len == 1:
            idx = selector.select(layer_idx, layer, query)  # (batch, kv_heads, k) slot indices, or None: dense
            key, value = layer.attend_kv(idx, key, value)  # the layer gathers them where it holds them
            if idx is not None:
                mask = _gather_mask(mask, idx, query.shape[1], eager, query.dtype)
        elif selector is not None and hasattr(selector, "observe"):
            selector.observe(layer_idx, layer, query)  # prefill / appended tokens: AttentionPredictor's history
        out = inner(module, query, key, value, mask, **kwargs)
        cache.after_attention(module, layer_idx, query, kwargs.get("scaling"))
        layer.end_attention(selector, layer_idx, decoding=q_len == 1)  # where the slots live is the layer's concern
        return out

    return attention


for _name, _mask in (("sdpa", sdpa_mask), ("eager", eager_mask)):
    AttentionInterface.register(PREFIX + _name, _wrap(_name))
    AttentionMaskInterface.register(PREFIX + _name, _mask)


@contextlib.contextmanager
def record_queries(fn):
    """Call fn(module, query) with every layer's post-RoPE queries (batch, heads, q, head_dim) in the block."""
    _RECORDERS.append(fn)
    try:
        yield
    finally:
        _RECORDERS.remove(fn)

