"""Ada-KV (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
LLM Inference", arXiv:2407.11550).

A layer's budget is shared by its kv heads instead of split evenly: with a budget of B tokens per head (B*H for
the H kv heads of a layer) and any scorer's scores s_{h,i}, Ada-KV keeps the B*H entries with the highest scores
over all heads of the layer together, so a head whose attention is concentrated keeps few entries and a head whose
attention is spread keeps many. The paper's safeguard keeps each head from starving: every head first keeps its own
top floor(alpha * B) entries (alpha = 0.2, the paper's and kvpress's default), then the remaining budget goes to
the highest scores among the rest, across heads:

    G_h   = top_{floor(alpha B)}(s_h)                                  (guaranteed per head)
    S     = G_1 u ... u G_H  u  top_{B H - |G|}( {s_{h,i} : i not in G_h} )
    B_h   = |S n head h|                      (sum_h B_h = B * H)

Each head then keeps its own top B_h entries (the same set as S). The memory is really freed: the layer's store
becomes ragged (each kv head holds B_h entries; the bytes held are sum_h B_h, the base method's bytes), where
kvpress's AdaKVPress only masks the entries it drops.

Composition: `AdaKV(scorer=SnapKV())` (the default scorer), `get_method("adakv:tova", compression_ratio=0.5)`. Budgets,
exempt layers and the decode-time schedule are the wrapper's (the scorer is set to follow them). Deviation: scores
are compared across heads as the scorer gives them (attention-based scorers give per-head probability masses, as
in the paper; non-attention scorers such as K-norm or Q-Filters give raw values, which the paper does not cover;
on smollm2-135m AdaKV over Q-Filters scores below Q-Filters, see the README).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import Delegating, Method
from .snapkv import SnapKV


def allocate_heads(scores: torch.Tensor, keep: torch.Tensor, alpha: float = 0.2,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """Ada-KV's per-head budgets (the module docstring's B_h).

    scores: (batch, kv_heads, n) float, higher = keep; keep: (batch,) long, the budget B per head of each row;
    valid: (batch, kv_heads, n) bool or None (invalid slots are never counted). Returns (batch, kv_heads) long
    counts with sum over heads = min(B * H, valid slots of the row), each head at least min(floor(alpha B), its valid
    slots). Raises ValueError for alpha outside [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    b, h, n = scores.shape
    s = scores.float()
    if valid is not None:
        s = s.masked_fill(~valid, float("-inf"))
    keep = keep.to(s.device).long()
    sorted_s = s.sort(dim=-1, descending=True, stable=True).values  # (b, h, n), each head best first
    rank = torch.arange(n, device=s.device)
    safe = (alpha * keep.double()).floor().long()  # (b,)
    finite = sorted_s > float("-inf")  # +inf (a method's always-kept window) counts; -inf is an invalid slot
    guaranteed = (rank[None, None, :] < safe[:, None, None]) & finite
    ranked = sorted_s.masked_fill(guaranteed, float("inf")).reshape(b, h * n)
    total = torch.minimum(keep * h, finite.reshape(b, -1).sum(-1))  # (b,)
    order = ranked.sort(dim=-1, descending=True, stable=True).indices
    chosen = torch.zeros(b, h * n, dtype=torch.bool, device=s.device)
    chosen.scatter_(1, order, torch.arange(h * n, device=s.device).expand(b, -1) < total[:, None])
    return chosen.view(b, h, n).sum(-1)


@dataclass(kw_only=True)
class AdaKV(Delegating, Method):
    scorer: Method = field(default_factory=SnapKV)
    alpha_safeguard: float = 0.2

    name = "adakv"
    summary = "head-wise budgets: a layer's top B*H scores across its kv heads (20% per head guaranteed); any scorer"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.alpha_safeguard <= 1.0:
            from ..errors import KVSqueezeError

            raise KVSqueezeError(f"alpha_safeguard must be in [0, 1], got {self.alpha_safeguard}")
        # the budget and schedule fields are the wrapper's (what the user asked); the scorer follows them
        self.scorer.compression_ratio, self.scorer.budget = self.compression_ratio, self.budget
        self.scorer.exempt_layers, self.scorer.compression_interval = self.exempt_layers, self.compression_interval

    def layer_budget(self, base: int, layer_idx: int, n_layers: int) -> int:
        return self.scorer.layer_budget(base, layer_idx, n_layers)

    def head_counts(self, scores: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """(batch, kv_heads) entries each head keeps (`allocate_heads`); keep: (batch,) per-head budget B."""
        return allocate_heads(scores, keep, self.alpha_safeguard, valid)

    def describe(self) -> str:
        return f"adakv[{self.scorer.describe()}]"
