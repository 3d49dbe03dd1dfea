"""KVCrush (Jha, Gobriel, Talamanova, Jain, 2025, "KVCrush: Key value cache size-reduction using similarity in
head-behaviour", arXiv:2503.00022).

An importance method keeps most of the budget; KVCrush spends the rest on *representatives* of the tokens it
would drop, chosen by how the heads behave towards them, so that the evicted part of the context is not lost as a
whole. With a budget of B tokens per kv head and the share `crush_share` (the authors' `kvcrush_ratio`, 0.25):

    B_rep = int(B * crush_share),   B_imp = B - B_rep
    I_h   = the tokens the importance method (`scorer`) keeps in kv head h with a budget of B_imp
    bit_h(t) = 1  if s_h(t) is among the top floor(n/2) scores of head h,  else 0      (n: the head's visible slots)
    v(t)  = (bit_1(t), ..., bit_H(t))                 the token's binary head-behaviour vector (H kv heads)
    d(t)  = Hamming(v(t), anchor)                     one anchor vector for the layer (`anchor`, below)
    R_h   = the tokens not in I_h, sorted by (d(t), position); B_rep of them evenly spaced along that order
            (index floor(i * (m - 1) / (B_rep - 1)), i = 0..B_rep-1, m = |R_h|): one representative per bucket of
            tokens of similar head behaviour
    kept in head h = I_h u R_h    (B_imp + B_rep = B entries: the base method's bytes)

The threshold of the binary vector (a token's score in the top half of its head) and the grouping (sort by Hamming
distance to one anchor, then evenly spaced picks: the paper's low-overhead alternative to clustering) follow the
authors' reference code (vLLM's `kvcrush.py` backend and OpenVINO GenAI's `KVCrushAlgorithm`). Anchors: "alternate"
(0, 1, 0, 1, ...; the vLLM code's default), "random" (seeded by `seed`), "mean" (the majority bit of each head over the
tokens), "inv_mean" (its complement), "zeros", "ones" (OpenVINO's modes).

Composition: `KVCrush(scorer=SnapKV())`, `get_method("kvcrush:snapkv", compression_ratio=0.5)`; the default scorer is
H2O (the authors' vLLM class is `H2OKVCrushCluster`). The importance method runs as it would alone with the budget
B_imp (H2O keeps its recent window inside that share). Memory is freed: every kv head keeps exactly B entries.

Deviations: the reference code works on pages of 16 tokens (vLLM, OpenVINO: a page's vector is its tokens' bits
side by side); kvsqueeze stores tokens, so the unit is the token, as in the paper. The representatives are picked
per kv head among the tokens that head's importance selection left out (the vLLM code excludes only the first
head's selection and gives every head the same representatives, so a head can keep a token twice). The vector has
one bit per kv head, the heads the scores are given for (a GQA model's query heads of one group share one bit): on
smollm2-135m (3 kv heads) the distance takes 4 values, so the buckets are coarse. Scores identical across heads
(TOVA) give every token the same bits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..errors import KVSqueezeError
from .base import Delegating, Method, ScoreInputs
from .h2o import H2O

ANCHORS = ("alternate", "random", "mean", "inv_mean", "zeros", "ones")


def head_bits(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """KVCrush's binary head-behaviour vectors. scores: (batch, heads, n), higher = more important; valid:
    (batch, heads, n) bool or None. Returns (batch, heads, n) bool: bit h of token t is set when t's score is among
    the top floor(m/2) of head h (m: the head's valid slots; ties: the earlier slot first)."""
    b, h, n = scores.shape
    s = scores.float()
    if valid is not None:
        s = s.masked_fill(~valid, float("-inf"))
    m = torch.full((b, h), n, device=s.device) if valid is None else valid.sum(-1)
    order = s.sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=s.device).expand(b, h, n))
    bits = rank < (m // 2)[..., None]
    return bits if valid is None else bits & valid


def anchor_vector(kind: str, bits: torch.Tensor, valid: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """The anchor (batch, heads) bool for `bits` (batch, heads, n) (see the module docstring's anchors); "mean"
    and "inv_mean" take each row's majority bit per head over its valid tokens. Raises KVSqueezeError for an
    unknown kind."""
    b, h, _ = bits.shape
    if kind == "alternate":
        return (torch.arange(h, device=bits.device) % 2 == 1).expand(b, h)
    if kind == "zeros":
        return torch.zeros(b, h, dtype=torch.bool, device=bits.device)
    if kind == "ones":
        return torch.ones(b, h, dtype=torch.bool, device=bits.device)
    if kind == "random":
        gen = torch.Generator().manual_seed(seed)
        return (torch.randint(0, 2, (h,), generator=gen) == 1).to(bits.device).expand(b, h)
    if kind in ("mean", "inv_mean"):
        count = bits.shape[-1] if valid is None else valid.sum(-1).clamp(min=1)
        mean = bits.float().sum(-1) / count
        return mean > 0.5 if kind == "mean" else mean < 0.5
    raise KVSqueezeError(f"unknown KVCrush anchor {kind!r}; choose from: {', '.join(ANCHORS)}")


def representatives(distance: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """KVCrush's pick: per (row, head), `k` tokens evenly spaced along the eligible tokens sorted by (distance,
    slot). distance: (batch, n) long, the same for every head of a row; eligible: (batch, heads, n) bool; k:
    (batch,) long. Returns (batch, heads, n) bool: the representatives (all eligible tokens when fewer than k)."""
    b, h, n = eligible.shape
    key = distance[:, None, :].expand(b, h, n).to(torch.float64) * (n + 1) + torch.arange(n, device=eligible.device)
    key = key.masked_fill(~eligible, float("inf"))
    order = key.sort(dim=-1, stable=True).indices  # eligible first, by distance then slot
    m = eligible.sum(-1)  # (b, h)
    kmax = int(k.max()) if k.numel() else 0
    if kmax <= 0:
        return torch.zeros(b, h, n, dtype=torch.bool, device=eligible.device)
    i = torch.arange(kmax, device=eligible.device).double()
    kk = k.to(eligible.device)[:, None, None].double()  # (b, 1, 1)
    mm = m[..., None].double()
    span = (kk - 1).clamp(min=1)
    ranks = torch.floor(i * (mm - 1).clamp(min=0) / span + 1e-9).long()  # (b, h, kmax), as torch.linspace(long)
    ranks = torch.where(kk <= 1, torch.zeros_like(ranks), ranks)
    take = (i[None, None, :] < kk) & (i[None, None, :] < mm)  # the first min(k, m) picks
    ranks = torch.where(mm <= kk, i[None, None, :].long().expand_as(ranks), ranks)  # fewer than k: take them all
    slots = order.gather(-1, ranks.clamp(max=n - 1))
    hits = torch.zeros(b, h, n, dtype=torch.long, device=eligible.device)
    hits.scatter_add_(-1, slots, take.long())
    return hits > 0


@dataclass(kw_only=True)
class KVCrush(Delegating, Method):
    """KVCrush (arXiv 2503.00022): `scorer`'s top tokens kept, plus one representative per group of the rest,
    grouped by their binary head-behaviour vectors (the rule and deviations: module docstring). Scores
    (b, kv_heads, n) per the `Method` protocol; the budget split is `crush_share` (fraction of the budget for the
    representatives). Raises KVSqueezeError for a share outside [0, 1)."""
    scorer: Method = field(default_factory=H2O)
    crush_share: float = 0.25  # the budget share of the representatives (the authors' kvcrush_ratio)
    anchor: str = "alternate"
    seed: int = 0  # the random anchor's seed

    name = "kvcrush"
    summary = "an importance method (H2O) keeps 75% of the budget; one token per group of similar head behaviour the rest"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.crush_share < 1.0:
            raise KVSqueezeError(f"crush_share must be in [0, 1), got {self.crush_share}")
        if self.anchor not in ANCHORS:
            raise KVSqueezeError(f"unknown KVCrush anchor {self.anchor!r}; choose from: {', '.join(ANCHORS)}")
        # the budget and schedule fields are the wrapper's; the scorer follows them
        self.scorer.compression_ratio, self.scorer.budget = self.compression_ratio, self.budget
        self.scorer.exempt_layers, self.scorer.compression_interval = self.exempt_layers, self.compression_interval

    def layer_budget(self, base: int, layer_idx: int, n_layers: int) -> int:
        return self.scorer.layer_budget(base, layer_idx, n_layers)

    def score(self, x: ScoreInputs) -> torch.Tensor:
        """(batch, kv_heads, n): the importance tokens (3), then the representatives (2), then the other slots in
        the scorer's order (in (0, 1]); invalid slots -inf. The top `row_keep` per head are the module
        docstring's I_h u R_h."""
        b, h, n = x.keys.shape[:3]
        keep = x.row_keep.to(x.keys.device)  # (b,)
        n_rep = (keep.double() * self.crush_share).long()
        n_imp = keep - n_rep
        inner = dataclasses.replace(x, n_keep=max(1, int(n_imp.max())), keep_per_row=n_imp)
        s = self.scorer.score(inner).float()  # (b, h, n)
        valid = x.valid if x.valid is not None else torch.ones(b, h, n, dtype=torch.bool, device=s.device)
        valid = valid & (s > float("-inf"))  # -inf: a slot the scorer cannot see
        ranked = s.masked_fill(~valid, float("-inf"))
        # the importance method's own top n_imp (ties: the later slot, as CompressedLayer.evict)
        order = ranked.flip(-1).sort(dim=-1, descending=True, stable=True).indices
        order = n - 1 - order
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=s.device).expand(b, h, n))
        important = (rank < n_imp[:, None, None]) & valid
        bits = head_bits(s, valid)
        anchor = anchor_vector(self.anchor, bits, valid, self.seed)  # (b, h)
        distance = (bits != anchor[..., None]).sum(1)  # (b, n): Hamming distance over the heads
        reps = representatives(distance, valid & ~important, n_rep)
        # the kept set first (importance, then representatives), then the rest in the scorer's order
        out = 1.0 - rank.double() / (n + 1)
        out = torch.where(reps, torch.full_like(out, 2.0), out)
        out = torch.where(important, torch.full_like(out, 3.0), out)
        return out.float().masked_fill(~valid, float("-inf"))

    def describe(self) -> str:
        return f"kvcrush[{self.scorer.describe()}]"
