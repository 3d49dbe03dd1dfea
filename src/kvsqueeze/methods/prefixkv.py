"""PrefixKV (Wang, Chen, Li, Tan, Zhang, Cai, Lin, Han, Ding, 2024, "PrefixKV: Adaptive Prefix KV Cache is What
Vision Instruction-Following Models Need for Efficient Generation", arXiv:2412.03409), for text models.

Layers differ in how concentrated their attention is, so each layer gets its own cache size. In layer l, sort the
n tokens by importance (attention received, summed over the prompt's queries, averaged over the heads) and take
the cumulative share of importance of the top-k, c_l(k) = sum_{i <= k} s_(i) / sum_i s_i. One global threshold p
sets every layer's retained prefix, the shortest one that keeps a share p of the layer's importance:

    kept_l(p)   = min{k : c_l(k) >= p}
    forget_l(p) = max(0, n - kept_l(p) - protect)          (protect: the sinks and the last token, always kept)
    p found by binary search on [0, 1] so that sum_l forget_l(p) = compression_ratio * L * n  (within 5 tokens),
    then the forget counts are rescaled to sum exactly to that target (the reference code's last step).

The paper estimates the per-layer sizes offline, on a few calibration samples, and reuses them for every prompt
(its "offline global prefix configuration estimation"): the search runs per sample and the per-layer removed
fractions forget_l / n are averaged over the samples. This is that offline variant: `profiles` holds the sorted
cumulative importance c_l of each calibration sample ((samples, layers, n_cal)), computed once per model by
`kvsqueeze.runtime.calibration` (forward passes over the shipped calibration text, cached as safetensors under
$KVSQUEEZE_CACHE like Q-Filters' filters); the search runs here for the compression_ratio asked. At run time a
layer keeps budget_l = base * share_l / mean(share) tokens (share_l = 1 - mean forget_l / n: about n * share_l at a
compression_ratio; `Budgets` holds them), and its tokens are the top budget_l by the same importance, accumulated
over every forward (as H2O's), averaged over the kv heads: every head keeps the same tokens, the first `n_sink`
tokens and the last token always among them (the reference's start_size, 1 in its evaluation scripts, and
protect_size 1).

Deviations: the online variant (the search on the prompt's own attention of every layer) is not implemented: it
needs every layer's attention before any layer's budget, and kvsqueeze evicts each layer right after its
attention. An absolute `budget` B is read, for the shape of the allocation, as the compression_ratio
1 - B / n_cal of the calibration samples (n_cal tokens each), then scaled to B per layer on average. While
decoding (`compression_interval` > 0) each layer is held at its prefill budget by the same importance (the
reference drops one token at a fixed distance from the end instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVSqueezeError
from .base import Method, ScoreInputs
from .h2o import accumulate_attention


def cumulative_profiles(importance: torch.Tensor) -> torch.Tensor:
    """PrefixKV's c_l: importance (..., n) >= 0 -> (..., n) float64, the importance sorted in descending order,
    normalised to sum 1 and accumulated (the last entry is 1). Raises KVSqueezeError for a row summing to 0."""
    s = importance.double().sort(dim=-1, descending=True).values
    total = s.sum(-1, keepdim=True)
    if bool((total <= 0).any()):
        raise KVSqueezeError("PrefixKV: an importance profile sums to 0 (no attention recorded)")
    return (s / total).cumsum(-1)


def _forget(profile: torch.Tensor, p: float, protect: int) -> torch.Tensor:
    """(layers,) long: n - kept_l(p) - protect, at least 0, with kept_l(p) = searchsorted(c_l, p) + 1."""
    n = profile.shape[-1]
    idx = torch.searchsorted(profile, torch.full((profile.shape[0], 1), p, dtype=profile.dtype), right=False)
    return (n - (idx.squeeze(-1) + 1) - protect).clamp(min=0)


def forget_counts(profile: torch.Tensor, compression_ratio: float, protect: int, tol: int = 5,
                  max_steps: int = 200) -> torch.Tensor:
    """PrefixKV's search for one sample. profile: (layers, n) cumulative importance (`cumulative_profiles`);
    compression_ratio in [0, 1): the share of the L * n tokens to remove; protect: tokens never removed per layer.
    Returns (layers,) long: tokens removed per layer, summing to int(compression_ratio * L * n) up to the
    truncation of the final rescaling (the reference's `obtain_cdf_num` and rescaling, same stopping rule: the
    bisection on p in [0, 1] stops within `tol` tokens of the target)."""
    layers, n = profile.shape
    target = layers * n * compression_ratio
    lo, hi, mid = 0.0, 1.0, 0.0
    for _ in range(max_steps):
        if not lo < hi:
            break
        mid = (lo + hi) / 2.0
        count = int(_forget(profile, mid, protect).sum())
        if abs(count - target) < tol:
            break
        if count < target:
            hi = mid
        else:
            lo = mid
    forget = _forget(profile, mid, protect).double()
    if float(forget.sum()) > 0:
        forget = forget * target / forget.sum()
    return forget.long()


def layer_shares(profiles: torch.Tensor, compression_ratio: float, protect: int) -> torch.Tensor:
    """(layers,) float64: the share of its tokens each layer keeps, 1 - the removed fraction forget_l / n averaged
    over the calibration samples. profiles: (samples, layers, n)."""
    n = profiles.shape[-1]
    fractions = torch.stack([forget_counts(p, compression_ratio, protect).double() / n for p in profiles])
    return 1.0 - fractions.mean(0)


@dataclass(kw_only=True)
class PrefixKV(Method):
    """PrefixKV (arXiv 2412.03409): per-layer budgets from one global threshold on the cumulative importance of
    importance-sorted tokens, found by binary search over offline `profiles` (calibrated on first use;
    `kvsqueeze calibrate prefixkv`); the rule and deviations: module docstring. Scores (b, kv_heads, n)."""
    profiles: torch.Tensor | None = None  # (samples, layers, n_cal) cumulative importance; calibrated when None
    n_sink: int = 1  # first tokens always kept (the reference's start_size)

    name = "prefixkv"
    summary = "per-layer budgets: one global share of cumulative attention kept per layer (binary search, calibrated offline)"
    stateful = True
    calibration = "prefixkv"  # the runtime fills `profiles` (kvsqueeze.runtime.calibration.prepare)

    def __post_init__(self):
        super().__post_init__()
        self._shares: dict = {}  # compression_ratio -> keep shares (a cache of `shares`, not a parameter)
        if self.n_sink < 0:
            raise KVSqueezeError(f"PrefixKV n_sink must be >= 0, got {self.n_sink}")

    def setup(self, model) -> None:
        if self.profiles is None:
            raise KVSqueezeError("PrefixKV has no calibration profiles: build the cache with CompressedCache (which "
                                 "calibrates them) or call kvsqueeze.runtime.calibration.prepare(method, model)")

    def shares(self, n_layers: int) -> torch.Tensor:
        """(layers,) keep shares for this method's compression_ratio (or, with an absolute budget, the ratio
        1 - budget / n_cal); computed once per ratio. Raises KVSqueezeError when the profiles are missing or were
        calibrated for another number of layers."""
        if self.profiles is None:
            self.setup(None)
        if self.profiles.dim() != 3 or self.profiles.shape[1] != n_layers:
            raise KVSqueezeError(f"PrefixKV profiles of shape {tuple(self.profiles.shape)} do not fit a model with "
                                 f"{n_layers} layers (expected (samples, {n_layers}, tokens))")
        n_cal = self.profiles.shape[-1]
        ratio = self.compression_ratio if self.budget is None else min(max(1.0 - self.budget / n_cal, 0.0),
                                                                       1.0 - 1.0 / n_cal)
        key = round(ratio, 6)
        if key not in self._shares:
            self._shares[key] = layer_shares(self.profiles.double().cpu(), ratio, self.n_sink + 1)
        return self._shares[key]

    def n_keep(self, n_seen: int, layer_idx: int, n_layers: int) -> int:
        """As `Method.n_keep`; compression_ratio 0 keeps every token in every layer."""
        if self.budget is None and self.compression_ratio == 0:
            return n_seen
        return super().n_keep(n_seen, layer_idx, n_layers)

    def layer_budget(self, base: int, layer_idx: int, n_layers: int) -> int:
        """round(base * share_l / mean(share)): the layer's calibrated share of the mean budget `base`."""
        s = self.shares(n_layers)
        mean = float(s.mean())
        if mean <= 0:
            return base
        return int(round(base * float(s[layer_idx]) / mean))

    def observe(self, x: ScoreInputs) -> None:
        """Accumulate the attention every slot receives from this forward's queries, summed over each GQA group:
        `state["prefixkv_acc"]` (batch, kv_heads, n)."""
        accumulate_attention(x, "prefixkv_acc")  # H2O's accumulated attention, (b, hk, n)

    def score(self, x: ScoreInputs) -> torch.Tensor:
        """(batch, kv_heads, n): the accumulated attention averaged over the kv heads (every head the same), the
        first `n_sink` tokens and the last token +inf."""
        acc = x.state["prefixkv_acc"]
        s = acc.float().mean(1, keepdim=True).expand_as(acc)  # every head: the head-averaged importance
        keep = (x.row_positions < self.n_sink) | x.recent(1)
        return s.masked_fill(keep, float("inf"))
