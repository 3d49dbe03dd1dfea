"""Registry of methods: `get_method("snapkv", ratio=0.5)`; one file per method, the paper's rule in its docstring."""

from __future__ import annotations

from dataclasses import fields

from ..errors import KVSqueezeError
from .adakv import AdaKV
from .base import Method, ScoreInputs
from .full import Full
from .h2o import H2O
from .knorm import KNorm
from .pyramidkv import PyramidKV
from .qfilters import QFilters
from .random import Random
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM
from .tova import TOVA

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (Full, StreamingLLM, H2O, SnapKV, PyramidKV, TOVA, KNorm, Random, QFilters, AdaKV)
}


def get_method(name: str, **kwargs) -> Method:
    """Build a method by name; kwargs are its fields (ratio, budget, exempt_layers, compression_interval, ...).

    A wrapper names its scorer after a colon: "adakv:tova" is `AdaKV(scorer=TOVA())`, "pyramidkv:knorm" is
    `PyramidKV(scorer=KNorm())` (the budget fields go to the wrapper). Raises `KVSqueezeError` for an unknown name
    or a scorer given to a method that takes none."""
    outer, _, inner = name.partition(":")
    cls = METHODS.get(outer.strip().lower().replace("-", "_"))
    if cls is None:
        raise KVSqueezeError(f"unknown method {name!r}; choose from: {', '.join(METHODS)}")
    if inner:
        if "scorer" not in {f.name for f in fields(cls)}:
            raise KVSqueezeError(f"method {outer!r} takes no scorer (only {', '.join(wrappers())} do): {name!r}")
        kwargs = {**kwargs, "scorer": get_method(inner)}
    return cls(**kwargs)


def wrappers() -> list[str]:
    """Names of the methods that wrap a scorer (`name:scorer`)."""
    return [n for n, c in METHODS.items() if "scorer" in {f.name for f in fields(c)}]


__all__ = ["METHODS", "Method", "ScoreInputs", "get_method", *[c.__name__ for c in METHODS.values()]]
