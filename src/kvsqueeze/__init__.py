"""kvsqueeze: compress the KV cache of HF transformers decoder-only models, with real memory savings."""

from .runtime.cache import CompressedCache
from .runtime.routing import patch, unpatch
from .storage import CacheStats, CompressedLayer
from .errors import KVSqueezeError
from .methods import METHODS, Method, ScoreInputs, get_method
from .models import load_model
from .runtime.generate import GenerationResult, generate_answer, prefill
from . import quant, selection  # kq.quant.kivi(2), kq.selection.Quest(512): the storage and selector factories

from .version import __version__

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
