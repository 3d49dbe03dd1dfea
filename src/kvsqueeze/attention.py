"""Routing a model's attention through kvsqueeze.

kvsqueeze registers the attention implementations `kvsqueeze_sdpa` and `kvsqueeze_eager` (their mask functions
are transformers' own `sdpa_mask` / `eager_mask`, so masks are unchanged), each wrapping the model's own kernel:

1. when the layer's cache is a `CompressedLayer` whose stored slots no longer line up with the mask transformers
   built (after eviction, with per-layer budgets, with padding slots), it builds the layer's own mask from the
   cache: every valid stored slot is in the past of every new query, so old slots are visible wherever they
   are valid and the new tokens keep transformers' causal + padding mask (the mask's last `q` columns);
2. it runs the wrapped kernel (sdpa stays sdpa: the model is never switched to eager);
3. at a decoding step, a cache `selector` (Quest, AttentionPredictor) may pick a subset of slots per kv head;
   only those keys and values are gathered and attended to; forwards of several tokens are shown to the
   selector's `observe` (AttentionPredictor starts its attention history from the prompt's last queries);
4. it hands the post-RoPE queries to the cache, which lets its method score the slots and evicts.

Query recorders (`record_queries`) see every layer's post-RoPE queries; Q-Filters calibration uses them.

The model is switched only while kvsqueeze needs it (it is never left switched):
- `attach(model)` (called by `CompressedCache(model, ...)`) adds a forward pre-hook and a forward hook
  (`always_call=True`) to the model and to each `PreTrainedModel` inside it. A forward whose cache (under
  `cache=` or `past_key_values=`) is a `CompressedCache` runs with `config._attn_implementation` set to
  `kvsqueeze_<impl>`; the original value is restored when the outermost such forward returns or raises. Every
  other forward (a `DynamicCache`, no cache, `generate_batch`'s paged cache) sees the model as loaded.
- `with patched(model):` switches for the duration of a block (restored on exit, exceptions included): what
  kvsqueeze's own cacheless passes use (Q-Filters calibration with `record_queries`).
- `patch(model)` is an explicit, permanent opt-in (the old behaviour: every forward goes through the wrapper,
  which passes non-kvsqueeze caches straight to the kernel; transformers' continuous batching then refuses the
  model until `unpatch`).
- `unpatch(model)` removes every trace: the hooks, the bookkeeping attribute, and a permanent switch.
"""

from __future__ import annotations

import contextlib
import sys
import threading

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .cache import MODEL_HOOKS, CompressedLayer, pending_layer
from .errors import KVSqueezeError

PREFIX = "kvsqueeze_"
_RECORDERS: list = []


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
    if layer.n_evicted == 0 and layer.valid is None and lines_up:
        return hf_mask
    window = layer.sliding_window
    if q_len == 1 and hf_mask is None and layer.valid is None and window is None:  # decoding, nothing to hide
        return None
    b = layer.keys.shape[0]
    device = layer.keys.device
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


