"""Switching a model's attention to kvsqueeze's, scoped to the forwards that use a kvsqueeze cache.

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
- `with static_attention(model):` switches to the static decode step's attention (`kvsqueeze_static_*`,
  runtime/static.py) for one step of a `StaticDecoder`; a forward given a static cache by anyone else (e.g.
  `model.generate`) is prepared and switched by the hooks. Inside a compiled forward whose cache is not
  kvsqueeze's the hooks do nothing.

How the attention call finds its cache: the pre-hook on the model pushes the forward's cache (the `cache=` /
`past_key_values=` argument) on a per-thread stack held in the routing state, and every attention module of the
model carries a reference to that state (`module.__dict__["_kvsqueeze_routing"]`); `current_cache(module)` reads
the top of the stack. No module-global or thread-local variable carries a cache.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from ..compat import passed_cache
from ..errors import KVSqueezeError

PREFIX = "kvsqueeze_"
STATIC_PREFIX = "kvsqueeze_static_"  # the static decode step's attention (runtime/static.py)
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


def routes(cache) -> bool:
    """Whether `cache` is one whose forwards go through kvsqueeze (a `CompressedCache`: class attribute
    `kvsqueeze_routes`)."""
    return bool(getattr(type(cache), "kvsqueeze_routes", False))


def _static(cache) -> bool:
    """Whether `cache` is a static cache (runtime/static.py). Its decoder's steps switch the model themselves
    (`static_attention`) and the hooks do nothing then (no thread lookup inside a compiled step); any other forward
    given one (e.g. by `model.generate`) is driven by the hooks (`_static_enter` / `_static_exit`)."""
    return bool(getattr(type(cache), "kvsqueeze_static", False))


def _static_enter(st, cache, args, kwargs):
    """The outermost forward given a static cache outside its decoder: the cache prepares the step (claims the write
    slots, replaces `attention_mask` with its slot mask and `position_ids` with its positions; raises
    KVSqueezeError for more than one new token) and the model is switched to the static attention until the
    forward returns."""
    if cache.driven:
        return None
    if cache.hook_depth > 0:
        cache.hook_depth += 1
        return None
    kwargs = cache.prepare_forward(args, kwargs)
    cache.hook_saved = _switch_static(st["root"])
    cache.hook_depth = 1
    return args, kwargs


def _static_exit(cache) -> None:
    if cache.driven or cache.hook_depth == 0:
        return
    cache.hook_depth -= 1
    if cache.hook_depth == 0:
        saved, cache.hook_saved = cache.hook_saved, None
        _restore(saved)
        cache.finish_forward()


def _switch_static(model, configs=None, kernel=None) -> list:
    impl = _check_impl(model)
    saved = []
    for cfg in configs if configs is not None else _configs(model):
        saved.append((cfg, cfg._attn_implementation))
        _set_impl(cfg, STATIC_PREFIX + (kernel or impl))
    return saved


def _compiling() -> bool:
    """Whether torch.compile is tracing this call (the hooks then stay out of forwards that are not kvsqueeze's:
    the thread lookup below cannot be traced, and would break e.g. transformers' compiled StaticCache on a model
    a CompressedCache was ever built on)."""
    return torch.compiler.is_compiling()


def _pre_hook(module, args, kwargs):
    st = module.__dict__.get(_STATE)
    if st is None:  # pragma: no cover - hooks outlived their state
        return
    cache = passed_cache(kwargs)
    if _static(cache):
        return _static_enter(st, cache, args, kwargs)
    if _compiling() and not routes(cache):
        return  # a compiled forward with another cache (transformers' StaticCache): nothing to route or push
    on = routes(cache)
    tid = threading.get_ident()  # per thread: generate_batch runs in its own
    st["active"].setdefault(tid, []).append(cache if on else None)
    if on:
        _enter(st)


def _post_hook(module, args, kwargs, output):
    cache = passed_cache(kwargs)
    if _static(cache):
        _static_exit(cache)
        return
    if _compiling() and not routes(cache):
        return  # as the pre-hook: nothing was pushed
    st = module.__dict__.get(_STATE)
    stack = None if st is None else st["active"].get(threading.get_ident())
    if stack and stack.pop() is not None:
        _exit(st)


def current_cache(module):
    """The kvsqueeze cache of the forward running `module` in this thread (the innermost routed forward of the
    model the module belongs to), or None (a forward with another cache, or a model never attached)."""
    st = module.__dict__.get(_STATE)
    if st is None:
        return None
    stack = st["active"].get(threading.get_ident())
    if not stack:
        return None
    for cache in reversed(stack):
        if cache is not None:
            return cache
    return None


def _hooked(model) -> list:
    from transformers import PreTrainedModel

    return [m for m in model.modules() if m is model or isinstance(m, PreTrainedModel)]


def _attention_modules(model) -> list:
    """The attention modules (those with a `layer_idx`): they read their forward's cache from the shared state."""
    return [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]


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
    for m in _attention_modules(model):  # no hooks: they only read the state
        m.__dict__.setdefault(_STATE, st)


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


def attention_configs(model) -> list:
    """Every config object whose attention implementation `model`'s modules read (what a switch sets)."""
    return _configs(model)


@contextlib.contextmanager
def static_attention(model, configs: list | None = None, kernel: str | None = None):
    """Inside the block, `model`'s attention is the static decode step's (`kvsqueeze_static_sdpa` /
    `kvsqueeze_static_eager` / `_matmul` / `_triton`, registered by runtime/static.py): every config the model reads is switched, and
    restored on exit, exceptions included. Called around each step of a `StaticDecoder`, outside the compiled
    function (the compiled graph then guards on the switched value); `configs` (from `attention_configs`, computed
    once by the caller) saves walking the model at every step; `kernel` names another static kernel than the
    model's own implementation (e.g. "matmul"). Raises `KVSqueezeError` when the model's
    implementation is neither sdpa nor eager."""
    if _check_impl(model).startswith("static_"):  # nested: already switched
        yield model
        return
    saved = _switch_static(model, configs, kernel)
    try:
        yield model
    finally:
        _restore(saved)


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


