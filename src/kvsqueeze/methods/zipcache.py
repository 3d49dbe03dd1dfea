"""ZipCache's saliency (He et al., 2024, "ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token
Identification"): which tokens matter; its storage is `kvsqueeze.quant.zipcache`.

Accumulated attention (H2O) favours early tokens, because under a causal mask token i is attended by T - i
queries only. ZipCache normalises by that count:

    p_i = sum_k A[k, i] / nnz(A[:, i])          nnz(A[:, i]) = number of queries that can attend to token i

and estimates it from a few *probe* queries (5% most recent + 5% random in the paper), so the prefill itself
runs with a fast kernel and only the probes' attention rows are computed: here the probe rows are recomputed
from the post-RoPE queries and cached keys (fp32, in chunks), the model keeps sdpa. The denominator counts the
probes that can attend to token i (probe position >= i). Scores are summed over the query heads of a GQA group.

Deviations: the probe set is sampled per layer with a fixed seed; the share of salient tokens is the method's
budget (`compression_ratio`, the Method field, is here the share of tokens held in low precision when the storage is
mixed precision: the fraction removed from the high-precision set).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.attention_probs import attention_chunks
from .base import Method, ScoreInputs


def probe_indices(w: int, recent: float, random: float, seed: int, device) -> torch.Tensor:
    """Indices among the `w` queries of this forward: the last ceil(recent*w), plus ceil(random*w) others at random."""
    n_recent = max(1, int(-(-recent * w // 1)))
    n_recent = min(n_recent, w)
    idx = torch.arange(w - n_recent, w, device=device)
    n_rand = min(w - n_recent, int(-(-random * w // 1)))
    if n_rand > 0:
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(w - n_recent, generator=g)[:n_rand].to(device)
        idx = torch.cat([pick.sort().values, idx])
    return idx


@dataclass(kw_only=True)
class ZipCacheSaliency(Method):
    """Normalised attention of probe queries; higher = salient (kept in high precision by a mixed-precision store,
    `kvsqueeze.quant.zipcache`; over full-precision storage it is an eviction score like any other)."""

    probe_recent: float = 0.05
    probe_random: float = 0.05
    seed: int = 0

    name = "zipcache"
    summary = "normalised attention (attention sum / queries that can attend) of 5%+5% probe queries"

    def score(self, x: ScoreInputs) -> torch.Tensor:
        """(batch, kv_heads, n) normalised probe attention. In a left-padded batch each row draws its probes
        among its own real queries, as it does alone."""
        w = x.queries.shape[2]
        n_real = x.query_valid().sum(-1).tolist()
        if all(v == w for v in n_real):
            return self._score(x, x.queries, x.keys, x.positions, x.valid, w, w)
        rows = []
        for r, v in enumerate(n_real):
            valid = None if x.valid is None else x.valid[r : r + 1]
            rows.append(self._score(x, x.queries[r : r + 1], x.keys[r : r + 1], x.positions[r : r + 1], valid, w, v))
        return torch.cat(rows)

    def _score(self, x: ScoreInputs, q_all, keys, k_pos, valid, w: int, n_real: int) -> torch.Tensor:
        """Scores of rows whose last `n_real` of the `w` queries of this forward are real."""
        b, hq, _, d = q_all.shape
        if n_real < 1:
            return keys.new_zeros(keys.shape[:3], dtype=torch.float32)
        idx = probe_indices(n_real, self.probe_recent, self.probe_random, self.seed + x.layer_idx, q_all.device)
        idx = idx + (w - n_real)
        q = q_all[:, :, idx].float()
        q_pos = (x.seen - w + idx).to(k_pos.dtype)  # (p,)
        hk, n = keys.shape[1], keys.shape[2]
        g = hq // hk
        acc = torch.zeros(b, hk, n, device=keys.device)
        cnt = torch.zeros(b, hk, n, device=keys.device)
        for c in attention_chunks(q, keys, scaling=x.scaling, softcap=x.softcap, q_positions=q_pos,
                                  k_positions=k_pos, valid=valid):
            acc += c.probs.view(b, hk, g, -1, n).sum(dim=(2, 3))
            cnt += c.allowed.sum(dim=(2, 3)).float() * g  # every query head of the group is a probe row
        return acc / cnt.clamp_min(1.0)
