"""AttentionPredictor in the static decode step: the attention history in fixed buffers, prediction, selection
and the history update on the device, no host sync.

AttentionPredictor (Yang, Wang et al., 2025, "AttentionPredictor: Temporal Pattern Matters for Efficient LLM
Inference"; the rule: `selection/attention_predictor.py`) over the fixed-capacity slots of a
`StaticCompressedCache` (`storage/static.py`). A page is `page` consecutive slots of the static capacity (page j
of a (layer, row, kv head) holds slots [j * page, (j + 1) * page)), P = capacity // page pages per row and head.

Buffers (allocated once, float32 as the eager history, on the slots' device), per sparse layer:

    hist  (H, b, q_heads, P)      the last H = `history` page-pooled attention rows, a ring over the time axis
    z     (H, b * q_heads, P + 1) each interior history row's CNN contribution (`IncrementalCNN`'s z; column P is
                                  a scratch column that absorbs masked writes)
    rows  (layers,) long          rows pushed so far (the ring's write count); T = min(rows, H) rows are live
    wprev (layers, b, kv_heads)   the page count W of the last row (the eager history's width)
    qbuf  (b, q_heads, head_dim)  the step's query, post-RoPE, in the keys' dtype (read by `after_step`)
    chosen (layers, b, kv_heads, K) long  the pages attended at the last step (-1 before any step, dense layers;
                                  min(K, P) pages where the capacity holds fewer than K)

Memory: 2 * H * q_heads * P * 4 bytes per (sparse layer, row), i.e. 2 * 64 * q_heads * 4 / page = 32 * q_heads
bytes per slot of capacity (Llama-3.1-8B, 32 query heads, page 16: 1 KiB per slot and sparse layer, twice the
bf16 K+V of a slot (8 kv heads x 128 x 2 x 2 bytes = 4 KiB) / 4; at 128k tokens, 30 sparse layers: 4.0 GB). The
eager AttentionPredictor holds the same two tensors (`hist` and IncrementalCNN's `z`).

One step of a sparse layer (`select(layer_idx, query, scaling)` for steps 1-2, after the step's key is written;
`observe(...)` for step 3, once the selected pages are where the attention reads them), with
n = write + 1 slots, n_pages = ceil(n / page), W = the width of the last history row, lo = sink // page,
hi = max(lo, W - local // page), K = (sink + local) // page + k_pages = budget // page:

1. prediction from the history up to the previous step (the paper's one-token-ahead property: nothing of this
   step's query is read, so a runtime may run it a step early to prefetch, issue 13): the CNN over the middle pages
   [lo, hi) of the T live rows, zero padding outside them (the eager crop), computed incrementally as
   `IncrementalCNN`: the interior rows' z are kept (one new interior row per step, from a slab of 7 rows), the
   first two and last two rows recomputed (slabs of 6 and 7 rows), the last columns [hi - 3, hi) of every row
   recomputed (a strip of 7 columns: the middle widens by one page when a page leaves the local window);
   score = b3 + (sum of z over the T rows) / T. hi - lo < 3: the last history row instead. Middle pages in
   [hi, n_pages - local // page) (those that just left the local window) get their value in the last history row.
2. selection: GQA max (or mean) over the group's query heads; the k_pages middle pages of largest score (pages
   with no valid slot below every other middle page), plus the sink pages and the last local // page pages (the
   current, partial, page counting as one), in increasing order: (b, kv_heads, K) page ids. A (row, kv head) with
   n_pages <= K attends densely, i.e. to pages 0 .. K - 1 (the eager path is dense while n <= budget).
3. the history row of this step, from the attention actually computed: the probabilities (float32, as
   `Selector.sparse_probs`) of the query over the selected pages' keys (from the device page frames of an
   offloaded layer, not over the host link; a gather of K * page keys and one q.k
   product per page slot: the Triton page kernel returns only the output, so this is an extra pass reading half
   the bytes the sparse attention reads; the torch kernels gather the same keys a second time), max-pooled per
   page and scattered into a zero row of P pages; every `calibration_every`-th step of a layer instead the full
   row over every slot (the paper's distribution-error calibration). The compiled step always writes the
   selected row and keeps the step's query (`qbuf`); on a calibration step (the host's step counter,
   `host_step`) `after_step` then overwrites that history row with the full row, eagerly, after the compiled
   step. Nothing reads the row in between (the next step's prediction recomputes the last rows' CNN terms from
   `hist`), so the history equals the eager path's, and the step stays one graph (a second variant, chosen by a
   Python flag, doubled the compilation). A full row every step would read every key at every step, the cost
   the selection exists to avoid.
4. (`enable_ahead`, for an offloaded cache's prefetch) the scores of step 1 are computed right after step 3,
   for the next step (`pred`), and again by `after_step` when a calibration row replaces that step's row;
   `select` then reads them, and `select_next` gives the next step's pages during this one (its write slot one
   further). The same pages as computing the scores in `select`: nothing they read changes in between.

Per-step cost of a sparse layer (b * q_heads images, P pages): conv2 over 5 output rows x P pages (conv1 over the
9 rows they need: the two slabs compute only the rows they keep) and over 64 rows x 3 pages (the strip), a read of
the z ring (H x P) for the interior sum, the gather and q.k over K * page keys, and a write of one history row and
one z row. At 128k tokens and 32 query heads that is about 12 GFLOP per layer (conv2: 16 -> 32 channels, 3 x 3)
and 67 MB of z read per layer per step; the eager AttentionPredictor does the same work.

Equality with the eager AttentionPredictor (same pages, same logits) holds where the eager and static slot grids
line up (as `static_quest.py` states: a full cache or a method that keeps every head's entries in position order,
no left padding, no invalid slot): the eager history is copied in at `load`, and every rule above is the eager
one. The sums run in another order than the eager ones (the ring's), so the predicted scores may differ from the
eager ones by float rounding (a near-tie of two pages could then rank the other way).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import KVSqueezeError
from ..kernels.attention_probs import attention_probs
from ..kernels.page_decode import page_slots
from ..kernels.topk import topk_increasing
from ..storage.static import _static
from .attention_predictor import AttentionPredictor, PredictorNet
from .base import check_static_pages


# the static step's CNN kernels: "auto" (the default) takes "fused" (kernels/predictor_cnn.py, one Triton kernel) on
# CUDA with triton installed and "torch" (the convolutions) elsewhere. H200, 32k, Llama-3.1-8B shapes (fourteenth
# session): 9.84 ms per token fused against 12.07 with the convolutions.
CNN = "auto"


class StaticAttentionPredictor:
    """AttentionPredictor's history, prediction and page selection over a `StaticSlots` (module docstring).

    `selector`: the eager cache's `AttentionPredictor` (its budget, page, sink, local, history length, calibration
    period, gqa rule, dense layers and CNN weights are used; its state is read by `load`); `slots`: the static
    slots (capacity a multiple of `selector.page`); `q_heads`: the model's query heads. The selection protocol is
    `StaticQuest`'s: `select(layer_idx, query, scaling)` -> pages (b, kv_heads, K) or None for a dense layer,
    `observe(layer_idx, query, scaling, pages, keys, frames)` after it (the history row), `page`, `sparse(i)`,
    `chosen`, `refresh` (nothing to do), `nbytes`.
    Raises KVSqueezeError for another selector (see `check`) or a capacity that is not a multiple of the page."""

    def __init__(self, selector: AttentionPredictor, slots, q_heads: int, cnn: str | None = None):
        self.check(selector)
        # the CNN's kernels: "torch" (convolutions), "fused" (one Triton kernel) or "auto" (fused on CUDA with
        # triton); None: CNN (module default)
        cnn = CNN if cnn is None else cnn
        if cnn not in ("torch", "fused", "auto"):
            raise KVSqueezeError(f"cnn must be 'torch', 'fused' or 'auto', got {cnn!r}")
        if cnn == "auto":
            from ..kernels.split_kv import triton

            cnn = "fused" if triton is not None and slots.valid.device.type == "cuda" else "torch"
        self.cnn = cnn
        page = selector.page
        if slots.capacity % page:
            raise KVSqueezeError(f"static capacity {slots.capacity} is not a multiple of the page {page}")
        if q_heads % slots.kv_heads:
            raise KVSqueezeError(f"{q_heads} query heads are not a multiple of {slots.kv_heads} kv heads")
        self.slots = slots
        self.page = page
        self.n_pages = slots.capacity // page
        self.q_heads = q_heads
        self.sink_pages = selector.sink // page
        self.local_pages = selector.local // page
        self.top = selector.k_pages
        self.k_pages = self.sink_pages + self.local_pages + self.top  # == budget // page
        self.budget = selector.budget
        self.gqa = selector.gqa
        self.history = selector.history
        self.calibration_every = selector.calibration_every
        self.dense_layers = frozenset(selector.dense_layers)
        dev = slots.valid.device
        net = selector.net
        self.w1 = net.conv1.weight.detach().to(dev, torch.float32)
        self.b1 = net.conv1.bias.detach().to(dev, torch.float32)
        self.w2 = net.conv2.weight.detach().to(dev, torch.float32)
        self.b2 = net.conv2.bias.detach().to(dev, torch.float32)
        self.w3 = net.conv3.weight.detach()[0, :, 0].to(dev, torch.float32)
        self.w1t = self.w1.transpose(-1, -2).contiguous()  # the filters of the transposed image (fused CNN's strips)
        self.w2t = self.w2.transpose(-1, -2).contiguous()
        self.b3 = net.conv3.bias.detach()[0].to(dev, torch.float32)
        b, hk, P, H = slots.batch, slots.kv_heads, self.n_pages, self.history
        self.hist: list[torch.Tensor | None] = []
        self.z: list[torch.Tensor | None] = []
        self.qbuf: list[torch.Tensor | None] = []
        for i in range(slots.n_layers):
            sparse = i not in self.dense_layers
            self.hist.append(_static(torch.zeros(H, b, q_heads, P, device=dev)) if sparse else None)
            self.z.append(_static(torch.zeros(H, b * q_heads, P + 1, device=dev)) if sparse else None)
            self.qbuf.append(_static(torch.zeros(b, q_heads, slots.head_dim, dtype=slots.keys[i].dtype, device=dev))
                             if sparse else None)
        self.rows = _static(torch.zeros(slots.n_layers, dtype=torch.long, device=dev))
        self.wprev = _static(torch.zeros(slots.n_layers, b, hk, dtype=torch.long, device=dev))
        # (a capacity of fewer pages than K: every step dense over its min(K, P) pages)
        self.chosen = _static(torch.full((slots.n_layers, b, hk, min(self.k_pages, P)), -1, dtype=torch.long,
                                         device=dev))
        self._page_ids = torch.arange(P, device=dev)
        self._steps = [0] * slots.n_layers  # host: decoding steps of each layer's history (the eager st["step"])
        self._calib: tuple[bool, ...] = (False,) * slots.n_layers  # host: this step's calibration flags
        self._scale: list[float | None] = [None] * slots.n_layers  # each layer's attention scale (from observe)
        self.pred: list[torch.Tensor | None] | None = None  # next scores per sparse layer (`enable_ahead`)

    @staticmethod
    def check(selector) -> None:
        """Raise KVSqueezeError unless `selector` is an AttentionPredictor the static step runs: its CNN a
        `PredictorNet` (not a heuristic module), a budget in whole pages, no recovery tracking. What
        `StaticCompressedCache.from_cache` checks before it allocates anything."""
        if not isinstance(selector, AttentionPredictor):
            raise KVSqueezeError(f"StaticAttentionPredictor runs AttentionPredictor only, not "
                                 f"{type(selector).__name__}")
        if not isinstance(selector.net, PredictorNet):
            raise KVSqueezeError(f"the static AttentionPredictor step runs the paper's CNN (PredictorNet), not "
                                 f"{type(selector.net).__name__}; decode on the eager path")
        check_static_pages(selector, "AttentionPredictor")

    def sparse(self, layer_idx: int) -> bool:
        """Whether `layer_idx` selects pages (False for `dense_layers`)."""
        return self.hist[layer_idx] is not None

    def refresh(self, layer_idx: int) -> None:
        """Nothing: the history is updated by `observe` (the protocol `StaticCompressedCache.update` calls)."""

    def nbytes(self) -> int:
        """Bytes of the history and z buffers (every sparse layer), and of the next scores (`enable_ahead`)."""
        return sum(t.numel() * t.element_size() for t in (*self.hist, *self.z, *(self.pred or ())) if t is not None)

    # --- host side ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def load(self, selector: AttentionPredictor, stored: list[int]) -> None:
        """Copy the eager selector's history into the buffers and build the interior rows' z. `stored`: each eager
        layer's `n_stored`. A layer whose eager history the next step would discard (the layer holds fewer slots
        than when the history was taken: a prefill compression) starts with none, as the eager one does; its first
        step is then dense. Raises KVSqueezeError when such a step would attend to more than `budget` slots (the
        static step attends to at most budget // page pages)."""
        for i in range(self.slots.n_layers):
            if not self.sparse(i):
                continue
            st = selector.state.get(i, {})
            hist = st.get("hist")
            if hist is None or stored[i] + 1 < st.get("n", 0):  # Selector.layer_state clears it at the next step
                if stored[i] + 1 > self.budget:
                    raise KVSqueezeError(f"layer {i} has no attention history (the prefill's compression reset it) "
                                         f"and holds more than the budget ({self.budget} slots): its next step "
                                         "is dense over every slot, which the static step does not run; decode on "
                                         "the eager path")
                self.rows[i] = 0
                self.wprev[i] = 0
                self._steps[i] = 0
                continue
            b, hq, T, W = hist.shape
            if (b, hq) != (self.slots.batch, self.q_heads) or T > self.history or W > self.n_pages:
                raise KVSqueezeError(f"layer {i}'s attention history {tuple(hist.shape)} does not fit the static "
                                     f"buffers (batch {self.slots.batch}, {self.q_heads} heads, {self.n_pages} pages)")
            self.hist[i].zero_()
            self.hist[i][:T, :, :, :W] = hist.permute(2, 0, 1, 3).to(self.hist[i])
            self.rows[i] = T
            self.wprev[i] = W
            self._steps[i] = int(st.get("step", 0))
            # every row's z with the current middle pages (the interior ones are kept; ring slot = time index)
            hi = max(self.sink_pages, W - self.local_pages)
            x = self.hist[i].permute(1, 2, 0, 3).reshape(b * hq, self.history, self.n_pages)
            rows_ok = torch.arange(self.history, device=x.device) < T
            cols_ok = (self._page_ids >= self.sink_pages) & (self._page_ids < hi)
            ok = rows_ok[None, :, None] & cols_ok[None, None, :]
            self.z[i].zero_()
            self.z[i][:, :, : self.n_pages] = self._z(x * ok, ok).transpose(0, 1)

    def host_step(self) -> None:
        """Before each decoding step (the cache's step counter): count the step per sparse layer and set this
        step's calibration flags (the eager `_after_select`: a full row when the layer's step count is a multiple
        of `calibration_every`)."""
        flags = []
        for i in range(self.slots.n_layers):
            if self.sparse(i):
                self._steps[i] += 1
                flags.append(self._steps[i] % self.calibration_every == 0)
            else:
                flags.append(False)
        self._calib = tuple(flags)

    @torch.no_grad()
    def after_step(self) -> None:
        """After each decoding step, eagerly, outside the compiled step: for each sparse layer whose step this was a
        calibration step (`host_step`'s flags), replace the history row the step wrote (the selected pages' row)
        by the full row: the probabilities of the step's query (`qbuf`) over every valid slot, max-pooled per page
        (the paper's distribution-error calibration; module docstring, step 3). Reads every key of those layers
        (over the host link for an offloaded layer); no host synchronisation. The layer's scale is the Python float
        `observe` recorded (`_scale`; in a compiled step torch.compile replays that attribute write after the
        graph): a layer not yet observed is skipped."""
        s = self.slots
        for i, due in enumerate(self._calib):
            if not due or self._scale[i] is None:
                continue
            b, hq = self.qbuf[i].shape[:2]
            p = attention_probs(self.qbuf[i][:, :, None], s.keys[i], scaling=self._scale[i], valid=s.valid[i])[:, :, 0]
            row = p.view(b, hq, self.n_pages, self.page).amax(-1)
            at = torch.remainder(self.rows[i] - 1, self.history).view(1)
            self.hist[i].index_put_((at,), row[None].to(self.hist[i].dtype))
            if self.pred is not None and self.pred[i] is not None:  # the next scores from the calibrated row
                self.pred[i].copy_(self._predict(i, self.q_heads // s.kv_heads))

    # --- device side (the compiled step) -------------------------------------------------------------------
    def _z(self, x: torch.Tensor, ok: torch.Tensor, rows: bool = True, cols: bool = True) -> torch.Tensor:
        """(N, S, W) history rows (zero where not `ok` (N, S, W)) -> each row's contribution w3 . relu(conv2(
        relu(conv1(x)) masked)) (N, S, W): the conv layers' zero padding is the mask (the eager crop of the middle
        pages and of the T live rows). `rows` / `cols` False: no padding along that axis, so the output loses two
        rows / columns at each end (only the inner ones are computed: a slab's or strip's kept part). With `cnn`
        "fused", one Triton kernel (`kernels/predictor_cnn.py`) computes the same value."""
        if self.cnn == "fused":
            from ..kernels.predictor_cnn import predictor_cnn

            # TF32 products where torch's float32 convolutions would take them (cuDNN's switch, on by default)
            prec = "tf32" if x.is_cuda and torch.backends.cudnn.allow_tf32 else "ieee"
            if rows and not cols:
                # a strip (the last columns of every history row: W = 7, S = the history): the kernel's programs
                # span output columns, so it runs on the transposed strip with the transposed filters (the
                # convolution of a transpose is the transpose of the convolution) and gives its transpose back
                z = predictor_cnn(x.transpose(1, 2), ok.transpose(1, 2), self.w1t, self.b1, self.w2t, self.b2,
                                  self.w3, rows=False, cols=True, precision=prec)
                return z.transpose(1, 2)
            return predictor_cnn(x, ok, self.w1, self.b1, self.w2, self.b2, self.w3, rows=rows, cols=cols,
                                 precision=prec)
        pad = (int(rows), int(cols))
        f = torch.relu(F.conv2d(x[:, None], self.w1, self.b1, padding=pad))
        f = f * ok[:, None, 1 - pad[0] : ok.shape[1] - 1 + pad[0], 1 - pad[1] : ok.shape[2] - 1 + pad[1]]
        f = torch.relu(F.conv2d(f, self.w2, self.b2, padding=pad))
        return (f * self.w3.view(1, -1, 1, 1)).sum(1)  # w3 . f over the channels

    def _slab(self, layer_idx: int, t: torch.Tensor, c: torch.Tensor, T: torch.Tensor):
        """History rows at time indices `t` (S,) (0 = the oldest live row; outside [0, T) zero): (N, S, P) and
        their validity (S,)."""
        H = self.history
        ring = torch.remainder(c - T + t, H)
        ok = (t >= 0) & (t < T)
        x = self.hist[layer_idx].index_select(0, ring).flatten(1, 2)  # (S, N, P)
        return x.transpose(0, 1) * ok[None, :, None], ok

    def _predict(self, layer_idx: int, g: int) -> torch.Tensor:
        """Middle-page scores (N = b * q_heads, P) from the history up to the previous step (module docstring,
        step 1); the interior z rows and the last columns of z are brought up to date in place."""
        H, P, lo = self.history, self.n_pages, self.sink_pages
        dev = self._page_ids.device
        z = self.z[layer_idx]
        c = self.rows[layer_idx]
        T = c.clamp(max=H)
        hi = (self.wprev[layer_idx] - self.local_pages).clamp(min=lo)  # (b, hk)
        hi_q = hi.repeat_interleave(g, dim=1).reshape(-1)  # (N,)
        N = hi_q.shape[0]
        cols_ok = (self._page_ids >= lo) & (self._page_ids < hi_q[:, None])  # (N, P)
        # the last three rows (T-3: the newest interior row, kept; T-2, T-1: zero padding below)
        tb = T - 5 + torch.arange(7, device=dev)
        xb, okb = self._slab(layer_idx, tb, c, T)
        okb = okb[None, :, None] & cols_ok[:, None, :]
        zb = self._z(xb * okb, okb, rows=False)  # rows T-3, T-2, T-1
        r_new = torch.remainder(c - 3, H).view(1)
        old = z.index_select(0, r_new)[:, :, :P]
        z.index_put_((r_new,), F.pad(torch.where(T >= 5, zb[:, 0], old[0]), (0, 1))[None])
        # the last columns of every row: [hi - 3, hi) from the x columns [hi - 5, hi + 2)
        craw = hi_q[:, None] - 5 + torch.arange(7, device=dev)  # (N, 7)
        cok = (craw >= lo) & (craw < hi_q[:, None]) & (craw < P)
        cidx = craw.clamp(0, P - 1)
        t_all = torch.arange(H, device=dev)
        ring_t = torch.remainder(c - T + t_all, H)  # time order -> ring slot
        xs = self.hist[layer_idx].flatten(1, 2).gather(2, cidx[None].expand(H, N, 7)).index_select(0, ring_t)
        oks = (t_all < T)[:, None, None] & cok[None]  # (H, N, 7)
        zs = self._z((xs * oks).transpose(0, 1), oks.transpose(0, 1), cols=False)  # (N, H, 3) time order
        t_of_r = torch.remainder(t_all - (c - T), H)  # ring slot -> time index
        dest = torch.where(cok[:, 2:5], craw[:, 2:5], P)  # (N, 3); masked columns go to the scratch column P
        z.index_put_((t_all.view(1, H, 1), torch.arange(N, device=dev).view(N, 1, 1), dest[:, None, :]),
                     zs.index_select(1, t_of_r))
        # the first two rows (zero padding above)
        tf = torch.arange(-2, 4, device=dev)
        xf, okf = self._slab(layer_idx, tf, c, T)
        okf = okf[None, :, None] & cols_ok[:, None, :]
        zf = self._z(xf * okf, okf, rows=False)  # rows 0, 1
        front = zf * (tf[2:4] < T)[None, :, None]
        back = zb[:, 1:] * (tb[3:5] >= 2)[None, :, None]  # rows T-2, T-1 unless they are rows 0, 1
        interior = (t_of_r >= 2) & (t_of_r <= T - 3)  # (H,) ring slots holding an interior row
        inner = torch.where(interior[:, None, None], z[:, :, :P], 0.0).sum(0)
        total = inner + back.sum(1) + front.sum(1)
        cnn = self.b3 + total / T.clamp(min=1)
        last = self.hist[layer_idx].index_select(0, torch.remainder(c - 1, H).view(1))[0].reshape(N, P)
        use_cnn = ((hi_q - lo) >= 3)[:, None] & (self._page_ids < hi_q[:, None])
        return torch.where(use_cnn, cnn, last)

    def select(self, layer_idx: int, query: torch.Tensor, scaling: float | None) -> torch.Tensor | None:
        """The pages (b, kv_heads, K) long, increasing, each (row, kv head) of layer `layer_idx` attends to for
        `query` (b, q_heads, 1, head_dim) post-RoPE (None for a dense layer), the layer's history then advanced by
        this step's row; `scaling`: the attention scale (default head_dim ** -0.5). The rule: the module
        docstring."""
        if not self.sparse(layer_idx):
            return None
        pages = self._choose(layer_idx, query.shape[1] // self.slots.kv_heads, ahead=False)
        self.chosen[layer_idx].copy_(pages)
        return pages

    def select_next(self, layer_idx: int) -> torch.Tensor:
        """The pages (b, kv_heads, K) the next step's `select` of layer `layer_idx` will return, known once this
        step's row is pushed (`observe`): the history then holds everything the prediction reads, and the next
        step writes one slot further. Exact but on a calibration step, whose full row `after_step` writes after
        the step (a prefetch made from it misses a few pages, which the next fetch copies). Needs
        `enable_ahead()`."""
        if self.pred is None:
            raise KVSqueezeError("select_next needs enable_ahead() (the next scores kept after each observe)")
        return self._choose(layer_idx, self.q_heads // self.slots.kv_heads, ahead=True)

    def enable_ahead(self) -> None:
        """Keep each sparse layer's next scores (`pred`, (b * q_heads, P) float32): computed when `observe` pushes
        the layer's row and when `after_step` replaces it by a calibration row, instead of in `select`, which
        reads them (the same values: nothing the prediction reads changes in between). So `select_next` can name
        the next step's pages during this one (AttentionPredictor's cross-token prefetch, `storage/frames.py`).
        The CNN's cost moves from `select` to `observe`; calibration steps add one eager prediction per sparse
        layer."""
        if self.pred is not None:
            return
        g = self.q_heads // self.slots.kv_heads
        self.pred = [_static(self._predict(i, g).clone()) if self.sparse(i) and self.k_pages < self.n_pages
                     else None for i in range(self.slots.n_layers)]

    def _choose(self, layer_idx: int, g: int, ahead: bool) -> torch.Tensor:
        """`select`'s pages for this step, or (`ahead`) for the next one: its write slot one further."""
        s = self.slots
        b, hk = s.batch, s.kv_heads
        P, K = self.n_pages, self.k_pages
        ids = self._page_ids
        write = (s.write[layer_idx] + 1).clamp(max=s.capacity - 1) if ahead else s.write[layer_idx]
        npc = write // self.page + 1  # (b, hk): pages holding slots, the current one included
        dense = torch.arange(min(K, P), device=ids.device).expand(b, hk, -1)
        if K >= P:  # the capacity holds no more than the budget: always dense
            return dense
        pred = self.pred[layer_idx] if self.pred is not None else self._predict(layer_idx, g)
        pred = pred.view(b, hk, g, P)
        agg = pred.amax(2) if self.gqa == "max" else pred.mean(2)
        held = s.valid[layer_idx].view(b, hk, P, self.page).any(-1)
        middle = (ids >= self.sink_pages) & (ids < (npc - self.local_pages)[..., None])
        # middle pages with no valid slot below every other middle page, the rest never chosen
        agg = agg.masked_fill(~held, torch.finfo(agg.dtype).min).masked_fill(~middle, float("-inf"))
        # increasing, and (npc > K: more middle pages than `top`) all middle pages, so sink < top < local
        top = topk_increasing(agg, self.top)
        sink = torch.arange(self.sink_pages, device=ids.device).expand(b, hk, -1)
        local = (npc - self.local_pages)[..., None] + torch.arange(self.local_pages, device=ids.device)
        pages = torch.cat([sink, top, local], dim=-1)
        return torch.where((npc <= K)[..., None], dense, pages)

    def observe(self, layer_idx: int, query: torch.Tensor, scaling: float | None, pages: torch.Tensor,
                keys: torch.Tensor | None = None, frames: torch.Tensor | None = None) -> None:
        """After `select` and before the next step: append this step's page-pooled attention row (module docstring,
        step 3) to layer `layer_idx`'s history (a dense layer: nothing). `pages` (b, kv_heads, K): what `select`
        returned; `keys`: where the attention reads the selected pages' keys, (b, kv_heads, C, d) the slots'
        buffers (default) or, for an offloaded layer with device page frames (`storage/frames.py`),
        (b, kv_heads, F * page, d) the frames, `frames` (b, kv_heads, K) the frame of each selected page (so the
        row is computed from device memory, not over the host link). On a calibration step `after_step` then
        replaces the row by the full one."""
        if not self.sparse(layer_idx):
            return
        npc = self.slots.write[layer_idx] // self.page + 1
        self._push(layer_idx, query, scaling, pages, npc, keys, frames)
        if self.pred is not None and self.pred[layer_idx] is not None:  # the next step's scores (`enable_ahead`)
            self.pred[layer_idx].copy_(self._predict(layer_idx, query.shape[1] // self.slots.kv_heads))

    def _push(self, layer_idx: int, query: torch.Tensor, scaling: float | None, pages: torch.Tensor,
              npc: torch.Tensor, read: torch.Tensor | None = None, frames: torch.Tensor | None = None) -> None:
        """Append this step's page-pooled row (module docstring, step 3) to the layer's history (`observe`)."""
        s = self.slots
        keys, valid = s.keys[layer_idx], s.valid[layer_idx]
        b, hk = valid.shape[:2]
        hq = query.shape[1]
        P, page = self.n_pages, self.page
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        # the selected pages' row; on a calibration step `after_step` replaces it by the full row from qbuf
        idx = page_slots(pages, page)  # (b, hk, K * page)
        src, at = (keys, idx) if read is None else (read, idx if frames is None else page_slots(frames, page))
        kk = src.gather(2, at[..., None].expand(*at.shape, src.shape[-1]))
        p = attention_probs(query, kk, scaling=scale, valid=valid.gather(2, idx))[:, :, 0]
        pooled = p.view(b, hq, -1, page).amax(-1)  # (b, hq, K)
        row = torch.zeros(b, hq, P, dtype=pooled.dtype, device=pooled.device)
        row = row.scatter(-1, pages.repeat_interleave(hq // hk, dim=1), pooled)
        self.qbuf[layer_idx].copy_(query[:, :, 0])
        self._scale[layer_idx] = scale
        c = self.rows[layer_idx]
        self.hist[layer_idx].index_put_((torch.remainder(c, self.history).view(1),), row[None])
        self.rows[layer_idx].add_(1)
        self.wprev[layer_idx].copy_(npc)


def static_history_bytes(n_layers_sparse: int, batch: int, q_heads: int, capacity: int, page: int = 16,
                         history: int = 64) -> int:
    """Bytes of a `StaticAttentionPredictor`'s buffers (hist + z, float32) for the given shapes."""
    P = math.ceil(capacity / page)
    return n_layers_sparse * batch * 4 * (history * q_heads * P + history * q_heads * (P + 1))
