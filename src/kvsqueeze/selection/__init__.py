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


def get_selector(name: str, budget: int, **kwargs) -> Selector:
    """The selector `name` (a key of SELECTORS) at `budget` tokens, with keyword options. Raises KVSqueezeError
    for an unknown name or an option the selector does not take (and for the selector's own bad values)."""
    import inspect

    from ..errors import KVSqueezeError

    cls = SELECTORS.get(name.lower().replace("-", "_"))
    if cls is None:
        raise KVSqueezeError(f"unknown selector {name!r}; choose from: {', '.join(SELECTORS)}")
    params = inspect.signature(cls.__init__).parameters
    bad = [k for k in kwargs if k not in params or k in ("self", "budget")]
    if bad:
        known = [k for k, p in params.items() if p.kind is p.KEYWORD_ONLY]
        raise KVSqueezeError(f"{cls.__name__} has no option {bad[0]!r}; its options: {', '.join(known)}")
    return cls(budget, **kwargs)


__all__ = ["AttentionPredictor", "LeoAM", "PredictorNet", "Quest", "SELECTORS", "Selector", "attention_probs",
           "get_selector", "load_predictor", "page_pool", "predictor_path", "recovery", "save_predictor"]