def _gather_slots(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(b, h, n, d) -> (b, h, k, d) at slot indices idx (b, h, k)."""
    return t.gather(2, idx[..., None].expand(*idx.shape, t.shape[-1]))


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


def _wrap(inner_name: str):
    eager = inner_name == "eager"

    def attention(module, query, key, value, attention_mask, **kwargs):
        inner = _eager_of(module) if eager else sdpa_attention_forward
        for rec in _RECORDERS:
            rec(module, query)
        pending = pending_layer()
        layer = None
        if pending is not None:
            cache, layer_idx = pending
            layer = cache.layers[layer_idx]
            if getattr(module, "layer_idx", layer_idx) != layer_idx:
                raise KVSqueezeError("attention modules and cache layers are out of step")
        if not isinstance(layer, CompressedLayer):
            return inner(module, query, key, value, attention_mask, **kwargs)
        q_len = query.shape[2]
        valid_new = _new_tokens_valid(attention_mask, q_len)
        if valid_new is not None:
            layer.mark_invalid(valid_new)
        mask = _layer_mask(layer, attention_mask, q_len, query.shape[1], eager, query.dtype)
        selector = cache.selector
        if selector is not None and q_len == 1:
            idx = selector.select(layer_idx, layer, query)  # (batch, kv_heads, k) slot indices, or None: dense
            if idx is not None:
                key, value = _gather_slots(key, idx), _gather_slots(value, idx)
                mask = _gather_mask(mask, idx, query.shape[1], eager, query.dtype)
        elif selector is not None and hasattr(selector, "observe"):
            selector.observe(layer_idx, layer, query)  # prefill / appended tokens: AttentionPredictor's history
        out = inner(module, query, key, value, mask, **kwargs)
        cache.after_attention(module, layer_idx, query, kwargs.get("scaling"))
        return out

    return attention


for _name, _mask in (("sdpa", sdpa_mask), ("eager", eager_mask)):
    AttentionInterface.register(PREFIX + _name, _wrap(_name))
    AttentionMaskInterface.register(PREFIX + _name, _mask)


_STATE = "_kvsqueeze_routing"  # the model attribute holding the hooks and the saved implementations


def _configs(model) -> list:
    """Every distinct config object whose attention implementation the model's modules read."""
    found: dict[int, object] = {}
    todo = [model.config]
    todo += [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    try:
        todo.append(model.config.get_text_config())
    except Exception:  # pragma: no cover
        pass
    while todo:
        cfg = todo.pop()
        if cfg is None or id(cfg) in found or not hasattr(cfg, "_attn_implementation"):
            continue
        found[id(cfg)] = cfg
        todo += [getattr(cfg, k, None) for k in getattr(cfg, "sub_configs", {}) or {}]
    return list(found.values())


def _set_impl(cfg, value) -> None:
    if hasattr(cfg, "_attn_implementation_internal"):  # no recursion into sub-configs: each is set on its own
        cfg._attn_implementation_internal = value
    else:  # pragma: no cover - older config classes
        cfg._attn_implementation = value


def _check_impl(model) -> str:
    """The model's own attention implementation (sdpa or eager); `KVSqueezeError` when kvsqueeze cannot route it
    (another implementation, or a model class whose attention does not go through transformers'
    `AttentionInterface`, `_supports_attention_backend = False`, e.g. Falcon)."""
    if getattr(type(model), "_supports_attention_backend", True) is False:
        raise KVSqueezeError(f"{type(model).__name__} does not route its attention through transformers' "
                             "AttentionInterface, so kvsqueeze cannot compress its cache")
    impl = model.config._attn_implementation or "sdpa"
    if impl.startswith(PREFIX):
        return impl[len(PREFIX):]
    if impl not in ("sdpa", "eager"):
        raise KVSqueezeError(f"attention implementation {impl!r} is not supported; load the model with sdpa or eager")
    return impl


def _switch(model) -> list:
    """Route `model`'s attention through kvsqueeze; return what `_restore` needs to put it back."""
    _check_impl(model)
    saved = []
    for cfg in model.__dict__[_STATE]["configs"]:
        impl = cfg._attn_implementation
        saved.append((cfg, impl))
        if impl is None or impl in ("sdpa", "eager"):
            _set_impl(cfg, PREFIX + (impl or "sdpa"))
    return saved


def _restore(saved: list) -> None:
    for cfg, impl in saved:
        _set_impl(cfg, impl)


def _enter(st: dict) -> None:
    if st["depth"] == 0:
        st["saved"] = _switch(st["root"])
    st["depth"] += 1


def _exit(st: dict) -> None:
    if st["depth"] == 0:
        return
    st["depth"] -= 1
    if st["depth"] == 0:
        saved, st["saved"] = st["saved"], None
        _restore(saved)


def _pre_hook(module, args, kwargs):
    from .cache import CompressedCache
    from .compat import passed_cache

    st = module.__dict__.get(_STATE)
    if st is None:  # pragma: no cover - hooks outlived their state
        return
    on = isinstance(passed_cache(kwargs), CompressedCache)
    st["active"].setdefault(threading.get_ident(), []).append(on)  # per thread: generate_batch runs in its own
    if on:
        _enter(st)


def _post_hook(module, args, kwargs, output):
    st = module.__dict__.get(_STATE)
    stack = None if st is None else st["active"].get(threading.get_ident())
    if stack and stack.pop():
        _exit(st)


def _hooked(model) -> list:
    from transformers import PreTrainedModel

    return [m for m in model.modules() if m is model or isinstance(m, PreTrainedModel)]


def attach(model) -> None:
    """Make `model` route its attention through kvsqueeze during, and only during, forwards whose cache is a
    `CompressedCache` (idempotent; see the module docstring). The model's `config._attn_implementation` is
    unchanged outside those forwards. The hooks are plain functions that find their state on the module, so a
    `copy.deepcopy` of the model switches the copy, not the original.

    Raises `KVSqueezeError` when the model's attention implementation is neither sdpa nor eager.
    """
    _check_impl(model)
    if _STATE in model.__dict__:
        return
    st = {"root": model, "depth": 0, "saved": None, "active": {}, "configs": _configs(model)}
    for m in _hooked(model):
        if _STATE in m.__dict__:  # a sub-model attached on its own before: its hooks stay, its state is shared
            continue
        m.__dict__[_STATE] = st
        m.register_forward_pre_hook(_pre_hook, with_kwargs=True)
        m.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)


def _detach(model) -> dict | None:
    """Remove the hooks and state `attach` put on `model` and its sub-models; return the root's state."""
    root_state = model.__dict__.get(_STATE)
    for m in model.modules():
        if m.__dict__.pop(_STATE, None) is None:
            continue
        for name in ("_forward_pre_hooks", "_forward_hooks"):
            hooks = getattr(m, name)
            for key in [k for k, fn in hooks.items() if fn in (_pre_hook, _post_hook)]:
                del hooks[key]
                for extra in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
                              "_forward_hooks_always_called"):
                    getattr(m, extra, {}).pop(key, None)
    return root_state


