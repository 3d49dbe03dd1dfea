"""StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks").

Keep the first `n_sink` tokens (attention sinks) and the most recent ones:

    score(t) = +inf if pos(t) < n_sink else pos(t)

so the top-`n_keep` slots are the sinks plus the `n_keep - n_sink` most recent tokens.
"""

from dataclasses import dataclass

import torch

from .base import Method, ScoreInputs


@dataclass(kw_only=True)
class StreamingLLM(Method):
    n_sink: int = 4

    name = "streaming_llm"
    summary = "attention sinks (first 4 tokens) + the most recent window"

    def score(self, x: ScoreInputs) -> torch.Tensor:
        pos = x.positions.float()
        return pos.masked_fill(x.positions < self.n_sink, float("inf"))
