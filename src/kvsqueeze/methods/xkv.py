"""xKV (Chang et al., 2025, "xKV: Cross-Layer SVD for KV-Cache Compression", arXiv:2503.18893).

The dominant singular vectors of adjacent layers' KV caches are well aligned, so a group of G adjacent layers
shares one low-rank token basis. For the keys (and separately the values) of a group, with T tokens and
F = kv_heads * head_dim features per layer:

    X = [X_1 | X_2 | ... | X_G]            (T, G F)  the layers' caches side by side along the features
    X ~ U_r S_r V_r^T                       truncated SVD, rank r
    A = U_r S_r (T, r)   shared by the group;   B_l = (V_r^T)[:, l-th block] (r, F)   per layer
    X_l ~ A B_l                             reconstructed per layer on read

Group size G = 4 (the paper's xKV-4, its main setting; the last group is smaller when G does not divide the
layers), every layer from `start_layer` (0) on. Rank from the target ratio: a rank r holds T r + r G F numbers per
half, so `compression_ratio` (the fraction of the group's bytes removed) gives r_k + r_v = 2 (1 - ratio) G T F /
(T + G F), split 0.4 : 0.6 between keys and values (the paper's ranks 512 : 768 on Llama-3.1-8B,
`value_rank_share`). Storage: `kvsqueeze.storage.crosslayer.XKVStore`; `CacheStats` counts A once per group.
Tokens appended after the prefill (question, decoded tokens) are kept per layer in full precision, as the
reference code does (it compresses the prefill only). The SVD runs per batch row in float32 (as the reference) over
the row's own tokens (left padding excluded), so a padded row gets the factors it gets alone.

Deviations, written down:
- Keys are factored post-RoPE: kvsqueeze stores post-RoPE keys (storage knows no model), while the paper and its
  code factor pre-RoPE keys and re-apply RoPE on read. Post-RoPE keys are less low-rank, so a rank holds less of
  the keys than in the paper.
- compression_ratio 0 factors nothing (the layers keep their exact state), where a rank equal to the full width
  would only round.

Composition: not with token eviction (the shared factor A needs the same tokens in every layer and kv head of a
group; per-layer or per-head eviction keeps different ones), so xKV takes no scorer and `budget` is refused; not
with quantized storage (`--quant`: refused with one line). It composes with decode-time selection.
Layer kinds: a group holding a sliding-window layer is not merged (its window drops tokens as decoding goes);
models alternating sliding and full layers (Gemma 2/3) are left as the method's eviction leaves them. The static
(compiled) decode path refuses cross-layer storage with one line (eager decoding only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVSqueezeError
from ..storage.crosslayer import CrossLayerPlan
from .base import Method, ScoreInputs


@dataclass(kw_only=True)
class XKV(Method):
    """xKV (see the module docstring): groups of `group_size` adjacent layers from `start_layer` on share one SVD
    token basis; `compression_ratio` sets the ranks (`value_rank_share` of the rank goes to the values). Nothing is
    evicted. Raises KVSqueezeError for a budget, group_size < 1, value_rank_share outside (0, 1) or
    compression_interval > 0."""

    group_size: int = 4
    value_rank_share: float = 0.6
    start_layer: int = 0

    name = "xkv"
    summary = ("groups of 4 adjacent layers share one low-rank token basis (cross-layer SVD of keys and of values), "
               "per-layer coefficients; compression_ratio sets the rank; nothing evicted")

    def __post_init__(self):
        super().__post_init__()
        if self.budget is not None:
            raise KVSqueezeError("xkv evicts no token: its compression_ratio sets the SVD rank; --budget is not "
                                 "supported")
        if self.group_size < 1:
            raise KVSqueezeError(f"xkv: group_size must be >= 1, got {self.group_size}")
        if not 0.0 < self.value_rank_share < 1.0:
            raise KVSqueezeError(f"xkv: value_rank_share must be in (0, 1), got {self.value_rank_share}")
        if self.compression_interval > 0:
            raise KVSqueezeError("xkv factors the prefill's cache; it evicts nothing while decoding "
                                 "(compression_interval must be 0)")
        if self.start_layer < 0:
            raise KVSqueezeError(f"xkv: start_layer must be >= 0, got {self.start_layer}")

    def n_keep(self, n_seen: int, layer_idx: int, n_layers: int) -> int:
        return n_seen  # nothing is evicted: the bytes go in the rank

    def score(self, x: ScoreInputs) -> torch.Tensor:
        return torch.zeros(x.positions.shape, device=x.keys.device)

    def cross_layer_plan(self, n_layers: int) -> CrossLayerPlan:
        """Consecutive groups of `group_size` layers from `start_layer` (the last one smaller); a group holding
        an exempt layer is not factored."""
        groups = [tuple(range(i, min(i + self.group_size, n_layers)))
                  for i in range(self.start_layer, n_layers, self.group_size)]
        groups = [g for g in groups if not set(g) & set(self.exempt_layers)]
        return CrossLayerPlan("xkv", groups, {"keep": 1.0 - self.compression_ratio,
                                              "value_share": self.value_rank_share})

    def describe(self) -> str:
        return f"xkv(compression_ratio={self.compression_ratio}, group_size={self.group_size})"
