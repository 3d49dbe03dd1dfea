"""D2O (Wan et al., 2024, "D2O: Dynamic Discriminative Operations for Efficient Long-Context Inference of Large
Language Models", arXiv:2406.13035; ICLR 2025; reference code github.com/AIoT-MLSys-Lab/d2o).

Two levels, both from the attention the model computes anyway.

Layer level (dynamic allocation). Layers whose prefill attention is dense (spread over many tokens) should evict
less. With the prefill's attention A (queries x keys) per query head h, the column sums s_h = sum_q A_h[q, :]:

    var_h  = Var_t(s_h[t])                          (over the keys)
    D_l    = mean_h (var_h - min_h var) / (max_h var - min_h var + 1e-6)       (min-max over the layer's heads)
    w_l    = softmax_l(-D_l)                         (over the layers; a low variance is dense attention)
    r_l    = clamp(w_l * L * rho, 0.01, 1)           rho = 1 - compression_ratio, the uniform keep ratio

and layer l keeps int(r_l * n) slots per kv head (the sum over layers is L * rho * n until the clamp bites). Every
layer's D_l is needed before any layer's budget, so D2O evicts at the end of the forward (`defer_eviction`: the
output is the same, eviction never changes the forward that observes it). As in the reference code, the first
two layers and the last are not compressed (`compress_edges=False`), and the budget is split evenly between heavy
hitters and recent tokens.

Token level (eviction with compensation). Per (row, kv head), H2O's rule keeps the recent window
(`recent_share` of the budget) and the heavy hitters of the attention accumulated over every query so far; the
first `n_sink` tokens are always kept (reference code: 4). Each evicted token e is compared with every kept token
by the cosine similarity of their keys, u_e = max_c cos(k_e, k_c), c* its argmax. With the layer's EMA threshold

    tau_0 = mean_e u_e   (the first compression of the sequence),   tau_t = a tau_{t-1} + (1 - a) mean_e u_e

(a = `ema` = 0.5, the reference code's alpha = beta = 0.5; the mean over the row's heads and evicted tokens), an
evicted token with u_e >= tau is merged into c* (keys and values), else dropped:

    w_e = exp(u_e) / (sum_{e' -> c} exp(u_e') + e),   w_c = e / (sum_{e' -> c} exp(u_e') + e)
    k_c <- w_c k_c + sum_{e -> c} w_e k_e            (v_c likewise; e = exp(1): a token's similarity to itself)

Sources: the layer-level rule, the threshold's EMA, the H2O split and the uncompressed edge layers are read from the
authors' code (LLM_merge_new/LMEval_kv_token_merge/modeling_llama3_7b_13b_d2o.py and modeling_llama3_new.py); the
merge weights are the paper's as recalled, the paper's full text could not be opened in this session (its abstract
and title were checked: arXiv:2406.13035).

Deviations, written down: the reference code merges with `scatter_reduce(mean, include_self)` of u_e * k_e (a mean
of the kept key and the similarity-scaled evicted keys), while the paper's weights above (normalised exponentials
of the similarities) are used here; the reference compares the head-averaged similarity with the threshold, here
each (head, token) is compared with it (the threshold is still one per row and layer). Densities and thresholds are
kept per batch row (the reference runs batch 1), so a row of a batch keeps what it keeps alone. The layer budgets
redistribute a `compression_ratio`; with an absolute `budget` every compressed layer keeps it (the paper's budgets
are ratios). The reference compresses at the first decoding step, not at the end of the prefill, and then at every
decoding step: here the prefill compresses, and `compression_interval=1` compresses every decoding step (the
default 0 compresses only the prefill). A chunked prefill takes each chunk's attention for the densities.
Composes with KIVI / GEAR (merged entries quantized once, at the commit); MiKV / ZipCache are refused.
Tuning on smollm2-135m (issue 14: 2 passkey samples of seed 1, not the evaluated ones, compression_ratio 0.5 and
0.75): `ema=0.9` and `recent_share=0.1` answered no key, as the defaults did, so there is no tuned value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import KVSqueezeError
from ..storage.merge import MergePlan
from .base import Method, ScoreInputs
from .h2o import accumulate_attention, heavy_hitters

_ALL = 1 << 62  # a layer that keeps every token (clamped to the tokens seen by `Method.n_keep`)


def attention_density(attn_sum: torch.Tensor, valid: torch.Tensor | None, group: int) -> torch.Tensor:
    """D2O's per-layer density statistic, per row: attn_sum (b, q_heads, n) the attention summed over the queries;
    valid (b, kv_heads, n) bool or None (only valid slots count); group: query heads per kv head. Returns (b,):
    the mean over heads of the min-max normalised variance over keys of attn_sum (unbiased variance)."""
    s = attn_sum.float()
    b, hq, n = s.shape
    m = torch.ones_like(s, dtype=torch.bool) if valid is None else valid.repeat_interleave(group, dim=1)
    cnt = m.sum(-1).clamp_min(2).float()
    mean = (s * m).sum(-1) / cnt
    var = (((s - mean[..., None]) ** 2) * m).sum(-1) / (cnt - 1)  # (b, hq)
    lo, hi = var.amin(-1, keepdim=True), var.amax(-1, keepdim=True)
    return ((var - lo) / (hi - lo + 1e-6)).mean(-1)


def layer_ratios(density: torch.Tensor, rho: float) -> torch.Tensor:
    """D2O's dynamic allocation: density (L,) per layer -> keep ratios (L,) = clamp(softmax(-D) * L * rho, 0.01, 1)."""
    w = torch.softmax(-density.double(), dim=0)
    return (w * density.numel() * rho).clamp(0.01, 1.0)


