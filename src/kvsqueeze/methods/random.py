"""Random eviction: the floor any scoring rule must beat.

    score(t) ~ U(0, 1), i.i.d. per (batch, kv head, slot); seeded per layer for reproducibility.
"""

from dataclasses import dataclass

import torch

from .base import Method, ScoreInputs


@dataclass(kw_only=True)
class Random(Method):
    seed: int = 0

    name = "random"
    summary = "keep a uniformly random subset (a floor to beat)"

    def score(self, x: ScoreInputs) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + x.layer_idx * 1_009 + x.layer.cumulative_length)
        return torch.rand(x.positions.shape, generator=gen).to(x.keys.device)
