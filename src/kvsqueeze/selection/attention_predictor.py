"""AttentionPredictor (Yang, Wang et al., 2025, "AttentionPredictor: Temporal Pattern Matters for Efficient LLM
Inference"): a tiny learned model predicts the next decoding step's attention from the history of attention.

Pages. The paper's "blocks" of b = 16 consecutive key slots are our pages (the same unit as Quest's; see
`selection/base.py`).

History. Per layer and query head, the last H = 64 attention rows, each max-pooled over key pages of b = 16
slots: a (H, n_pages) image. It starts from the prompt's last H queries (`observe`) and gets one row per
decoding step: the sparse row actually computed (zero on pages not attended), and a full row (every key) every
M = 5 steps ("distribution error calibration").

Model. Conv2d(1, 16, 3x3, pad 1) + ReLU, Conv2d(16, 32, 3x3, pad 1) + ReLU, average over the time axis,
Conv1d(32, 1, 1): one score per page, 4,833 parameters, one model for every layer and head, fully convolutional
over the page axis. The sink pages and the local pages are cropped off the history before prediction (they
are always attended). Trained with MSE on the next step's pooled attention (`training.py`), the checkpoint
chosen by attention recovery rate, saved as safetensors under `$KVSQUEEZE_CACHE/predictor/<model key>.safetensors`.

Decoding. The prediction for step t uses the history up to step t - 1 (so a runtime can fetch the pages one
token ahead). Each step attends to the sink pages + the top predicted pages + the local pages within the
token budget (1024 = 64 + 56 x 16 + 64). Local = the last `local // 16` pages, the partial current page
counting as one, so the budget is never exceeded. GQA: one KV subset per kv head, from the maximum over the
group's query heads of their predicted page scores (a page matters when one head of the group needs it).
Pages that just left the local window have no prediction yet; they get their last history value. Layers 0-1
are dense.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..errors import KVSqueezeError
from .base import Selector, attention_probs, page_pool, pages_to_slots

HISTORY = 64
PAGE = 16  # slots per page (the paper's block size)
CALIBRATION_EVERY = 5


class PredictorNet(nn.Module):
    """The paper's CNN: (N, T, W) page-pooled attention history -> (N, W) next-step page scores."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((1, None))
        self.conv3 = nn.Conv1d(32, 1, kernel_size=1)

    @torch.no_grad()
    def init_history_mean(self, noise: float = 0.05, seed: int = 0) -> "PredictorNet":
        """Start from the history-mean predictor (see `init_blend`)."""
        return self.init_blend(0.0, noise=noise, seed=seed)

    @torch.no_grad()
    def init_blend(self, last: float = 0.75, history: int = 64, noise: float = 0.05, seed: int = 0) -> "PredictorNet":
        """Start from the heuristic (1 - last) * mean(history) + last * (last history row), which the model
        represents exactly (inputs are attention, >= 0): channel 0 carries x[t] through both ReLUs to the time
        average; channels 1 and 2 carry relu(x[t] - x[t-1]) and relu(x[t-1] - x[t]), whose difference summed over
        time telescopes to the last row (the zero padding above row 0 is x[-1] = 0), so conv3 weighs them by
        +-last * H. The other weights start small and random. Training improves on the heuristic, or the
        checkpoint selection keeps it."""
        g = torch.Generator().manual_seed(seed)
        for p in self.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * noise)
        for conv in (self.conv1, self.conv2):
            conv.weight[:3] = 0.0
            conv.bias[:3] = 0.0
        self.conv2.weight[:, :3] = 0.0
        w1 = self.conv1.weight  # (16, 1, 3, 3); kernel row 0 reads x[t-1], row 1 x[t], row 2 x[t+1]
        w1[0, 0, 1, 1] = 1.0
        w1[1, 0, 1, 1], w1[1, 0, 0, 1] = 1.0, -1.0
        w1[2, 0, 1, 1], w1[2, 0, 0, 1] = -1.0, 1.0
        for c in range(3):
            self.conv2.weight[c, c, 1, 1] = 1.0
        self.conv3.weight[0, :3, 0] = torch.tensor([1.0 - last, last * history, -last * history])
        self.conv3.bias.zero_()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1).contiguous(memory_format=torch.channels_last)  # channels-last: several times faster on CPU
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = self.pool(x).flatten(2)  # (N, 32, W)
        return self.conv3(x).squeeze(1)


