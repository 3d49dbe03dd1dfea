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


# Fields set by the command line's own options (--compression-ratio, --budget) or by the name (the scorer after
# the colon); `name(key=value)` refuses them so that one setting has one place.
_NOT_IN_PARENS = {"compression_ratio": "--compression-ratio (get_method's compression_ratio=)",
                  "ratio": "--compression-ratio (get_method's compression_ratio=)",
                  "budget": "--budget (get_method's budget=)",
                  "scorer": "the name after the colon (kvcrush:snapkv)"}
_SCALARS = ("bool", "int", "float", "str")


def split_methods(text: str) -> list[str]:
    """A comma-separated list of method specs split on the commas OUTSIDE parentheses, each stripped, empty items
    dropped: "full,kvmerger(threshold=0.5,protect_share=0.25),adakv:snapkv" ->
    ["full", "kvmerger(threshold=0.5,protect_share=0.25)", "adakv:snapkv"]. Every command line list of methods
    (`sweep --methods`, `recommend --methods`) goes through it. Raises `KVSqueezeError` for unbalanced
    parentheses."""
    out, cur, depth = [], [], 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise KVSqueezeError(f"unbalanced ')' in the method list {text!r}")
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise KVSqueezeError(f"unbalanced '(' in the method list {text!r}")
    out.append("".join(cur))
    return [x.strip() for x in out if x.strip()]