@dataclass(kw_only=True)
class D2O(Method):
    """D2O (arXiv:2406.13035): see the module docstring. Raises KVSqueezeError for `recent_share` or `ema` outside
    [0, 1] or a negative `n_sink`."""

    recent_share: float = 0.5  # the reference code's recent_ratio : hh_ratio = 1 : 1
    n_sink: int = 4  # the first tokens, always kept (the reference code's select_hh_scores[:, 0:4] = inf)
    ema: float = 0.5  # a in tau_t = a tau_{t-1} + (1 - a) mean u (the reference code's alpha = beta = 0.5)
    compress_edges: bool = False  # compress layers 0, 1 and the last too (the reference code leaves them full)

    name = "d2o"
    summary = "layer budgets from attention density; H2O eviction, evicted keys merged into the most similar kept one"
    stateful = True
    merges = True
    defer_eviction = True
    per_row_budgets = True

    def __post_init__(self):
        super().__post_init__()
        self._density: dict[int, torch.Tensor] = {}  # layer -> (b,): this forward's densities (not a field)
        for name in ("recent_share", "ema"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise KVSqueezeError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.n_sink < 0:
            raise KVSqueezeError(f"n_sink must be >= 0, got {self.n_sink}")

    def reset(self) -> None:
        """Forget the densities of the last prefill (a new sequence)."""
        self._density = {}

    def _edge(self, layer_idx: int, n_layers: int) -> bool:
        return not self.compress_edges and layer_idx in (0, 1, n_layers - 1)

    # --- layer level ----------------------------------------------------------------------------------------
    def layer_budget(self, base: int, layer_idx: int, n_layers: int) -> int:
        return _ALL if self._edge(layer_idx, n_layers) else base

    def n_keep(self, n_seen: int, layer_idx: int, n_layers: int, row: int | None = None) -> int:
        """Slots layer `layer_idx` keeps after `n_seen` tokens: int(r_l * n_seen) with D2O's ratio r_l for the
        batch row `row` (None: the rows' mean density), from the densities of this forward's layers; every token in
        an uncompressed edge layer or at compression_ratio 0; `Method.n_keep` with an absolute budget or before any
        density is known."""
        if self._edge(layer_idx, n_layers) or (self.budget is None and self.compression_ratio == 0):
            return max(1, n_seen)
        if self.budget is not None or layer_idx not in self._density or n_seen >= _ALL:
            return super().n_keep(n_seen, layer_idx, n_layers)
        layers = sorted(self._density)
        d = torch.stack([self._density[i] for i in layers])  # (L, b)
        d = d.mean(1) if row is None else d[:, row]
        r = float(layer_ratios(d, 1.0 - self.compression_ratio)[layers.index(layer_idx)])
        return max(1, min(n_seen, int(n_seen * r)))

    # --- token level ----------------------------------------------------------------------------------------
    def observe(self, x: ScoreInputs) -> None:
        s = x.attention_sum()  # (b, hq, n)
        accumulate_attention(x, "acc", s)  # H2O's accumulated attention, (b, hk, n)
        if x.queries.shape[2] > 1:  # a prefill (or appended) forward: this layer's density
            self._density[x.layer_idx] = attention_density(s, x.valid, x.group).cpu()

    def score(self, x: ScoreInputs) -> torch.Tensor:
        recent = (x.row_keep * self.recent_share).long()
        sinks = x.row_positions < self.n_sink  # H2O's rule, the first n_sink tokens kept too
        return heavy_hitters(x, x.state["acc"], recent).masked_fill(sinks, float("inf"))

    def merge_plan(self, x: ScoreInputs, idx: torch.Tensor, visible: torch.Tensor | None) -> MergePlan | None:
        keys = x.keys.float()
        b, h, n, d = keys.shape
        k = idx.shape[-1]
        valid = torch.ones(b, h, n, dtype=torch.bool, device=keys.device) if x.valid is None else x.valid
        kept = torch.zeros(b, h, n, dtype=torch.bool, device=keys.device).scatter_(2, idx, True)
        shown = torch.ones(b, h, k, dtype=torch.bool, device=keys.device) if visible is None else visible
        shown = shown & valid.gather(2, idx)
        if visible is not None:  # a kept slot left hidden is evicted too
            kept = kept & torch.zeros_like(kept).scatter_(2, idx, shown)
        evicted = valid & ~kept
        kn = F.normalize(keys, dim=-1)
        sim = kn @ kn.gather(2, idx[..., None].expand(b, h, k, d)).transpose(-1, -2)  # (b, h, n, k)
        u, j = sim.masked_fill(~shown[:, :, None, :], float("-inf")).max(-1)  # (b, h, n)
        evicted = evicted & torch.isfinite(u)
        cnt = evicted.sum((1, 2))  # (b,)
        mean_u = torch.where(evicted, u, torch.zeros_like(u)).sum((1, 2)) / cnt.clamp_min(1)
        has = cnt > 0
        tau = mean_u
        if "d2o_tau" in x.row_state:  # the EMA over this sequence's compressions
            old, seen = x.row_state["d2o_tau"], x.row_state["d2o_tau_set"]
            tau = torch.where(seen, self.ema * old + (1.0 - self.ema) * mean_u, mean_u)
            tau = torch.where(has, tau, old)
            seen = seen | has
        else:
            seen = has
        x.row_state["d2o_tau"], x.row_state["d2o_tau_set"] = tau, seen
        merge = evicted & (u >= tau[:, None, None])
        into = idx.gather(2, j.clamp_min(0)).masked_fill(~merge, -1)
        weight = torch.where(kept, torch.full_like(u, math.e), torch.exp(u.masked_fill(~merge, 0.0)))
        return MergePlan(into, weight)
