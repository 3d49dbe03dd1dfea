"""Decode-time critical-token selection: every KV entry stays, each decoding step attends to a chosen subset.

- `Quest(budget)`: query-aware page selection from per-page key min/max bounds (Tang et al., 2024).
- `AttentionPredictor(budget)`: a learned CNN predicts the next step's page attention from the history of
  attention rows (Yang, Wang et al., 2025); train it with `kvsqueeze train-predictor --model M`.

    >>> cache = CompressedCache(model, selector=Quest(budget=512))
"""

from .attention_predictor import AttentionPredictor, PredictorNet, load_predictor, predictor_path, save_predictor
from .base import Selector, attention_probs, page_pool, recovery
from .quest import Quest

SELECTORS = {"quest": Quest, "attention_predictor": AttentionPredictor}


def get_selector(name: str, budget: int, **kwargs) -> Selector:
    from ..errors import KVSqueezeError

    cls = SELECTORS.get(name.lower().replace("-", "_"))
    if cls is None:
        raise KVSqueezeError(f"unknown selector {name!r}; choose from: {', '.join(SELECTORS)}")
    return cls(budget, **kwargs)


__all__ = ["AttentionPredictor", "PredictorNet", "Quest", "SELECTORS", "Selector", "attention_probs", "get_selector",
           "load_predictor", "page_pool", "predictor_path", "recovery", "save_predictor"]
