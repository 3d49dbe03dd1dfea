"""K-norm (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression").

Keys with a low L2 norm draw high attention, so keep the lowest-norm keys:

    score(t) = -|| K_t ||_2        (per kv head)
"""

from dataclasses import dataclass

import torch

from .base import Method, ScoreInputs


@dataclass(kw_only=True)
class KNorm(Method):
    name = "knorm"
    summary = "keep keys with the smallest L2 norm (no attention needed)"
    # a slot's score never changes once its key is seen: the cache keeps the score each slot got from the key as
    # the model wrote it (`CompressedCache`: a quantized store's later view of the key must not re-rank it)
    static_scores = True

    def score(self, x: ScoreInputs) -> torch.Tensor:
        return -x.keys.float().norm(dim=-1)
