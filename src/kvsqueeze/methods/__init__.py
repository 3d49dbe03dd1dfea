"""Registry of methods: `get_method("snapkv", compression_ratio=0.5)`; one file per method, the paper's rule in its
docstring."""

from __future__ import annotations

from dataclasses import fields

from ..errors import KVSqueezeError
from .adakv import AdaKV
from .base import Method, ScoreInputs
from .d2o import D2O
from .ems import EMS
from .full import Full
from .h2o import H2O
from .knorm import KNorm
from .kvcrush import KVCrush
from .kvmerger import KVMerger
from .mikv import MiKV, PrecisionSplit
from .minicache import MiniCache
from .prefixkv import PrefixKV
from .pyramidkv import PyramidKV
from .qfilters import QFilters
from .random import Random
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM
from .tova import TOVA
from .windowkv import WindowKV
from .xkv import XKV
from .zipcache import ZipCacheSaliency

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (Full, StreamingLLM, H2O, SnapKV, PyramidKV, TOVA, KNorm, Random, QFilters, AdaKV, MiKV,
                        ZipCacheSaliency, KVMerger, D2O, EMS, MiniCache, XKV, KVCrush, WindowKV, PrefixKV)
}


# What `--methods all` runs: every method except MiKV's wrapper, which only chooses the high-precision tokens of
# MiKV's storage (`--quant mikv-*`; alone it would evict by its inner method's scores, a duplicate row).
ALL: list[str] = [n for n in METHODS if n != "mikv"]


def get_method(name: str, **kwargs) -> Method:
    """Build a method by name; kwargs are its fields (compression_ratio, budget, exempt_layers,
    compression_interval, ...). `compression_ratio` is the fraction of tokens removed (kvpress's name: 0.75 keeps a
    quarter).

    A wrapper names its scorer after a colon: "adakv:tova" is `AdaKV(scorer=TOVA())`, "pyramidkv:knorm" is
    `PyramidKV(scorer=KNorm())` (the budget fields go to the wrapper). Raises `KVSqueezeError` for an unknown name,
    a scorer given to a method that takes none, or the old argument name `ratio` (now `compression_ratio`)."""
    if "ratio" in kwargs:
        raise KVSqueezeError("get_method: `ratio` was renamed `compression_ratio` (the fraction of tokens removed, "
                             f"kvpress's name): get_method({name!r}, compression_ratio={kwargs['ratio']!r})")
    outer, _, inner = name.partition(":")
    lookup = lambda n: METHODS.get(n.strip().lower().replace("-", "_"))  # noqa: E731
    cls = lookup(outer)
    if cls is None:
        raise KVSqueezeError(f"unknown method {name!r}; choose from: {', '.join(METHODS)}")
    if inner:
        if "scorer" not in {f.name for f in fields(cls)}:
            raise KVSqueezeError(f"method {outer!r} takes no scorer (only {', '.join(wrappers())} do): {name!r}")
        inner_cls = lookup(inner)
        if inner_cls is not None and ("scorer" in {f.name for f in fields(inner_cls)} or inner_cls is MiKV
                                      or hasattr(inner_cls, "cross_layer_plan")):
            raise KVSqueezeError(f"{inner!r} wraps a method itself and cannot be the scorer in {name!r}; give a "
                                 f"scorer such as snapkv, tova, knorm or qfilters")
        if inner_cls is None:
            raise KVSqueezeError(f"unknown scorer {inner!r} in {name!r} (the name after the colon is the scorer); "
                                 f"choose from: {', '.join(METHODS)}")
        kwargs = {**kwargs, "scorer": get_method(inner)}
    return cls(**kwargs)


def for_storage(method: Method | None, qspec) -> Method | None:
    """The method a cache runs when `method` is composed with the quantized storage `qspec` (a
    `kvsqueeze.quant.QuantSpec`, or None: full precision). Never silently replaces what was asked:

    - no scheme, KIVI, GEAR: `method` itself (the scheme only changes how the kept tokens are held; a merging
      method's merged entries are quantized once, at the commit);
    - a merging method (`merges`: KVMerger, D2O, EMS) with MiKV or ZipCache: `KVSqueezeError` (those keep the
      evicted tokens at low precision instead of merging them);
    - a cross-layer method (MiniCache, xKV) with any scheme: KVSqueezeError (their shared state is full precision);
    - MiKV (`mikv-<hi>-<lo>`): `MiKV(inner=method)`: its scores pick the high-precision tokens (`MiKV()`, H2O's
      rule as in the paper, when `method` is None);
    - ZipCache (`zipcache-<hi>-<lo>`): with `method` None, `zipcache`, or `full` (which splits nothing), ZipCache's
      own saliency (`ZipCacheSaliency`, compression_ratio 0.5 when none is given); with any other method,
      `PrecisionSplit(inner=method)`: that method's scores pick the high-precision tokens, and `describe()` says so.
    """
    if qspec is not None and hasattr(method, "cross_layer_plan"):  # MiniCache, xKV: full-precision shared state
        raise KVSqueezeError(f"{method.name} shares KV state across layers in full precision; it does not compose "
                             f"with quantized storage (--quant {qspec.name}): drop one of them")
    kind = getattr(qspec, "importance", None)
    if kind is None:
        return method
    if method is not None and method.merges:
        raise KVSqueezeError(f"{method.name} merges the entries it evicts into kept ones, while {qspec.name} keeps "
                             "them at low precision instead: choose one (a merging method composes with kivi-*, "
                             "gear-*)")
    if kind == "mikv":
        if isinstance(method, MiKV):
            return method
        return MiKV(inner=method) if method is not None else MiKV()
    if kind == "zipcache":
        if method is None:
            return ZipCacheSaliency(compression_ratio=0.5)
        if isinstance(method, (ZipCacheSaliency, PrecisionSplit)):
            return method
        if method.name == "full":  # keeps every token at high precision whatever scores it (as before)
            return ZipCacheSaliency(compression_ratio=method.compression_ratio, budget=method.budget,
                                    exempt_layers=method.exempt_layers)
        return PrecisionSplit(inner=method, scheme=qspec.name)
    raise KVSqueezeError(f"unknown importance rule {kind!r} of storage {getattr(qspec, 'name', qspec)!r}")


def wrappers() -> list[str]:
    """Names of the methods that wrap a scorer (`name:scorer`)."""
    return [n for n, c in METHODS.items() if "scorer" in {f.name for f in fields(c)}]


__all__ = ["METHODS", "Method", "PrecisionSplit", "ScoreInputs", "for_storage", "get_method",
           *[c.__name__ for c in METHODS.values()]]
