"""What Quest and AttentionPredictor share: the decode-time selector protocol, pages, and the recovery rate.

A selector is handed to `CompressedCache(model, selector=...)`. Every stored KV entry stays; at every decoding
step (q_len == 1) of every full-attention layer, the attention wrapper calls

    idx = selector.select(layer_idx, layer, query)     # query (batch, q_heads, 1, head_dim), post-RoPE

and attends only to the slots `idx` (batch, kv_heads, k) (one subset per kv head, shared by its GQA group), or
densely when it returns None. Forwards of more than one token (the prefill, an appended question) go to
`selector.observe(layer_idx, layer, query)`, which AttentionPredictor uses to start its attention history from the
last queries of the prompt, as the paper's code does.

Pages (Quest's term; AttentionPredictor's paper calls them "blocks") are `page` = 16 consecutive slots: page j
holds slots [16 j, 16 j + 16); the last page is partial while the current token fills it, and is always attended
(it holds the current token). A selection is a set of whole pages per kv head, so every head attends to the same
number of slots and the result stays one rectangular gather. The token budget counts every attended slot, the
current token included. Pages are also the unit offloading moves (`storage/offload.py`; PagedAttention's /
FlashInfer's term).

Attention recovery rate (AttentionPredictor's metric): the share of the true (dense) attention of the current
query that falls on the attended slots, averaged over the query heads; `track_recovery=True` records it per layer
(it costs one dense q K^T row per step and layer, which the selection itself does not need).
"""

from __future__ import annotations

import math

import torch

from ..shapes import attention_shape
from ..errors import KVSqueezeError
from ..kernels.attention_probs import attention_probs as kernel_attention_probs
from ..methods.base import layer_indices