class LastRow(nn.Module):
    """Heuristic predictor (ablation): the next row is the last history row."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1].float()


class HistoryMean(nn.Module):
    """Heuristic predictor (ablation): the next row is the mean of the history."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(1)


def n_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


class IncrementalCNN:
    """The CNN's prediction, recomputing only what a history update changed (same result as `net(x)`).

    score_j = b3 + (1/T) sum_t z[t, j],  z[t, j] = w3 . relu(conv2(relu(conv1(x))))[:, t, j]

    z[t] depends on the history rows t-2..t+2 and columns j-2..j+2 (zero padding outside). Rows 2..T-3 ("interior")
    have all their neighbours, so their z does not change when the window slides: it is kept per row and only the
    rows next to the window's ends are recomputed, from slabs of 5-7 rows. When the middle pages widen (a page
    leaves the local window), the last columns are recomputed from a narrow strip of every row. Anything else (a
    new crop, a short history) recomputes everything.
    """

    def __init__(self, net: PredictorNet):
        self.net = net
        self.w3 = net.conv3.weight.detach()[0, :, 0]  # (32,)
        self.b3 = net.conv3.bias.detach()[0]

    def z(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, W) -> (N, T, W): each row's contribution w3 . features (zero padding at x's own edges)."""
        with torch.no_grad():
            f = x.float().unsqueeze(1).contiguous(memory_format=torch.channels_last)
            f = torch.relu(self.net.conv2(torch.relu(self.net.conv1(f))))
            return torch.einsum("nctw,c->ntw", f, self.w3)

    def scores(self, st: dict, x: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
        N, T, W = x.shape
        z = st.get("z")
        dropped = st.get("z_dropped", 0)
        st["z_dropped"] = 0
        old_key = st.get("z_key")
        if z is not None:  # align the kept rows with the current window
            z, valid = z[:, dropped:], st["z_valid"][dropped:]
        ok = (z is not None and T >= 10 and old_key[0] == key[0] and key[1] >= old_key[1]
              and key[1] - old_key[1] <= 4 and z.shape[1] <= T)
        if not ok:
            z = self.z(x)
            # host-side control flags (which rows of z are up to date), deliberately on the CPU: they decide which
            # slabs to recompute, and on the GPU reading them would cost a device synchronisation every step
            valid = torch.zeros(T, dtype=torch.bool)
            valid[2 : T - 2] = True
            st.update(z=z, z_valid=valid, z_key=key)
            return self.b3 + z.mean(1)
        grow = key[1] - old_key[1]
        if z.shape[1] < T:  # new rows: not computed yet
            z = torch.cat([z, z.new_zeros(N, T - z.shape[1], z.shape[2])], 1)
            valid = torch.cat([valid, torch.zeros(T - valid.shape[0], dtype=torch.bool)])
        if grow:  # the last columns of the interior rows changed: a strip of columns, every row
            c0 = max(0, W - grow - 4)
            strip = self.z(x[:, :, c0:])
            z = torch.cat([z, z.new_zeros(N, T, grow)], 2)
            keep = 0 if c0 == 0 else 2
            z[:, :, c0 + keep :] = strip[:, :, keep:]
        # the interior rows not computed yet, and the last two (zero padding below): one slab at the end
        first = int(torch.nonzero(~valid[2 : T - 2]).min()) + 2 if bool((~valid[2 : T - 2]).any()) else T - 2
        s0 = max(0, first - 2)
        back = self.z(x[:, s0:])
        keep = 0 if s0 == 0 else 2
        z[:, s0 + keep :] = back[:, keep:]
        valid[2 : T - 2] = True
        valid[T - 2 :] = False
        # the first two rows (zero padding above): one slab at the start
        front = self.z(x[:, :5])[:, :2]
        total = z[:, 2 : T - 2].sum(1) + z[:, T - 2 :].sum(1) + front.sum(1)
        st.update(z=z, z_valid=valid, z_key=key)
        return self.b3 + total / T


# --- checkpoints ------------------------------------------------------------------------------------------
def predictor_path(model) -> Path:
    from ..models import cache_dir, model_file

    return model_file(cache_dir() / "predictor", model)


def save_predictor(net: PredictorNet, path: str | Path, meta: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(tensors, str(path), metadata={"kvsqueeze": json.dumps(meta or {})})
    return path


def load_predictor(path: str | Path) -> tuple[PredictorNet, dict]:
    """The CNN (eval mode, CPU, fp32) and the metadata dict `save_predictor` stored (the training run's report).

    Checkpoints written before the `block` -> `page` rename store the page size as config["block"]: it is read as
    config["page"]. Raises KVSqueezeError when `path` does not exist."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise KVSqueezeError(f"no attention predictor at {path}")
    net = PredictorNet()
    net.load_state_dict(load_file(str(path)))
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("kvsqueeze", "{}"))
    cfg = meta.get("config")
    if isinstance(cfg, dict) and "block" in cfg and "page" not in cfg:  # the old name of the page size
        cfg["page"] = cfg.pop("block")
    return net.eval(), meta


