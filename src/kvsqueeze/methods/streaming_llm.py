"""StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks").

Keep the first `n_sink` tokens (attention sinks) and the most recent ones:

    score(t) = +inf if pos(t) < n_sink else pos(t)

so the top-`n_keep` slots are the sinks plus the `n_keep - n_sink` most recent tokens. pos(t) is the position
within the token's own row, so a left-padded row's sinks are its first real tokens, not its padding.
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
        pos = x.row_positions
        return pos.float().masked_fill((pos >= 0) & (pos < self.n_sink), float("inf"))
