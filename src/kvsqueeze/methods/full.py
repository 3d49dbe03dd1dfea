"""No compression: every KV entry is kept (the reference every method is measured against)."""

from dataclasses import dataclass

import torch

from .base import Method, ScoreInputs


@dataclass(kw_only=True)
class Full(Method):
    """Keeps the whole cache; `compression_ratio`, `budget` and `compression_interval` are ignored (n_keep = tokens
    seen; a decoding step never evicts)."""

    name = "full"
    summary = "no compression: keep every token (the baseline)"

    def __post_init__(self):
        super().__post_init__()
        self.compression_interval = 0  # the prefill budget would otherwise evict a slot at every decoding step

    def n_keep(self, n_seen: int, layer_idx: int, n_layers: int) -> int:
        return n_seen

    def describe(self) -> str:
        return self.name

    def score(self, x: ScoreInputs) -> torch.Tensor:
        return torch.zeros(x.positions.shape, device=x.keys.device)