# --- the selector -----------------------------------------------------------------------------------------
class AttentionPredictor(Selector):
    """Decode-time selection of the pages a learned model predicts the current query will attend to.

    budget: attended slots per step and kv head (sink + top pages + local); page: slots per page (16, the paper's
    block size); sink / local: slots, multiples of `page` (default min(64, budget / 8) rounded down to pages).
    Raises KVSqueezeError when sink/local are not whole pages or the budget leaves no page to select."""

    name = "attention_predictor"
    summary = "a learned CNN predicts the next step's page attention from the history of attention rows"
    row_free_state = ("z_valid",)  # IncrementalCNN's per-time-step flags
    host_state = ("z_valid",)  # on the CPU whatever the layer's device: read on the host, no device sync

    def __init__(self, budget: int, *, predictor: PredictorNet | str | Path | None = None, sink: int | None = None,
                 local: int | None = None, history: int = HISTORY, page: int = PAGE,
                 calibration_every: int = CALIBRATION_EVERY, gqa: str = "max",
                 dense_layers: tuple[int, ...] = (0, 1), track_recovery: bool = False, incremental: bool = True):
        super().__init__(budget, page=page, dense_layers=dense_layers, track_recovery=track_recovery)
        self.incremental = incremental
        auto = max(page, min(64, (budget // 8) // page * page))  # 64 + 64 from 1024 tokens up, as the paper
        self.sink = auto if sink is None else sink
        self.local = auto if local is None else local
        if self.sink % page or self.local % page or self.local < page:
            raise KVSqueezeError(f"sink and local must be multiples of the page ({page}); local at least one page")
        self.k_pages = (budget - self.sink - self.local) // page
        if self.k_pages < 1:
            raise KVSqueezeError(f"budget {budget} leaves no page beyond sink {self.sink} + local {self.local}")
        if gqa not in ("max", "mean"):
            raise KVSqueezeError(f"gqa must be 'max' or 'mean', got {gqa!r}")
        self.gqa = gqa
        self.history = history
        self.calibration_every = calibration_every
        self.net = predictor if isinstance(predictor, nn.Module) else None
        self._predictor_path = None if isinstance(predictor, nn.Module) else predictor
        self.predictor_meta: dict = {}

    def setup(self, model) -> None:
        super().setup(model)
        if self.net is None:
            path = Path(self._predictor_path) if self._predictor_path is not None else predictor_path(model)
            if not path.exists():
                name = getattr(model.config, "_name_or_path", "") or "M"
                raise KVSqueezeError(
                    f"no attention predictor trained for this model ({path}); run "
                    f"`kvsqueeze train-predictor --model {name}`"
                )
            self.net, self.predictor_meta = load_predictor(path)
        self.net = self.net.eval()
        self._incremental = IncrementalCNN(self.net) if isinstance(self.net, PredictorNet) else None

    def _place(self, device: torch.device) -> None:
        """Put the predictor's weights on `device` in float32 (the history's device and dtype), at first use:
        `setup` may run before the model moves to the GPU, and checkpoints load on the CPU."""
        p = next(self.net.parameters(), None)
        if p is None or (p.device == device and p.dtype == torch.float32):
            return
        self.net = self.net.to(device=device, dtype=torch.float32)
        if getattr(self, "_incremental", None) is not None:
            self._incremental = IncrementalCNN(self.net)  # it holds the weights it reads

    def describe(self) -> str:
        return f"{self.name}(budget={self.budget}, sink={self.sink}, local={self.local}, top={self.k_pages} pages)"

    def _index_layer(self, st: dict, fn) -> None:
        """`z` (IncrementalCNN's rows) is (batch * q_heads, T, W): indexed per batch row, as the history."""
        z = st.pop("z", None)
        if z is not None:
            b = st["hist"].shape[0]
            z = fn(z.view(b, -1, *z.shape[1:]))
            z = z.reshape(-1, *z.shape[2:])
        super()._index_layer(st, fn)
        if z is not None:
            st["z"] = z

    # --- history ---------------------------------------------------------------------------------------
    def _push(self, st: dict, rows: torch.Tensor) -> None:
        """Append pooled rows (b, hq, r, W) to the layer's history (b, hq, T <= H, W'), widening as pages appear."""
        hist = st.get("hist")
        if hist is not None:
            w = rows.shape[-1]
            if hist.shape[-1] < w:
                hist = torch.nn.functional.pad(hist, (0, w - hist.shape[-1]))
            elif hist.shape[-1] > w:
                rows = torch.nn.functional.pad(rows, (0, hist.shape[-1] - w))
            rows = torch.cat([hist, rows], dim=2)
        st["z_dropped"] = st.get("z_dropped", 0) + max(0, rows.shape[2] - self.history)  # see IncrementalCNN
        st["hist"] = rows[:, :, -self.history :].contiguous()

    @torch.no_grad()
    def observe(self, layer_idx: int, layer, query: torch.Tensor) -> None:
        """The prompt's last H queries start the history (causal rows over the slots stored so far)."""
        st = self.layer_state(layer_idx, layer)
        if layer_idx in self.dense_layers:
            return
        w = min(query.shape[2], self.history)
        q = query[:, :, -w:]
        probs = attention_probs(q, layer.keys, self.scale(layer_idx, q), self.softcap, layer.valid)  # (b, hq, w, n)
        q_pos = layer.cumulative_length - w + torch.arange(w, device=q.device)
        hq, hk = query.shape[1], layer.keys.shape[1]
        future = layer.positions.repeat_interleave(hq // hk, dim=1)[:, :, None, :] > q_pos[None, None, :, None]
        if bool(future.any()):  # renormalise without the keys after each query (causal rows)
            probs = probs.masked_fill(future, 0.0)
            probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-30)
        self._push(st, page_pool(probs, self.page))

    def predict(self, hist: torch.Tensor, n_pages: int, st: dict | None = None) -> torch.Tensor:
        """Page scores (b, hq, n_pages - sink_pages - local_pages) for the middle pages of the current step, from
        the history `hist` (b, hq, T, W) (W pages as of the last row).

        With the layer's state `st`, the CNN runs incrementally (`IncrementalCNN`, exact): only the rows and
        columns of its feature maps that the last history update changed are recomputed."""
        sink_pages, local_pages = self.sink // self.page, self.local // self.page
        b, hq, T, W = hist.shape
        self._place(hist.device)
        lo, hi = sink_pages, max(sink_pages, W - local_pages)  # the middle pages as of the last history row
        out_w = n_pages - local_pages - sink_pages
        if hi - lo >= 3:  # the 3 x 3 kernels need a few columns
            x = hist[..., lo:hi].reshape(b * hq, T, hi - lo)
            if st is None or self._incremental is None:
                pred = self.net(x.float())
            else:
                pred = self._incremental.scores(st, x, (lo, hi))
            pred = pred.view(b, hq, hi - lo)
        else:
            pred = hist[:, :, -1, lo:hi].float()
        if pred.shape[-1] < out_w:  # pages that just left the local window: their last observed value
            last = hist[:, :, -1, hi : hi + out_w - pred.shape[-1]].float()
            last = torch.nn.functional.pad(last, (0, out_w - pred.shape[-1] - last.shape[-1]))
            pred = torch.cat([pred, last], -1)
        return pred[..., :out_w]

    def _select(self, layer_idx: int, layer, query: torch.Tensor) -> torch.Tensor | None:
        st = self.layer_state(layer_idx, layer)
        n = layer.n_stored
        ahead = st.pop("next", None)
        if ahead is not None and ahead[0] == (n, layer.version):  # predicted one step ahead (`predict_next`)
            return ahead[1]
        return self._pages(st, layer, n)

    @torch.no_grad()
    def predict_next(self, layer_idx: int, layer) -> torch.Tensor | None:
        """The slots (batch, kv_heads, k) the next decoding step of this layer will attend to, or None when it
        will attend densely: known one token ahead, since the prediction reads only the history (the paper's
        cross-token prefetch). Call it after this step's `select`; the next step's `select` returns the same
        indices without predicting again (so the predictor runs once per step either way, with or without
        offloading, and the selections are identical)."""
        if layer_idx in self.dense_layers:
            return None
        st = self.layer_state(layer_idx, layer)
        n = layer.n_stored + 1
        if n <= self.budget:
            return None
        idx = self._pages(st, layer, n)
        if idx is not None:
            st["next"] = ((n, layer.version), idx)
        return idx

    def _pages(self, st: dict, layer, n: int) -> torch.Tensor | None:
        """The selection for a step over `n` slots (the layer's slots as of now, the current token's included,
        or one more: `predict_next`), from the history in `st`."""
        n_pages = math.ceil(n / self.page)
        sink_pages, local_pages = self.sink // self.page, self.local // self.page
        if n_pages <= sink_pages + local_pages + self.k_pages or "hist" not in st:
            return None
        pred = self.predict(st["hist"], n_pages, st if self.incremental else None)  # (b, hq, middle pages)
        b, hq, wm = pred.shape
        hk = layer.positions.shape[1]
        pred = pred.view(b, hk, hq // hk, wm)
        agg = pred.amax(2) if self.gqa == "max" else pred.mean(2)
        if layer.valid is not None:  # (the slot of a step ahead is in the local pages, which this does not read)
            valid = layer.valid[..., :n]
            vp = torch.nn.functional.pad(valid, (0, n_pages * self.page - valid.shape[-1]))
            vp = vp.view(b, hk, n_pages, -1).any(-1)
            agg = agg.masked_fill(~vp[..., sink_pages : n_pages - local_pages], float("-inf"))
        top = agg.topk(self.k_pages, dim=-1).indices + sink_pages
        fixed = torch.cat([torch.arange(sink_pages), torch.arange(n_pages - local_pages, n_pages)]).to(top.device)
        pages = torch.cat([fixed.expand(b, hk, -1), top], dim=-1)
        return pages_to_slots(pages, n, self.page)

    def _after_select(self, layer_idx, layer, query, idx, probs) -> None:
        """Add this step's row to the history: the sparse row, or the full one every M steps (and when dense)."""
        if layer_idx in self.dense_layers:
            return
        st = self.layer_state(layer_idx, layer)
        st["step"] = st.get("step", 0) + 1
        if idx is None or st["step"] % self.calibration_every == 0:
            row = probs if probs is not None else self.full_probs(layer_idx, layer, query)
        else:
            row = self.sparse_probs(layer_idx, layer, query, idx)
        self._push(st, page_pool(row[:, :, None], self.page))
