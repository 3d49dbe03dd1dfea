"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation").

The last `window` queries of the prompt (the observation window) vote for the prefix tokens:

    a_t   = sum_{i in window} softmax(q_i K^T / sqrt(d))_t          (per query head)
    s_t   = avg_pool1d(a, kernel_size)_t                            (clusters neighbouring tokens)
    score = mean of s over the query heads of each GQA group; the window itself is always kept.

Question-agnostic use (the window is the end of the context, not the question) is the default here and is much
weaker than the paper's query-aware setting; pass the question inside the compressed prompt for the latter.
Pooling runs over the visible slots in slot order (a left-padded row's padding and the slots it no longer sees are
skipped, as they are absent when the row runs alone). Deviation: in a chunked prefill the window is the end of each chunk; the attention is recomputed from the
queries and the cached keys, so the model keeps its sdpa kernel.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Method, ScoreInputs


@dataclass(kw_only=True)
class SnapKV(Method):
    window: int = 64
    kernel_size: int = 5

    name = "snapkv"
    summary = "attention of the last 64 prompt queries, pooled (kernel 5), window kept"

    def score(self, x: ScoreInputs) -> torch.Tensor:
        w = min(self.window, x.queries.shape[2])
        votes = x.attention_sum(last=w)  # (b, hq, n)
        b, hq, n = votes.shape
        order = None
        if x.valid is not None:  # visible slots first (votes of the others are 0, like avg_pool's zero padding)
            hidden = (~x.valid).to(torch.int8).repeat_interleave(x.group, dim=1)
            order = hidden.sort(dim=-1, stable=True).indices
            votes = votes.gather(-1, order)
        pooled = F.avg_pool1d(votes.reshape(b * hq, 1, n), self.kernel_size, stride=1, padding=self.kernel_size // 2)
        pooled = pooled.view(b, hq, n)
        if order is not None:
            pooled = torch.empty_like(pooled).scatter_(-1, order, pooled)
        scores = x.to_kv_heads(pooled)
        return scores.masked_fill(x.recent(w), float("inf"))
