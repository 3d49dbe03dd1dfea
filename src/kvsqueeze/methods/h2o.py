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


def accumulate_attention(x: ScoreInputs, key: str, summed: torch.Tensor | None = None) -> torch.Tensor:
    """H2O's accumulated attention, (batch, kv_heads, n) float32: this forward's attention (`x.attention_sum()`, or
    `summed` (batch, q_heads, n) when the caller already has it) summed over its queries and over each GQA group's
    query heads, added to the slot-aligned `x.state[key]` (slots appended since were added as zeros) and stored
    there. Every method that ranks by H2O's acc_t (module docstring) keeps it this way under its own key."""
    acc = x.to_kv_heads(x.attention_sum() if summed is None else summed, reduce="sum")
    if key in x.state:
        acc = acc + x.state[key]  # new slots were appended as zeros
    x.state[key] = acc
    return acc


def heavy_hitters(x: ScoreInputs, acc: torch.Tensor, n_recent: torch.Tensor) -> torch.Tensor:
    """H2O's rule as scores (batch, kv_heads, n): the `n_recent` ((batch,) long, per row) most recent slots +inf,
    the others their accumulated attention `acc` (batch, kv_heads, n)."""
    return acc.masked_fill(x.recent(n_recent), float("inf"))


@dataclass(kw_only=True)
class H2O(Method):
    recent_share: float = 0.5

    name = "h2o"
    summary = "accumulated attention over all queries (heavy hitters) + recent window"
    stateful = True

    def observe(self, x: ScoreInputs) -> None:
        accumulate_attention(x, "h2o_acc")  # acc_t, (b, hkv, n)

    def score(self, x: ScoreInputs) -> torch.Tensor:
        recent = (x.row_keep * self.recent_share).long()  # (b,): each row's own budget
        return heavy_hitters(x, x.state["h2o_acc"], recent)