def _type_names(f) -> list[str]:
    """A dataclass field's annotation as its union members' names: `int | None` -> ["int", "None"] (annotations
    may be strings, under `from __future__ import annotations`, or classes)."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return [x.strip() for x in t.split("|")]


def settable(cls: type[Method]) -> dict[str, str]:
    """{field: type} of the parameters `name(key=value,...)` may set on the method class `cls`: its init fields of
    a scalar type (bool, int, float, str, optionally None), less compression_ratio / budget / scorer (their own
    options)."""
    out = {}
    for f in fields(cls):
        names = _type_names(f)
        if f.init and f.name not in _NOT_IN_PARENS and all(n in _SCALARS + ("None",) for n in names):
            out[f.name] = " | ".join(names)
    return out


def _coerce(text: str, types: list[str]):
    """`text` as a value of a field of `types` (["int", "None"], ...); ValueError when it is not one."""
    v = text.strip()
    if v.lower() == "none":
        if "None" in types:
            return None
        raise ValueError(v)
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        v = v[1:-1]
    if "bool" in types:
        low = v.lower()
        if low in ("true", "yes", "1"):
            return True
        if low in ("false", "no", "0"):
            return False
        raise ValueError(v)
    if "int" in types:
        return int(v)
    if "float" in types:
        return float(v)
    return v


def parse_params(method: str, cls: type[Method], text: str) -> dict:
    """The `key=value,...` inside `name(...)` as {field: value}, each value coerced to the field's type of `cls`
    (int, float, bool: true/false/1/0/yes/no, str; `none` -> None where the field allows it). Raises
    `KVSqueezeError` (one line naming the method's settable fields and their types) for an unknown key, a bad
    value, a key given twice, or an item without '='."""
    can = settable(cls)
    listing = ", ".join(f"{k} ({t})" for k, t in can.items()) or "none"
    out: dict = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        key, sep, val = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise KVSqueezeError(f"{method}: parameters are key=value, got {item!r}; {cls.name}'s parameters: "
                                 f"{listing}")
        if key in _NOT_IN_PARENS:
            raise KVSqueezeError(f"{method}: {key} is not set in the parentheses; use {_NOT_IN_PARENS[key]} "
                                 f"({cls.name}'s parameters: {listing})")
        if key not in can:
            raise KVSqueezeError(f"{method}: unknown parameter {key!r}; {cls.name}'s parameters: {listing}")
        if key in out:
            raise KVSqueezeError(f"{method}: {key} given twice; {cls.name}'s parameters: {listing}")
        try:
            out[key] = _coerce(val, can[key].split(" | "))
        except ValueError:
            raise KVSqueezeError(f"{method}: {key}={val.strip()!r} is not a value of type {can[key]}; "
                                 f"{cls.name}'s parameters: {listing}") from None
    return out


def get_method(name: str, **kwargs) -> Method:
    """Build a method by name; kwargs are its fields (compression_ratio, budget, exempt_layers,
    compression_interval, ...). `compression_ratio` is the fraction of tokens removed (kvpress's name: 0.75 keeps a
    quarter).

    A wrapper names its scorer after a colon: "adakv:tova" is `AdaKV(scorer=TOVA())`, "pyramidkv:knorm" is
    `PyramidKV(scorer=KNorm())` (the budget fields go to the wrapper). Parameters of the method (the outer one)
    follow the whole name in parentheses: "minicache(t=0.3,start_layer=20)", "kvcrush:snapkv(crush_share=0.5)";
    their values are read as the dataclass field's type (`parse_params`) and override `kwargs`. Raises
    `KVSqueezeError` for an unknown name, a scorer given to a method that takes none, a bad or unknown parameter,
    or the old argument name `ratio` (now `compression_ratio`)."""
    if "ratio" in kwargs:
        raise KVSqueezeError("get_method: `ratio` was renamed `compression_ratio` (the fraction of tokens removed, "
                             f"kvpress's name): get_method({name!r}, compression_ratio={kwargs['ratio']!r})")
    spec = name
    name, paren, rest = name.partition("(")
    params = None
    if paren:
        rest = rest.rstrip()
        if not rest.endswith(")") or "(" in rest or rest.count(")") != 1:
            raise KVSqueezeError(f"cannot read method {spec!r}: parameters go in one pair of parentheses after the "
                                 "whole name, e.g. minicache(t=0.3,start_layer=20) or kvcrush:snapkv(crush_share=0.5)")
        params = rest[:-1]
    outer, _, inner = name.strip().partition(":")
    lookup = lambda n: METHODS.get(n.strip().lower().replace("-", "_"))  # noqa: E731
    cls = lookup(outer)
    if cls is None:
        raise KVSqueezeError(f"unknown method {name.strip()!r}; choose from: {', '.join(METHODS)}")
    if params is not None:
        kwargs = {**kwargs, **parse_params(spec.strip(), cls, params)}
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


def method_spec(m: Method) -> str:
    """The name `get_method` rebuilds `m` from (its budget fields aside): "name", "name:scorer" for a method with
    a scorer, and "(key=value,...)" for every settable parameter (`settable`) that differs from the field's
    default: `method_spec(KVMerger(threshold=0.5))` == "kvmerger(threshold=0.5)"."""
    from dataclasses import MISSING

    out = m.name
    scorer = getattr(m, "scorer", None)
    if isinstance(scorer, Method):
        out += f":{scorer.name}"
    changed = []
    for f in fields(m):
        if f.name not in settable(type(m)):
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        v = getattr(m, f.name)
        if default is MISSING or v != default:
            changed.append(f"{f.name}={'none' if v is None else str(v).lower() if isinstance(v, bool) else v}")
    return out + (f"({','.join(changed)})" if changed else "")


def method_label(m: Method) -> str:
    """What a user is told ran: `m.describe()`, followed by the parameters given in parentheses when any differs
    from its default (`method_spec`), since `describe()` shows only some of them:
    `method_label(get_method("minicache(start_layer=24)"))` ends with "; as given: minicache:snapkv(start_layer=24)"."""
    spec = method_spec(m)
    return m.describe() + (f"; as given: {spec}" if "(" in spec else "")


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


__all__ = ["METHODS", "Method", "method_label", "PrecisionSplit", "ScoreInputs", "for_storage", "get_method", "method_spec",
           "parse_params", "settable", "split_methods",
           *[c.__name__ for c in METHODS.values()]]
