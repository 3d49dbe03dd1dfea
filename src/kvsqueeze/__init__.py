"""kvsqueeze: compress the KV cache of HF transformers decoder-only models, with real memory savings."""

from .attention import patch, unpatch
from .cache import CacheStats, CompressedCache, CompressedLayer
from .errors import KVSqueezeError
from .methods import METHODS, Method, ScoreInputs, get_method
from .models import load_model
from .pipeline import GenerationResult, generate_answer, prefill

__version__ = "0.1.0"

__all__ = [
    "CacheStats",
    "CompressedCache",
    "CompressedLayer",
    "GenerationResult",
    "KVSqueezeError",
    "METHODS",
    "Method",
    "ScoreInputs",
    "generate_answer",
    "get_method",
    "load_model",
    "patch",
    "prefill",
    "unpatch",
]
