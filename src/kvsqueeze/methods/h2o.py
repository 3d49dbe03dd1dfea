"""H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs").

Heavy hitters are the tokens with the largest attention accumulated over every query so far:

    acc_t = sum_{i >= t} softmax(q_i K^T / sqrt(d))_t        (summed over the query heads of each GQA group)

The cache keeps a recent window of `recent_share * n_keep` tokens (per row: a left-padded row's own budget) (the paper splits the budget evenly between
heavy hitters and recent tokens) and the highest `acc_t` among the rest. `acc` is state that follows the slots;
it is accumulated at every forward (prefill chunks, appended questions, decoding steps), computed a chunk of
queries at a time (never a full T x T matrix). With `compression_interval=1` the cache is held at its budget during
decoding, one eviction per step, as in the paper.
"""

from dataclasses import dataclass

import torch

from .base import Method, ScoreInputs


@dataclass(kw_only=True)
class H2O(Method):
    recent_share: float = 0.5

    name = "h2o"
    summary = "accumulated attention over all queries (heavy hitters) + recent window"
    stateful = True

    def observe(self, x: ScoreInputs) -> None:
        acc = x.to_kv_heads(x.attention_sum(), reduce="sum")  # (b, hkv, n)
        if "h2o_acc" in x.state:
            acc = acc + x.state["h2o_acc"]  # new slots were appended as zeros
        x.state["h2o_acc"] = acc

    def score(self, x: ScoreInputs) -> torch.Tensor:
        recent = (x.row_keep * self.recent_share).long()  # (b,): each row's own budget
        return x.state["h2o_acc"].masked_fill(x.recent(recent), float("inf"))
