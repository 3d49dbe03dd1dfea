"""The name transformers gives the cache argument, for every kvsqueeze call that hands a cache to a model.

transformers 5.24 renamed `past_key_values` to `cache` (model forwards, `prepare_inputs_for_generation`,
`generate()`; outputs carry `.cache`). The old name still works there with a FutureWarning, and goes away in
5.40 for forwards and in 6.0 for `generate()`; 5.17-5.23 (the GPU machine has 5.17) know only
`past_key_values`. kvsqueeze never spells the name itself: it asks this module, which reads it off the model's
forward signature, so the same code runs without the warning on both sides of the rename.

    >>> model(ids, **cache_kwargs(model, cache))           # forward
    >>> model.generate(ids, **cache_kwargs(model, cache))  # generate() takes the same name as the forward
    >>> output_cache(out)                                  # out.cache (5.24+) or out.past_key_values
"""

from __future__ import annotations

import inspect

NEW, OLD = "cache", "past_key_values"
_BY_CLASS: dict[type, str] = {}


def _default_name() -> str:
    """The name for the installed transformers when a forward's signature does not tell (e.g. `**kwargs` only)."""
    try:
        from transformers.models.llama.modeling_llama import LlamaModel

        return NEW if NEW in inspect.signature(LlamaModel.forward).parameters else OLD
    except Exception:  # pragma: no cover - llama always ships with transformers
        return OLD


CACHE_ARG = _default_name()  # "cache" on transformers >= 5.24, "past_key_values" before


def cache_arg(model=None) -> str:
    """The keyword `model`'s forward (and `generate()`) takes the cache under: "cache" or "past_key_values".

    Decided once per model class from `inspect.signature(type(model).forward)`; a forward naming neither (or
    `model=None`) gets `CACHE_ARG`, the installed transformers' name.
    """
    if model is None:
        return CACHE_ARG
    cls = type(model)
    name = _BY_CLASS.get(cls)
    if name is None:
        try:
            params = inspect.signature(cls.forward).parameters
        except (TypeError, ValueError, AttributeError):
            params = {}
        name = NEW if NEW in params else OLD if OLD in params else CACHE_ARG
        _BY_CLASS[cls] = name
    return name


def cache_kwargs(model, cache) -> dict:
    """`{name: cache}` with the name `model` accepts: `model(ids, **cache_kwargs(model, cache))`."""
    return {cache_arg(model): cache}


def passed_cache(kwargs: dict):
    """The cache a forward was called with (under either name), or None."""
    cache = kwargs.get(NEW)
    return kwargs.get(OLD) if cache is None else cache


def output_cache(out):
    """The cache a model output carries (`out.cache` on 5.24+, `out.past_key_values` before), or None."""
    if NEW in out:  # ModelOutput is a dict of its non-None fields: no deprecated-alias access
        return out[NEW]
    return out.get(OLD) if hasattr(out, "get") else getattr(out, OLD, None)
