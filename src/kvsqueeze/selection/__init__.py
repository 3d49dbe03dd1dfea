"""Decode-time critical-token selection: every KV entry stays, each decoding step attends to a chosen subset.

- `Quest(budget)`: query-aware page selection from per-page key min/max bounds (Tang et al., 2024).
- `AttentionPredictor(budget)`: a learned CNN predicts the next step's page attention from the history of
  attention rows (Yang, Wang et al., 2025); train it with `kvsqueeze train-predictor --model M`.
- `LeoAM(budget)`: LeoAM's variable-sized chunks of pages (deserts of low attention merged), ranked by a min/max
  key abstract per chunk (Sun et al., 2025; a reconstruction, see `leoam.py`).

    >>> cache = CompressedCache(model, selector=Quest(budget=512))
"""

from .attention_predictor import AttentionPredictor, PredictorNet, load_predictor, predictor_path, save_predictor
from .base import Selector, attention_probs, page_pool, recovery
from .leoam import LeoAM
from .quest import Quest

SELECTORS = {"quest": Quest, "attention_predictor": AttentionPredictor, "leoam": LeoAM}


def parse_selector(spec: str) -> tuple[str, dict]:
    """A selector spec -> (name, options): 'leoam' -> ('leoam', {}); 'leoam(max_chunk=1, refine=4)' -> ('leoam',
    {'max_chunk': 1, 'refine': 4}). Option values are Python literals (numbers, booleans, strings, tuples); the
    name is lower-cased with '-' read as '_'. Raises KVSqueezeError for anything else (a positional value, an
    expression, unbalanced parentheses)."""
    import ast
    import re

    from ..errors import KVSqueezeError

    m = re.fullmatch(r"\s*([A-Za-z_][\w-]*)\s*(?:\((.*)\))?\s*", spec, re.S)
    bad = KVSqueezeError(f"a selector is NAME or NAME(option=value, ...) with literal values, got {spec!r}")
    if m is None:
        raise bad
    name, args = m.group(1).lower().replace("-", "_"), m.group(2)
    opts: dict = {}
    if args is not None and args.strip():
        try:
            call = ast.parse(f"f({args})", mode="eval").body
            if call.args or any(k.arg is None for k in call.keywords):
                raise ValueError
            opts = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        except (SyntaxError, ValueError):
            raise bad from None
    return name, opts


def split_selectors(text: str) -> list[str]:
    """A comma-separated list of selector specs, commas inside parentheses kept: 'quest,leoam(max_chunk=1,
    refine=4)' -> ['quest', 'leoam(max_chunk=1,refine=4)'] (each stripped, empty ones dropped)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [x.strip() for x in out if x.strip()]


def get_selector(name: str, budget: int, **kwargs) -> Selector:
    """The selector `name` (a key of SELECTORS, or a spec with options, 'leoam(max_chunk=1)': `parse_selector`) at
    `budget` tokens, with keyword options (over the spec's). Raises KVSqueezeError for an unknown name, a malformed
    spec or an option the selector does not take (and for the selector's own bad values)."""
    import inspect

    from ..errors import KVSqueezeError

    base, opts = parse_selector(name)
    opts.update(kwargs)
    cls = SELECTORS.get(base)
    if cls is None:
        raise KVSqueezeError(f"unknown selector {base!r}; choose from: {', '.join(SELECTORS)}")
    if "budget" in opts:
        raise KVSqueezeError(f"the budget is not an option of {name!r}: give it apart (--select-budget)")
    params = inspect.signature(cls.__init__).parameters
    bad = [k for k in opts if k not in params or k in ("self", "budget")]
    if bad:
        known = [k for k, p in params.items() if p.kind is p.KEYWORD_ONLY]
        raise KVSqueezeError(f"{cls.__name__} has no option {bad[0]!r}; its options: {', '.join(known)}")
    try:
        return cls(budget, **opts)
    except (TypeError, ValueError, ZeroDivisionError) as e:  # a value of a type no check of the selector's expects
        raise KVSqueezeError(f"{cls.__name__}: a bad option value in {name!r} ({type(e).__name__}: {e})") from None


def canonical_selector(spec: str) -> str:
    """The canonical form of a selector spec: the name, then the options that differ from the selector's defaults,
    sorted, as `name(k=v,...)` ('LeoAM( refine=4, max_chunk=8 )' -> 'leoam(refine=4)'), so a sweep keys the same
    configuration once however it was typed. Raises KVSqueezeError as `parse_selector`, and for an unknown name."""
    import inspect

    from ..errors import KVSqueezeError

    base, opts = parse_selector(spec)
    cls = SELECTORS.get(base)
    if cls is None:
        raise KVSqueezeError(f"unknown selector {base!r}; choose from: {', '.join(SELECTORS)}")
    params = inspect.signature(cls.__init__).parameters
    kept = {k: v for k, v in sorted(opts.items())
            if not (k in params and params[k].default is not inspect.Parameter.empty and params[k].default == v
                    and type(params[k].default) is type(v))}
    return base if not kept else f"{base}({','.join(f'{k}={v!r}' for k, v in kept.items())})"


__all__ = ["AttentionPredictor", "LeoAM", "PredictorNet", "Quest", "SELECTORS", "Selector", "attention_probs",
           "canonical_selector", "get_selector", "load_predictor", "page_pool", "parse_selector", "predictor_path", "recovery", "save_predictor",
           "split_selectors"]
