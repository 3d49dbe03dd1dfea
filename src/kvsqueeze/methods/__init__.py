"""Registry of methods: `get_method("snapkv", ratio=0.5)`; one file per method, the paper's rule in its docstring."""

from __future__ import annotations

from ..errors import KVSqueezeError
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
    m.name: m for m in (Full, StreamingLLM, H2O, SnapKV, PyramidKV, TOVA, KNorm, Random, QFilters)
}


def get_method(name: str, **kwargs) -> Method:
    """Build a method by name; kwargs are its fields (ratio, budget, exempt_layers, decode_every, ...)."""
    cls = METHODS.get(name.lower().replace("-", "_"))
    if cls is None:
        raise KVSqueezeError(f"unknown method {name!r}; choose from: {', '.join(METHODS)}")
    return cls(**kwargs)


__all__ = ["METHODS", "Method", "ScoreInputs", "get_method", *[c.__name__ for c in METHODS.values()]]
