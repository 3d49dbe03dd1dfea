"""The method API: a method says which KV entries matter.

A method scores the slots of one layer (`score` -> (batch, kv_heads, n), higher = keep); the cache keeps the top
`n_keep` per kv head and frees the rest. A method never sees how slots are stored, offloaded or quantized.

Budgets: `compression_ratio` is the fraction of tokens removed (kvpress's name and definition: 0.75 keeps a
quarter), or `budget` is an absolute number of tokens kept per layer; `exempt_layers` are never compressed;
`layer_budget` can redistribute the budget across layers (PyramidKV). Compression runs at the prefill
(question-agnostic when the question comes after the compressed context) and, when `compression_interval` > 0,
every that many decoding steps, holding each layer at its budget (H2O, TOVA): a `compression_ratio` budget is fixed
by the prefill, an absolute one larger than the prompt is grown to first (see `CompressedCache.budget`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import KVSqueezeError
from ..kernels.attention_probs import attention_chunks, attention_sum


@dataclass
class ScoreInputs:
    """What a method may look at for one layer, after that layer's attention: tensors only (the runtime builds it
    from the layer; a method never sees how or where the slots are stored).

    Shapes: b rows, hq query heads, hk kv heads, n slots, q tokens in this forward, d head_dim."""

    layer_idx: int
    n_layers: int
    queries: torch.Tensor  # (b, hq, q, d) post-RoPE queries of this forward
    keys: torch.Tensor  # (b, hk, n, d) every slot's key, this forward's tokens included (post-RoPE)
    values: torch.Tensor  # (b, hk, n, d)
    positions: torch.Tensor  # (b, hk, n) int: each slot's position (token index) in the batch's frame
    valid: torch.Tensor | None  # (b, hk, n) bool: False for padding / hidden / empty slots; None: all valid
    n_pad: torch.Tensor | None  # (b,) long: left-padding tokens each row has seen (None: no padding)
    seen: int  # tokens seen by the layer (padding included)
    state: dict  # slot-aligned tensors (b, hk, n, ...) that follow the slots through eviction (method-owned)
    scaling: float
    softcap: float | None
    n_keep: int  # slots this layer will keep per kv head (0 when only observing)
    keep_per_row: torch.Tensor | None = None  # (b,) long: each row's own budget in a left-padded batch
    sliding_window: int | None = None  # the layer's window (a sliding layer's queries see the last w positions)
    memo: dict | None = None  # shared by every method scoring the same recorded prefill (a sweep)
    scratch: dict = field(default_factory=dict)  # this call's own: what `score` leaves for `merge_plan`
    row_state: dict = field(default_factory=dict)  # per-row tensors (b, ...) the method keeps for the sequence

    @property
    def row_positions(self) -> torch.Tensor:
        """(batch, kv_heads, n) long: each slot's position counted from its own row's first real token (a
        left-padded row's positions as if it ran alone; padding slots are negative). Position-based rules use
        these, never `positions`."""
        pos = self.positions.long()
        return pos if self.n_pad is None else pos - self.n_pad[:, None, None]

    @property
    def row_seen(self) -> torch.Tensor:
        """(batch,) long: real tokens each row has seen (its padding not counted)."""
        seen = torch.full((self.positions.shape[0],), self.seen, dtype=torch.long, device=self.positions.device)
        return seen if self.n_pad is None else seen - self.n_pad

    @property
    def row_keep(self) -> torch.Tensor:
        """(batch,) long: slots each row keeps (its own budget in a left-padded batch; else `n_keep`)."""
        if self.keep_per_row is None:
            return torch.full((self.keys.shape[0],), self.n_keep, dtype=torch.long, device=self.keys.device)
        return self.keep_per_row

    @property
    def group(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]

    def query_valid(self, last: int | None = None) -> torch.Tensor:
        """(batch, w) bool: which of this forward's queries (the last `last`) are real, not left padding."""
        w = self.queries.shape[2] if last is None else min(last, self.queries.shape[2])
        q_pos = self.row_seen[:, None] - w + torch.arange(w, device=self.row_seen.device)
        return q_pos >= 0

    def to_kv_heads(self, x: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        """(batch, q_heads, ...) -> (batch, kv_heads, ...), reducing within each GQA group."""
        b, hq = x.shape[:2]
        x = x.reshape(b, hq // self.group, self.group, *x.shape[2:])
        return x.mean(2) if reduce == "mean" else x.sum(2)

    def _window(self, last: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """This forward's queries (the last `last`), (batch, q_heads, w, head_dim), and their positions (b, w) in
        each row's own frame."""
        q = self.queries if last is None else self.queries[:, :, -last:]
        w = q.shape[2]
        return q, self.row_seen[:, None] - w + torch.arange(w, device=q.device)

    def attention(self, last: int | None = None, chunk: int | None = None):
        """Yield softmax attention probabilities (batch, q_heads, w, n), fp32, of this forward's queries (the last
        `last` of them) over the stored slots, causal and without padding, `chunk` queries at a time: never a full
        T x T matrix. Recomputed from queries and cached keys, so it works whatever kernel the model runs
        (`kvsqueeze.kernels.attention_probs.attention_chunks`)."""
        q, q_pos = self._window(last)
        for c in attention_chunks(q, self.keys, scaling=self.scaling, softcap=self.softcap, q_positions=q_pos,
                                  k_positions=self.row_positions, valid=self.valid,
                                  window=self.sliding_window, chunk=chunk):
            yield c.probs

    def attention_sum(self, last: int | None = None) -> torch.Tensor:
        """(batch, q_heads, n) fp32: attention summed over this forward's queries (or the last `last`), memoized
        per layer and window (`kernels.attention_probs.attention_sum`: the chunks' sums, or a Triton kernel that
        never holds the probabilities)."""
        key = ("attention_sum", self.layer_idx, last)
        if self.memo is not None and key in self.memo:
            return self.memo[key]
        q, q_pos = self._window(last)
        total = attention_sum(q, self.keys, scaling=self.scaling, softcap=self.softcap, q_positions=q_pos,
                              k_positions=self.row_positions, valid=self.valid, window=self.sliding_window)
        if self.memo is not None:
            self.memo[key] = total
        return total

    def recent(self, n: int | torch.Tensor) -> torch.Tensor:
        """(batch, kv_heads, n_slots) bool: the slots among the `n` (an int, or (batch,) per row) most recent
        real tokens each row has seen."""
        n = torch.as_tensor(n, dtype=torch.long, device=self.keys.device).reshape(-1, 1, 1)
        return self.row_positions >= self.row_seen[:, None, None] - n


class Delegating:
    """Mixin for a `Method` dataclass that scores with another method held in one of its fields (`delegate`
    names it: PyramidKV's and AdaKV's `scorer`, MiKV's `inner`): whether it observes every forward, its setup, its
    observations and its scores are that method's; the wrapper only changes the budgets or the storage."""

    delegate = "scorer"

    @property
    def stateful(self) -> bool:
        return getattr(self, self.delegate).stateful

    def setup(self, model) -> None:
        getattr(self, self.delegate).setup(model)

    def observe(self, x: ScoreInputs) -> None:
        getattr(self, self.delegate).observe(x)

    def score(self, x: ScoreInputs) -> torch.Tensor:
        return getattr(self, self.delegate).score(x)

    @property
    def merges(self) -> bool:
        return getattr(self, self.delegate).merges

    def merge_plan(self, x: ScoreInputs, idx: torch.Tensor, visible: torch.Tensor | None):
        return getattr(self, self.delegate).merge_plan(x, idx, visible)


def layer_indices(indices, what: str) -> tuple[int, ...]:
    """`indices` (an iterable of ints) as a tuple; `KVSqueezeError` for non-integers or negative indices (not
    supported: they would silently name other layers than meant). The upper bound is checked against the model
    when the cache is built (`CompressedCache`)."""
    try:
        out = tuple(indices)
        if not all(isinstance(i, int) or (isinstance(i, torch.Tensor) and i.numel() == 1) for i in out):
            raise TypeError
        out = tuple(int(i) for i in out)
    except TypeError:
        raise KVSqueezeError(f"{what} must be layer indices (integers), got {indices!r}") from None
    neg = [i for i in out if i < 0]
    if neg:
        raise KVSqueezeError(f"{what} {','.join(map(str, neg))}: layer indices must be >= 0 "
                             "(negative indices are not supported)")
    return out


@dataclass(kw_only=True)
class Method:
    """Base class. Subclasses set `name`, a one-line `summary`, and implement `score`.

    `compression_ratio` in [0, 1): the fraction of tokens removed (kvpress's `compression_ratio`; 0.75 keeps a
    quarter; ignored when `budget` is set). Raises `KVSqueezeError` for a value outside [0, 1), a budget < 1 or a
    negative `compression_interval`."""

    compression_ratio: float = 0.0
    budget: int | None = None
    exempt_layers: tuple[int, ...] = ()
    compression_interval: int = 0

    name = "base"
    summary = ""
    stateful = False  # observe() runs on every forward, not only when compressing
    merges = False  # merge_plan() gives a plan merging evicted entries into kept ones (KVMerger, D2O, EMS)
    defer_eviction = False  # evict every layer after the forward's last layer was observed (D2O's layer budgets)

    def __post_init__(self):
        if not (0.0 <= self.compression_ratio < 1.0):
            raise KVSqueezeError(f"compression_ratio must be in [0, 1), got {self.compression_ratio}")
        if self.budget is not None and self.budget < 1:
            raise KVSqueezeError(f"budget must be a positive number of tokens, got {self.budget}")
        if self.compression_interval < 0:
            raise KVSqueezeError(f"compression_interval must be >= 0, got {self.compression_interval}")
        self.exempt_layers = layer_indices(self.exempt_layers, "exempt_layers")

    def setup(self, model) -> None:
        """Prepare model-specific data (Q-Filters loads or calibrates its filters)."""

    def n_keep(self, n_seen: int, layer_idx: int, n_layers: int) -> int:
        """Slots a layer keeps after seeing `n_seen` tokens (kvpress's rounding:
        int(n * (1 - compression_ratio)))."""
        base = self.budget if self.budget is not None else int(n_seen * (1.0 - self.compression_ratio))
        return max(1, min(n_seen, self.layer_budget(base, layer_idx, n_layers)))

    def layer_budget(self, base: int, layer_idx: int, n_layers: int) -> int:
        return base

    def observe(self, x: ScoreInputs) -> None:
        """Update slot-aligned state from this forward (stateful methods)."""

    def score(self, x: ScoreInputs) -> torch.Tensor:
        raise NotImplementedError

    def merge_plan(self, x: ScoreInputs, idx: torch.Tensor, visible: torch.Tensor | None):
        """A merging method's `kvsqueeze.storage.merge.MergePlan` for the slots its scores chose: idx (batch,
        kv_heads, k) long, the kept slots; visible (batch, kv_heads, k) bool or None (kept slots a head-wise budget
        leaves empty). Called once per eviction, after `score(x)` with the same `x`, only when `merges` is set;
        None: plain eviction."""
        return None

    def describe(self) -> str:
        amount = (f"budget={self.budget}" if self.budget is not None
                  else f"compression_ratio={self.compression_ratio}")
        return f"{self.name}({amount})"

