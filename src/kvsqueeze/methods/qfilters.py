"""Q-Filters (Godey et al., 2025, "Q-Filters: Leveraging QK Geometry for Efficient KV Cache Compression").

Queries of a head concentrate along one direction; keys that point along it draw attention. Calibrated per
model, on the fly, from post-RoPE queries on calibration text:

    Q_h = [q_1; ...; q_N] (N sampled vectors per query head),  Q_h = U S V^T  (fp32 SVD)
    v_h = V[:, 0],  s_h = +1 if most entries of U[:, 0] are positive else -1
    f_g = mean_{h in GQA group g} s_h v_h
    score(t) = < K_t, f_g >                                    (per kv head g; higher = keep)

Filters are computed from recorded queries by `filters_from_queries` (this file: the rule); recording the queries
and keeping the filters as safetensors in a cache directory keyed by the model is the runtime's job
(`kvsqueeze.runtime.calibration`, `kvsqueeze calibrate qfilters`); no hub download. Optional `window` keeps the most recent tokens as in the paper's streaming setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVSqueezeError
from .base import Method, ScoreInputs


def filters_from_queries(queries: dict[int, torch.Tensor], n_kv: int) -> torch.Tensor:
    """Q-Filters from sampled post-RoPE queries: `queries[layer]` is (q_heads, N, head_dim) (N vectors per query
    head); returns (n_layers, n_kv, head_dim) float32: per query head the first right singular vector of its
    queries, signed so that most of them project positively (`s_h`), then averaged over each GQA group."""
    layers = []
    for li in sorted(queries):
        q = queries[li].float()
        filt = []
        for h in range(q.shape[0]):
            u, _, vh = torch.linalg.svd(q[h], full_matrices=False)
            sign = 1.0 if (u[:, 0] > 0).sum() > u.shape[0] / 2 else -1.0
            filt.append(sign * vh[0])
        f = torch.stack(filt)  # (hq, d)
        layers.append(f.view(n_kv, -1, f.shape[-1]).mean(1))
    return torch.stack(layers)


@dataclass(kw_only=True)
class QFilters(Method):
    window: int = 0
    filters: torch.Tensor | None = None  # (n_layers, kv_heads, head_dim); calibrated when None

    name = "qfilters"
    summary = "project keys on each head's main query direction (calibrated per model, no hub)"

    calibration = "qfilters"  # the runtime fills `filters` (kvsqueeze.runtime.calibration.prepare)

    def setup(self, model) -> None:
        if self.filters is None:
            raise KVSqueezeError("Q-Filters have no filters: build the cache with CompressedCache (which calibrates "
                                 "them) or call kvsqueeze.runtime.calibration.prepare(method, model)")

    def score(self, x: ScoreInputs) -> torch.Tensor:
        if self.filters.device != x.keys.device or self.filters.dtype != torch.float32:
            self.filters = self.filters.to(x.keys.device, torch.float32)  # once: loaded or calibrated on the CPU
        f = self.filters[x.layer_idx]  # (hkv, d)
        scores = torch.einsum("bhnd,hd->bhn", x.keys.float(), f)
        if self.window:
            scores = scores.masked_fill(x.recent(self.window), float("inf"))
        return scores
