"""TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs").

Token Omission Via Attention: evict the tokens that the current (last) query attends to least, with the
attention averaged over all heads of the layer, so every head keeps the same tokens:

    score(t) = mean_h softmax(q_last,h K_h^T / sqrt(d))_t

At the prefill it keeps the top `n_keep` at once; with `compression_interval=1` it drops the lowest token at each
decoding step, as in the paper's generation loop.
"""

from dataclasses import dataclass

import torch

from .base import Method, ScoreInputs


@dataclass(kw_only=True)
class TOVA(Method):
    name = "tova"
    summary = "keep tokens the last query attends to most, averaged over heads"

    def score(self, x: ScoreInputs) -> torch.Tensor:
        probs = next(x.attention(last=1))[:, :, 0]  # (b, hq, n)
        return probs.mean(1, keepdim=True).expand(-1, x.keys.shape[1], -1)