def attention_probs(query: torch.Tensor, keys: torch.Tensor, scaling: float, softcap: float | None = None,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention (batch, q_heads, q, n), fp32, of queries (b, hq, q, d) over keys (b, hk, n, d), grouped
    (the GQA group shares its kv head, never repeated in memory). No causal mask: every key is in the past. A query
    row with no `valid` key (batch, kv_heads, n) is all zeros, not NaN. The positional form of
    `kvsqueeze.kernels.attention_probs.attention_probs` (all queries in one chunk)."""
    return kernel_attention_probs(query, keys, scaling=scaling, softcap=softcap, valid=valid)


def page_pool(rows: torch.Tensor, page: int, reduce: str = "max") -> torch.Tensor:
    """(..., n) -> (..., ceil(n / page)): max (or sum) over pages of `page` slots, the last one zero-padded."""
    n = rows.shape[-1]
    pad = (-n) % page
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    rows = rows.view(*rows.shape[:-1], -1, page)
    return rows.amax(-1) if reduce == "max" else rows.sum(-1)


def pages_to_slots(pages: torch.Tensor, n: int, page: int) -> torch.Tensor:
    """Page indices (b, hk, K), which include the last (possibly partial) page in every row, -> sorted slot
    indices (b, hk, k) < n. Every row has the same count, since only the last page can be partial."""
    b, hk, K = pages.shape
    slots = (pages.sort(dim=-1).values[..., None] * page + torch.arange(page, device=pages.device)).view(b, hk, -1)
    missing = page * math.ceil(n / page) - n  # slots of the partial last page that do not exist yet
    return slots[..., : K * page - missing]


def check_static_pages(selector, step: str) -> None:
    """The page rules a static decode step's selector shares (`static_quest.py`, `static_attention_predictor.py`):
    a budget in whole pages (the step attends to budget // page pages, a static shape) and no recovery tracking.
    `step` names the step in the message. Raises KVSqueezeError."""
    if selector.budget % selector.page:
        raise KVSqueezeError(f"the static {step} step needs a budget that is a multiple of the page "
                             f"({selector.page}), got {selector.budget}")
    if selector.track_recovery:
        raise KVSqueezeError("attention recovery tracking (track_recovery=True) runs on the eager path only")


def recovery(probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Attention recovery rate per (batch, q head): the share of `probs` (b, hq, n) (rows summing to 1) on the
    slots `idx` (b, hk, k) of each head's kv head."""
    b, hq, n = probs.shape
    hk = idx.shape[1]
    sel = idx.repeat_interleave(hq // hk, dim=1)
    return probs.gather(-1, sel).sum(-1) / probs.sum(-1).clamp_min(1e-30)


class Selector:
    """Base class: per-layer state, the dense layers and short contexts, recovery tracking.

    Subclasses implement `_select(layer_idx, layer, query) -> idx (b, hk, k)` for sparse steps, and may use
    `observe` (multi-token forwards) and `_after_select` (every decoding step, dense ones too).
    """

    name = "selector"
    summary = ""  # one line for `kvsqueeze methods`
    # Per-layer state entries (tensors) with no batch axis; every other tensor in a layer's state is (batch, ...)
    # and follows the cache's batch operations (`index_batch`). Batch-flattened tensors: override `_index_layer`.
    row_free_state: tuple[str, ...] = ()
    host_state: tuple[str, ...] = ()  # state tensors kept on the CPU by design (host-side control flags)

    def __init__(self, budget: int, *, page: int = 16, dense_layers: tuple[int, ...] = (0, 1),
                 track_recovery: bool = False):
        if not isinstance(page, int) or isinstance(page, bool) or page < 1:
            raise KVSqueezeError(f"page must be a positive integer number of tokens, got {page!r}")
        if not isinstance(budget, int) or isinstance(budget, bool):
            raise KVSqueezeError(f"budget must be an integer number of tokens, got {budget!r}")
        if budget < 2 * page:
            raise KVSqueezeError(f"budget must be at least {2 * page} tokens (two pages of {page}), got {budget}")
        self.budget = int(budget)
        self.page = int(page)
        self.dense_layers = layer_indices(dense_layers, "dense_layers")
        self.track_recovery = track_recovery
        self.scaling: dict[int, float] = {}
        self.default_scaling: float | None = None
        self.softcap: float | None = None
        self.reset()

    # --- lifecycle -------------------------------------------------------------------------------------
    def setup(self, model) -> None:
        """Read each layer's attention scaling (and softcap) from the model."""
        cfg = model.config.get_text_config()
        head_dim = attention_shape(cfg)[2]
        self.default_scaling = head_dim**-0.5
        self.softcap = getattr(cfg, "attn_logit_softcapping", None)
        for m in model.modules():
            if getattr(m, "scaling", None) is not None and getattr(m, "layer_idx", None) is not None:
                self.scaling[int(m.layer_idx)] = float(m.scaling)

    def reset(self) -> None:
        """Forget every per-sequence state (call between sequences, or build a new selector)."""
        self.state: dict[int, dict] = {}
        self.recovery_sum: dict[int, float] = {}
        self.recovery_count: dict[int, int] = {}
        self.steps = 0  # decoding steps seen (counted at the lowest layer that calls select)
        self._first_layer: int | None = None

    def index_batch(self, fn) -> None:
        """Apply a batch operation to every per-row tensor held, as the cache does to its layers.

        fn maps a tensor (batch, ...) to (batch', ...): `CompressedCache.reorder_cache` (beam search),
        `batch_repeat_interleave` and `batch_select_indices` call it with the same indexing they apply to the
        stored slots, so every row's selection state (Quest's page bounds, AttentionPredictor's history) stays
        with its row."""
        for st in self.state.values():
            self._index_layer(st, fn)

    def _index_layer(self, st: dict, fn) -> None:
        """One layer's state: every tensor except `row_free_state` has the batch first."""
        for name, value in st.items():
            if isinstance(value, torch.Tensor) and name not in self.row_free_state:
                st[name] = fn(value)

    def layer_state(self, layer_idx: int, layer) -> dict:
        """This layer's state; cleared when the layer holds fewer slots than last time (a new sequence)."""
        st = self.state.get(layer_idx)
        n = layer.n_stored
        if st is None or n < st.get("n", 0):
            st = self.state[layer_idx] = {}
        st["n"] = n
        return st

    def scale(self, layer_idx: int, query: torch.Tensor) -> float:
        s = self.scaling.get(layer_idx, self.default_scaling)
        return s if s is not None else query.shape[-1] ** -0.5

    # --- the hook ----------------------------------------------------------------------------------------
    def observe(self, layer_idx: int, layer, query: torch.Tensor) -> None:
        """A forward of several tokens (prefill chunk, appended question) ran on this layer."""
        self.layer_state(layer_idx, layer)

    @torch.no_grad()
    def select(self, layer_idx: int, layer, query: torch.Tensor) -> torch.Tensor | None:
        if self._first_layer is None or layer_idx <= self._first_layer:
            self._first_layer = layer_idx
            self.steps += 1
        n = layer.n_stored
        dense = layer_idx in self.dense_layers or n <= self.budget
        idx = None if dense else self._select(layer_idx, layer, query)
        probs = None
        if idx is not None and self.track_recovery:
            probs = self.full_probs(layer_idx, layer, query)
            r = float(recovery(probs, idx).mean())
            self.recovery_sum[layer_idx] = self.recovery_sum.get(layer_idx, 0.0) + r
            self.recovery_count[layer_idx] = self.recovery_count.get(layer_idx, 0) + 1
        self._after_select(layer_idx, layer, query, idx, probs)
        return idx

    def _select(self, layer_idx: int, layer, query: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def _after_select(self, layer_idx, layer, query, idx, probs) -> None:
        pass

    # --- helpers ---------------------------------------------------------------------------------------
    def full_probs(self, layer_idx: int, layer, query: torch.Tensor) -> torch.Tensor:
        """(b, hq, n): dense attention of the current query over every stored slot, computed where the keys are
        (an offloaded layer's are in host memory) and returned on the query's device."""
        keys = layer.keys
        valid = None if layer.valid is None else layer.valid.to(keys.device)
        p = attention_probs(query.to(keys.device), keys, self.scale(layer_idx, query), self.softcap, valid)
        return p[:, :, 0].to(query.device)

    def sparse_probs(self, layer_idx: int, layer, query: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(b, hq, n): the attention actually computed over the slots `idx`, zero elsewhere (the sparse row)."""
        keys = layer.selected_keys(idx)  # an offloaded layer reads them from its device frames
        valid = None if layer.valid is None else layer.valid.gather(2, idx)
        p = attention_probs(query, keys, self.scale(layer_idx, query), self.softcap, valid)[:, :, 0]  # (b, hq, k)
        hq, hk = query.shape[1], idx.shape[1]
        out = p.new_zeros(p.shape[0], hq, layer.n_stored)
        return out.scatter(-1, idx.repeat_interleave(hq // hk, dim=1), p)

    def recovery_by_layer(self) -> dict[int, float]:
        """Mean attention recovery rate per layer over the sparse steps seen (track_recovery=True)."""
        return {i: self.recovery_sum[i] / self.recovery_count[i] for i in sorted(self.recovery_sum)}

    def describe(self) -> str:
        return f"{self.name}(budget={self.budget})"