@contextlib.contextmanager
def patched(model):
    """Route `model`'s attention through kvsqueeze inside the block (every forward, whatever its cache), and
    restore the original implementation on exit, exceptions included. Nests with itself and with the hooks of
    `attach`.

    Raises `KVSqueezeError` when the model's attention implementation is neither sdpa nor eager.
    """
    attach(model)
    st = model.__dict__[_STATE]
    _enter(st)
    try:
        yield model
    finally:
        _exit(st)


def patch(model) -> None:
    """Route `model`'s attention through kvsqueeze permanently (explicit opt-in, idempotent; the wrapper passes
    caches that are not kvsqueeze's straight to the kernel). Not needed to use a `CompressedCache`: the cache
    switches the model for its own forwards only. Transformers' continuous batching (`generate_batch`) refuses a
    permanently switched model; `unpatch(model)` undoes it.

    Raises `KVSqueezeError` when the model's attention implementation is neither sdpa nor eager.
    """
    impl = model.config._attn_implementation or "sdpa"
    if impl.startswith(PREFIX):
        return
    _check_impl(model)
    name = PREFIX + impl
    try:
        model.set_attn_implementation(name)
    except Exception:  # older or stricter versions: set the config field directly
        for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            cfg._attn_implementation = name
    if model.config._attn_implementation != name:
        raise KVSqueezeError(f"could not route {type(model).__name__}'s attention through kvsqueeze")


def unpatch(model) -> None:
    """Remove every trace of kvsqueeze from `model`: the forward hooks `attach` added (a `CompressedCache`
    built on it before must be rebuilt, or the model re-attached, before its next forward) and a permanent
    `patch`. The attention implementation is back to the one the model was loaded with."""
    st = _detach(model)
    if st is not None and st["saved"] is not None:
        _restore(st["saved"])
    impl = model.config._attn_implementation or ""
    if impl.startswith(PREFIX):
        try:
            model.set_attn_implementation(impl[len(PREFIX) :])
        except Exception:
            for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
                cfg._attn_implementation = impl[len(PREFIX) :]


@contextlib.contextmanager
def record_queries(fn):
    """Call fn(module, query) with every layer's post-RoPE queries (batch, heads, q, head_dim) in the block."""
    _RECORDERS.append(fn)
    try:
        yield
    finally:
        _RECORDERS.remove(fn)


MODEL_HOOKS.append(attach)  # every CompressedCache built attaches its model (see cache.MODEL_HOOKS)
