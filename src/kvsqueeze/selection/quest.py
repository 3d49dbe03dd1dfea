"""Quest (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference").

Keys are grouped into pages of 16 consecutive tokens. Each page keeps, per channel i, the minimum m_i and the
maximum M_i of its keys. For the current query q, the page's score

    U(q, page) = sum_i max(q_i M_i, q_i m_i)

is an upper bound of q . k for every key k of the page (each term bounds q_i k_i). Each decoding step attends to
the pages with the highest scores, `budget // 16` pages in all, the page holding the current token always among
them; layers 0-1 stay dense (as in the paper).

GQA (one KV subset per kv head): the paper selects per query head. Here each query head's page scores are turned
into an estimated attention distribution, softmax(scaling * U) over the pages, and the group's pages are ranked by
the maximum of its heads' estimates (`gqa="max"`; `gqa="raw"` takes the maximum of the raw bounds instead). The
normalisation makes heads with large query norms not decide for the whole group.

Page metadata is kept incrementally: full pages are summarised once; only the current, partial page is
recomputed each step (metadata for a layer is rebuilt when its slots changed in another way, e.g. eviction).
"""

from __future__ import annotations

import math

import torch

from ..errors import KVSqueezeError
from .base import Selector, pages_to_slots


def page_minmax(keys: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, hk, n, d), n a multiple of `page` -> per-page channel min and max (b, hk, n // page, d), fp32."""
    b, hk, n, d = keys.shape
    k = keys.float().view(b, hk, n // page, page, d)
    return k.amin(3), k.amax(3)


def page_scores(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound: query (b, hq, d), page min/max (b, hk, P, d) -> (b, hq, P).

    max(q_i M_i, q_i m_i) = q_i M_i where q_i >= 0, q_i m_i where q_i < 0 (m_i <= M_i)."""
    b, hq, d = query.shape
    hk = kmin.shape[1]
    q = query.float().view(b, hk, hq // hk, d)
    up = torch.matmul(q.clamp(min=0), kmax.transpose(-1, -2)) + torch.matmul(q.clamp(max=0), kmin.transpose(-1, -2))
    return up.view(b, hq, -1)


class Quest(Selector):
    name = "quest"
    summary = "query-aware page selection: pages ranked by an upper bound of q.k from per-page key min/max"

    def __init__(self, budget: int, *, page: int = 16, gqa: str = "max", dense_layers: tuple[int, ...] = (0, 1),
                 track_recovery: bool = False):
        if gqa not in ("max", "raw", "mean"):
            raise KVSqueezeError(f"gqa must be 'max', 'raw' or 'mean', got {gqa!r}")
        super().__init__(budget, page=page, dense_layers=dense_layers, track_recovery=track_recovery)
        self.gqa = gqa

    def _metadata(self, layer_idx: int, layer, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Min/max of every page, the current partial page included: (b, hk, P, d) each, on `device` (default: the
        keys'; an offloaded layer's keys are in host memory, the summaries are computed there and moved)."""
        st = self.layer_state(layer_idx, layer)
        p = self.page
        n = layer.n_stored
        full = n // p
        version = layer.version  # moves whenever the layer's slots change other than by appending
        if "kmin" not in st or st.get("version") != version or st["full"] > full:
            keys = layer.keys
            device = keys.device if device is None else device
            st["kmin"], st["kmax"] = (t.to(device) for t in page_minmax(keys[:, :, : full * p], p))
        elif st["full"] < full:  # pages completed since the last step
            lo = st["full"] * p
            mn, mx = page_minmax(layer.key_slots(lo, full * p), p)
            st["kmin"] = torch.cat([st["kmin"], mn.to(st["kmin"].device)], 2)
            st["kmax"] = torch.cat([st["kmax"], mx.to(st["kmax"].device)], 2)
        st["full"], st["version"] = full, version
        kmin, kmax = st["kmin"], st["kmax"]
        if n > full * p:  # the partial page holding the current token
            tail = layer.key_slots(full * p, n).float().to(kmin.device)
            kmin = torch.cat([kmin, tail.amin(2, keepdim=True)], 2)
            kmax = torch.cat([kmax, tail.amax(2, keepdim=True)], 2)
        return kmin, kmax

    def _select(self, layer_idx: int, layer, query: torch.Tensor) -> torch.Tensor | None:
        n = layer.n_stored
        n_pages = math.ceil(n / self.page)
        k_pages = self.budget // self.page
        if k_pages >= n_pages:
            return None
        kmin, kmax = self._metadata(layer_idx, layer, query.device)
        scores = page_scores(query[:, :, 0], kmin, kmax)  # (b, hq, P)
        b, hq, P = scores.shape
        hk = kmin.shape[1]
        if self.gqa == "raw":
            agg = scores.view(b, hk, hq // hk, P).amax(2)
        else:
            est = torch.softmax(scores * self.scale(layer_idx, query), dim=-1).view(b, hk, hq // hk, P)
            agg = est.amax(2) if self.gqa == "max" else est.mean(2)
        agg[..., -1] = float("inf")  # the current page
        if layer.valid is not None:  # pages with no valid slot are never worth a slot of the budget
            vp = torch.nn.functional.pad(layer.valid, (0, n_pages * self.page - n)).view(b, hk, P, -1).any(-1)
            agg = agg.masked_fill(~vp, float("-inf"))
        pages = agg.topk(k_pages, dim=-1).indices
        return pages_to_slots(pages, n, self.page)
