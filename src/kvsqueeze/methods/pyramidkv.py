"""PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling").

Lower layers attend broadly, upper layers to a few tokens, so the budget decreases linearly with depth under a
fixed total. With an average budget C per layer and an observation window w (kept in every layer):

    k_min = (C - w) / beta,   k_max = 2 (C - w) - k_min,
    budget(l) = k_max - (k_max - k_min) * l / (L - 1) + w          (mean over layers = C)

Scores come from another method (SnapKV's by default): `PyramidKV(scorer=TOVA())` composes.
Deviation: the reference code steps by (k_max - k_min) // L, so its last layer gets slightly more than k_min;
this interpolates exactly from k_max to k_min. Each layer really stores its own number of slots (memory is freed;
the attention mask is built per layer from the cache).
"""

from dataclasses import dataclass, field

from .base import Delegating, Method
from .snapkv import SnapKV


@dataclass(kw_only=True)
class PyramidKV(Delegating, Method):
    scorer: Method = field(default_factory=SnapKV)
    beta: float = 20.0

    name = "pyramidkv"
    summary = "SnapKV scores with per-layer budgets decreasing linearly with depth"

    def n_keep(self, n_seen: int, layer_idx: int, n_layers: int) -> int:
        """As `Method.n_keep`, except that compression_ratio 0 (nothing removed) keeps every token in every layer: the
        pyramid of a full budget would clamp the lower layers to `n_seen` and still evict from the upper ones
        (kvpress's presses do not compress at compression_ratio 0)."""
        if self.budget is None and self.compression_ratio == 0:
            return n_seen
        return super().n_keep(n_seen, layer_idx, n_layers)

    def layer_budget(self, base: int, layer_idx: int, n_layers: int) -> int:
        w = min(getattr(self.scorer, "window", 0), base)
        c = base - w
        k_min = c / self.beta
        k_max = 2 * c - k_min
        frac = layer_idx / max(1, n_layers - 1)
        return int(round(k_max - (k_max - k_min) * frac)) + w

