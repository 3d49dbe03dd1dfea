"""WindowKV (Zuo, Wei, Zhang, Liu, Lu, Song, 2025, "WindowKV: Task-Adaptive Group-Wise KV Cache Window Selection
for Efficient LLM Inference", arXiv:2503.17922).

Tokens are kept in *semantic windows*: runs of `review_window` consecutive tokens (8) scored and kept as units,
so the kept context stays contiguous. The last `window` prompt tokens (the observation window, kept) vote:

    a_{h,t}  = sum_{i in observation window} softmax(q_{i,h} K_h^T / sqrt(d))_t        (per query head h)
    windows  W_j = {t : floor(pos(t) / review_window) = j}, over the tokens before the observation window
    score(W_j) = mean_{h, t in W_j} a_{h,t}                                   (aggregation tasks: "average")
    score(W_j) = mean_h  mean( top_{review_window/2}(a_{h,t} : t in W_j) )   (localization tasks: "max")

The windows are kept best first until the layer's budget is reached; every kv head keeps the same windows. The task
decides the rule: information *localization* (QA, retrieval: "max", observation window 32) or *aggregation*
(summarization: "average", observation window 16), as in the reference code (optim996/WindowKV,
`compress_utils.py`: `suffix_max` 32, `suffix_avg` 16, top review_window // 2).

Intra-group layer sharing: layers are grouped by `shared_layers` (8); the first layer of a group scores and
chooses its windows, the other layers of the group reuse that choice (they compute no attention for it). Budgets
are group-wise, decreasing with depth (the reference's arithmetic `layer_decay_strategy`): with C the review budget
of a layer (its budget minus the observation window), g = shared_layers, G = ceil(L / g) groups,

    k_min = C g / beta,  k_max = 2 C - k_min,  budget(group j) = k_max - (k_max - k_min) j / (G - 1)
    (beta = 14; every layer also keeps its observation window; a beta below g gives every group C, where the
    reference's formula would make the budget grow with depth)

Deviations: the task classifier is a fine-tuned BERT (bert-base-cased + a linear head, trained by the authors on
LongBench-style task labels; the checkpoint is not published with the code), so the mode is a field (`mode`,
default "localization": kvsqueeze's passkey / NIAH / RULER tasks are retrieval) instead of a prediction. The budget
is held exactly (the reference drops ceil((R - C) / review_window) whole windows, keeping up to review_window - 1
tokens fewer than the budget, or more when the last window is partial): the windows are kept best first and the
last kept window may be cut, its first tokens kept, so the bytes equal the base method's at the same
compression_ratio. The reference mixes the rows of a batch in one score; here each row chooses its own windows.
When the number of layers is not a multiple of `shared_layers` the last group is smaller, and the pyramid is
shifted so that the layers' mean budget is still C (with full groups it is the reference's; a group's review
budget never goes below 0). Windows are indexed by
position, so a chunked prefill and decode-time compression (`compression_interval`) keep the same grid. Group
sharing is within layers of one attention type (a sliding-window layer never reuses a full layer's choice).
Tuning on smollm2-135m (issue 14: 2 passkey samples of seed 1, not the evaluated ones): at compression_ratio 0.5
the defaults, `mode=aggregation` and `review_window=16` each answered 1/2, `shared_layers=1` (every layer chooses
its own windows) 0/2; at 0.75 all answered 0/2. No setting beat the reference's, so there is no tuned value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import KVSqueezeError
from .base import Method, ScoreInputs

MODES = {"localization": ("max", 32), "aggregation": ("average", 16)}


def window_scores(attn: torch.Tensor, positions: torch.Tensor, review: torch.Tensor, size: int, rule: str,
                  top: int) -> torch.Tensor:
    """WindowKV's window scores. attn: (batch, q_heads, n) attention each slot received from the observation
    window; positions: (batch, q_heads, n) long, each slot's position in its row; review: (batch, q_heads, n) bool,
    the slots that belong to windows; size: tokens per window; rule: "max" (mean of each head's `top` largest values,
    averaged over heads) or "average" (mean over heads and tokens). Returns (batch, n_windows) float, window j
    covering positions [j * size, (j + 1) * size); -inf for a window without slots. Raises KVSqueezeError for an
    unknown rule."""
    b, hq, n = attn.shape
    last = int(positions.masked_fill(~review, -1).max()) if bool(review.any()) else -1
    n_win = last // size + 1 if last >= 0 else 0
    if n_win == 0:
        return torch.empty(b, 0, device=attn.device)
    cells = n_win * size
    idx = positions.clamp(min=0).masked_fill(~review, cells)  # the spare last cell takes the other slots
    grid = torch.full((b, hq, cells + 1), float("nan"), device=attn.device)
    grid.scatter_(-1, idx, attn.float().masked_fill(~review, float("nan")))
    grid = grid[..., :cells].view(b, hq, n_win, size)
    present = ~grid.isnan()
    count = present.sum(-1)  # (b, hq, n_win): the same for every head of a row
    if rule == "average":
        total = grid.nan_to_num(0.0).sum((1, 3))
        cnt = count.sum(1)
        return torch.where(cnt > 0, total / cnt.clamp(min=1), torch.full_like(total, float("-inf")))
    if rule == "max":
        vals = grid.nan_to_num(float("-inf")).sort(dim=-1, descending=True).values
        k = count.clamp(max=top)  # top-k of the window's present tokens (the reference: min(top, window length))
        take = torch.arange(size, device=attn.device) < k[..., None]
        per_head = torch.where(take, vals, torch.zeros_like(vals)).sum(-1) / k.clamp(min=1)
        out = per_head.mean(1)
        return out.masked_fill(count[:, 0] == 0, float("-inf"))
    raise KVSqueezeError(f"unknown WindowKV window rule {rule!r}; choose 'max' or 'average'")


def window_ranks(scores: torch.Tensor) -> torch.Tensor:
    """(batch, n_windows) window scores -> (batch, n_windows) float priorities: n_windows - rank for a window with
    slots (rank 0: the best; ties: the earlier window first), 0 for one without."""
    b, n_win = scores.shape
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n_win, device=scores.device).expand(b, n_win))
    return torch.where(scores > float("-inf"), (n_win - rank).float(), torch.zeros_like(scores, dtype=torch.float))


def group_budget(base: int, window: int, layer_idx: int, n_layers: int, shared: int, beta: float) -> int:
    """WindowKV's group-wise budget of a layer (the module docstring's pyramid over groups of `shared` layers, plus
    the observation `window` every layer keeps), from the mean budget `base` per layer."""
    w = min(window, base)
    c = base - w
    n_groups = math.ceil(n_layers / shared)
    if n_groups <= 1:
        return base
    k_min = c * min(1.0, shared / beta)  # beta < shared: uniform (the formula would grow with depth)
    k_max = 2 * c - k_min
    step = (k_max - k_min) / (n_groups - 1)
    mean_group = sum(i // shared for i in range(n_layers)) / n_layers  # (G - 1) / 2 with full groups
    return max(0, int(round(c + step * (mean_group - layer_idx // shared)))) + w


@dataclass(kw_only=True)
class WindowKV(Method):
    """WindowKV (arXiv 2503.17922): semantic windows of `review_window` tokens chosen task-adaptively (`mode`),
    the selected indices shared by the `shared_layers` layers of a group (the rule and deviations: module
    docstring). Scores (b, kv_heads, n) per the `Method` protocol."""
    mode: str = "localization"  # "localization" (max rule) or "aggregation" (average rule): the task's kind
    review_window: int = 8  # tokens per semantic window
    window: int | None = None  # the observation window (kept): 32 for localization, 16 for aggregation
    top: int | None = None  # the max rule's top-k per head: review_window // 2
    shared_layers: int = 8  # layers per group sharing the first layer's windows (and one budget)
    beta: float = 14.0

    name = "windowkv"
    summary = "windows of 8 consecutive tokens scored as units (task-adaptive max / average rule), shared by groups of layers"

    def __post_init__(self):
        super().__post_init__()
        self._shared: dict = {}  # group -> the first layer's window ranking (run-time memo, not a parameter)
        if self.mode not in MODES:
            raise KVSqueezeError(f"unknown WindowKV mode {self.mode!r}; choose from: {', '.join(MODES)}")
        if self.window is None:
            self.window = MODES[self.mode][1]
        if self.top is None:
            self.top = max(1, self.review_window // 2)
        for what, v in (("review_window", self.review_window), ("window", self.window), ("top", self.top),
                        ("shared_layers", self.shared_layers)):
            if v < 1:
                raise KVSqueezeError(f"WindowKV {what} must be >= 1, got {v}")
        if not self.beta > 0:
            raise KVSqueezeError(f"WindowKV beta must be > 0, got {self.beta}")

    @property
    def rule(self) -> str:
        return MODES[self.mode][0]

    def reset(self) -> None:
        """Forget the group choices (a fresh request)."""
        self._shared.clear()

    def layer_budget(self, base: int, layer_idx: int, n_layers: int) -> int:
        return group_budget(base, self.window, layer_idx, n_layers, self.shared_layers, self.beta)

    def score(self, x: ScoreInputs) -> torch.Tensor:
        """(batch, kv_heads, n) priorities, the same for every kv head: the observation window +inf, then the
        windows best first (each window's first tokens first, so a budget cuts at most the last kept window),
        invalid slots -inf. The first layer of a group scores the windows; the group's later layers in the same
        forward reuse its ranking (keyed by group, layer type, tokens seen, batch size and padding)."""
        pos = x.row_positions  # (b, hk, n)
        valid = pos >= 0 if x.valid is None else x.valid & (pos >= 0)
        suffix = x.recent(self.window)
        group = x.layer_idx // self.shared_layers
        key = (group, x.sliding_window, x.seen, pos.shape[0],
               None if x.n_pad is None else tuple(x.n_pad.tolist()))
        entry = self._shared.get(key[:2])
        if entry is not None and entry[0] == key[2:] and entry[1] < x.layer_idx:
            ranks = entry[2].to(pos.device)  # a later layer of the group: the first layer's windows (its device)
        else:
            w = min(self.window, x.queries.shape[2])
            attn = x.attention_sum(last=w)  # (b, hq, n)
            review = (valid & ~suffix).repeat_interleave(x.group, dim=1)
            ranks = window_ranks(window_scores(attn, pos.repeat_interleave(x.group, dim=1), review,
                                               self.review_window, self.rule, self.top))
            self._shared[key[:2]] = (key[2:], x.layer_idx, ranks)
        wid = (pos.clamp(min=0) // self.review_window)
        inside = wid < ranks.shape[1]
        prio = ranks.gather(1, wid.clamp(max=max(ranks.shape[1] - 1, 0)).flatten(1)).view_as(pos.float()) \
            if ranks.shape[1] else torch.zeros_like(pos, dtype=torch.float)
        prio = prio.masked_fill(~inside, 0.0)
        # within a window its first tokens first (only the last kept window can be cut)
        prio = prio + 0.5 * (1.0 - (pos.clamp(min=0) % self.review_window).float() / self.review_window)
        prio = prio.masked_fill(suffix, float("inf"))
        return prio.masked_fill(~valid, float("-inf"))

    def describe(self) -> str:
        amount = (f"budget={self.budget}" if self.budget is not None
                  else f"compression_ratio={self.compression_ratio}")
        return f"windowkv({amount}, {self.mode})"
