"""EMS (Li et al., 2024, "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on
Global-Local Importance", arXiv:2412.08521).

What the paper states (abstract, and the public reviews of its submission, which describe its method): a
Global-Local score combines attention accumulated from all queries (global) with attention from the local, recent
queries, each mean-aligned, to rank tokens without the causal mask's bias towards early tokens or the recency bias
of a local window; per head, tokens fall into three classes, the important ones (kept, the class centres), the
irrelevant ones (evicted) and the to-be-merged ones (merged into the most similar class centre, weighted by
attention; a token similar to no centre falls into the *zero class*, i.e. is evicted: one head-wise operation does
eviction and merging); the split adapts to each head's sparsity (how concentrated its attention is) and redundancy
(the similarity of its tokens, measured on keys and values together). Its code is not public.

What is implemented here (a reconstruction: the exact formulas could not be read; every choice is listed). Per
layer with a budget of B slots per kv head (B x H for its H kv heads):

    s_glo[t] = sum over every query so far of softmax(q K^T / sqrt(d))[t]          (H2O's accumulated attention)
    s_loc[t] = sum over the last `window` queries of this forward of the same       (SnapKV's observation window)
    GL[t]    = s_glo[t] / mean(s_glo) + s_loc[t] / mean(s_loc)                     (mean-aligned, per (row, kv head))

1. Head-wise budgets (sparsity): the layer's B x H kept slots go to the highest GL scores across its kv heads,
   each head guaranteed floor(alpha B) (Ada-KV's allocation, `adakv.allocate_heads`, alpha = 0.2), so a head whose
   attention is concentrated keeps few tokens and the store frees the rest (ragged `DenseStore`). The kept tokens
   are the class centres.
2. Evict: of a head's other tokens, the `evict_share` with the lowest GL are irrelevant (dropped).
3. Merge (redundancy): each remaining token e goes to the centre c* maximising r(e, c) = cos(k_e, k_c) cos(v_e, v_c)
   (the key-value similarity the paper uses for redundancy); if r(e, c*) < `zero_threshold` it falls into the zero
   class (dropped). Centres are averaged with their tokens by GL weight, keys and values alike:
       k_c <- (GL_c k_c + sum_{e -> c} GL_e k_e) / (GL_c + sum_{e -> c} GL_e)      (v_c likewise)

Deviations (beyond the reconstruction itself): the paper normalises keys and merges their norms separately, here
keys are averaged as stored (post-RoPE, with their norms); the share evicted outright and the zero-class threshold
are fixed fields, not derived per head (the paper adapts them to each head's redundancy; here redundancy acts
through the zero class: a head with similar tokens merges more of them, one without merges none). The paper
compresses at the prefill and while decoding: `compression_interval` > 0 does the latter. Composes with KIVI /
GEAR (quantized stores are rectangular, so a head's unused slots are held, as for AdaKV); MiKV / ZipCache are
refused.
Tuning on smollm2-135m (issue 14: 2 passkey samples of seed 1, not the evaluated ones, compression_ratio 0.5 and
0.75): merging every non-kept token (`evict_share=0, zero_threshold=0`) and a 64-query local window answered no key,
as the defaults did, so there is no tuned value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import KVSqueezeError
from ..storage.merge import MergePlan
from .adakv import allocate_heads
from .base import Method, ScoreInputs
from .h2o import accumulate_attention
from .kvmerger import rank_slots


def mean_aligned(s: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """s (b, h, n) divided by its mean over the valid slots of each (row, kv head) (a zero mean leaves s at 0)."""
    s = s.float().masked_fill(~valid, 0.0)
    mean = s.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp_min(1)
    return s / mean.clamp_min(torch.finfo(torch.float32).tiny)


@dataclass(kw_only=True)
class EMS(Method):
    """EMS (arXiv:2412.08521), as reconstructed in the module docstring. Raises KVSqueezeError for a window < 1, or
    alpha_safeguard / evict_share outside [0, 1], or zero_threshold outside [-1, 1]."""

    window: int = 32  # the local queries (the last of each forward)
    alpha_safeguard: float = 0.2  # each kv head keeps at least floor(alpha B) (Ada-KV's safeguard)
    evict_share: float = 0.5  # share of a head's non-kept tokens evicted outright (the lowest GL)
    zero_threshold: float = 0.5  # r(e, c*) below it: the zero class (evicted)

    name = "ems"
    summary = "global-local attention score, head-wise budgets; evict the least, merge the rest into kept centres"
    stateful = True
    merges = True

    def __post_init__(self):
        super().__post_init__()
        if self.window < 1:
            raise KVSqueezeError(f"window must be >= 1, got {self.window}")
        for name in ("alpha_safeguard", "evict_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise KVSqueezeError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not -1.0 <= self.zero_threshold <= 1.0:
            raise KVSqueezeError(f"zero_threshold is a product of cosines in [-1, 1], got {self.zero_threshold}")

    def observe(self, x: ScoreInputs) -> None:
        accumulate_attention(x, "acc")  # s_glo: H2O's accumulated attention, (b, hk, n)

    def score(self, x: ScoreInputs) -> torch.Tensor:
        """GL (b, kv_heads, n): the mean-aligned global + local attention (module docstring)."""
        if "ems" in x.scratch:
            return x.scratch["ems"]
        valid = torch.ones_like(x.state["acc"], dtype=torch.bool) if x.valid is None else x.valid
        w = min(self.window, x.queries.shape[2])
        local = x.to_kv_heads(x.attention_sum(last=w), reduce="sum")
        gl = mean_aligned(x.state["acc"], valid) + mean_aligned(local, valid)
        x.scratch["ems"] = gl
        return gl

    def head_counts(self, scores: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """(batch, kv_heads) slots each kv head keeps: Ada-KV's allocation of the layer's B x H over the GL scores."""
        return allocate_heads(scores, keep, self.alpha_safeguard, valid)

    def merge_plan(self, x: ScoreInputs, idx: torch.Tensor, visible: torch.Tensor | None) -> MergePlan | None:
        gl = self.score(x)
        b, h, n = gl.shape
        k = idx.shape[-1]
        valid = torch.ones(b, h, n, dtype=torch.bool, device=gl.device) if x.valid is None else x.valid
        shown = torch.ones(b, h, k, dtype=torch.bool, device=gl.device) if visible is None else visible.clone()
        shown &= valid.gather(2, idx)
        centre = torch.zeros(b, h, n, dtype=torch.bool, device=gl.device).scatter_(2, idx, shown)
        rest = valid & ~centre
        # 2. the irrelevant: the lowest-GL evict_share of each head's other tokens
        n_rest = rest.sum(-1)  # (b, h)
        n_evict = (n_rest.double() * self.evict_share).round().long()
        low = rank_slots(gl.masked_fill(~rest, float("inf")), descending=False)
        candidate = rest & (low >= n_evict[..., None])
        # 3. the zero class: the most similar centre by cos(k) cos(v), below the threshold -> evicted
        kn, vn = F.normalize(x.keys.float(), dim=-1), F.normalize(x.values.float(), dim=-1)
        kc = kn.gather(2, idx[..., None].expand(b, h, k, kn.shape[-1]))
        vc = vn.gather(2, idx[..., None].expand(b, h, k, vn.shape[-1]))
        r = (kn @ kc.transpose(-1, -2)) * (vn @ vc.transpose(-1, -2))  # (b, h, n, k)
        best, j = r.masked_fill(~shown[:, :, None, :], float("-inf")).max(-1)
        merge = candidate & (best >= self.zero_threshold)
        into = idx.gather(2, j).masked_fill(~merge, -1)
        return MergePlan(into, gl.clamp_min(0.0))

    def describe(self) -> str:
        return f"{super().describe()[:-1]}, window={self.window})"
