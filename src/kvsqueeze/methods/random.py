"""Random eviction: the floor any scoring rule must beat.

    score(t) = hash(seed, layer, tokens seen by the row, kv head, pos(t)) / 2^32  ~ U(0, 1)

A deterministic integer hash instead of a generator's stream: the draws are independent across layers, kv heads,
slots and eviction steps, and a row keeps the same tokens whether it runs alone or inside a left-padded batch
(pos(t) and the tokens seen are counted in the row's own frame, without its padding). Two rows of the same length
therefore keep the same positions.
"""

from dataclasses import dataclass

import torch

from .base import Method, ScoreInputs

_MASK = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (int64 tensors holding values < 2^32; products stay below 2^63)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK
    return (x >> 16) ^ x


def uniform_hash(*parts: torch.Tensor | int) -> torch.Tensor:
    """Uniform [0, 1) floats, a deterministic function of the integer parts (broadcast together)."""
    x = torch.zeros((), dtype=torch.long)
    for p in parts:
        p = torch.as_tensor(p, dtype=torch.long)
        x = _mix((x.to(p.device) * 0x7FEB352D + p) & _MASK)  # x < 2^32, multiplier < 2^31: below 2^63
    return x.double().div(2.0**32).float()


@dataclass(kw_only=True)
class Random(Method):
    seed: int = 0

    name = "random"
    summary = "keep a uniformly random subset (a floor to beat)"

    def score(self, x: ScoreInputs) -> torch.Tensor:
        b, h, n = x.positions.shape
        heads = torch.arange(h, device=x.keys.device)[None, :, None]
        return uniform_hash(self.seed, x.layer_idx, x.row_seen[:, None, None], heads, x.row_positions).expand(b, h, n)
