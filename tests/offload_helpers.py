"""What the offloading tests share (tests/test_offload.py, tests/test_offload_quant.py): a random AttentionPredictor
CNN, the two selectors at a budget, a selector of fixed pages, and greedy decoding over a `CompressedCache`
returning every step's logits."""

import math

import torch

import kvsqueeze as kq
from kvsqueeze.selection import AttentionPredictor, PredictorNet, Quest
from kvsqueeze.selection.base import Selector, pages_to_slots

from conftest import kv


def predictor_net(seed=0, scale=0.3):
    """A PredictorNet with random N(0, scale) weights (no training: the equality tests do not depend on them)."""
    torch.manual_seed(seed)
    net = PredictorNet()
    for p in net.parameters():
        p.data.normal_(0, scale)
    return net.eval()


def selector(kind, budget=96):
    """'quest' -> Quest(budget); 'ap' -> AttentionPredictor(budget) over `predictor_net()`, sink 16, local 32."""
    if kind == "quest":
        return Quest(budget)
    return AttentionPredictor(budget, predictor=predictor_net(), sink=16, local=32)


class PinnedPages(Selector):
    """Attends to pages 0 .. lead - 1 and the last `tail` pages (the partial one included): the same pages every
    step until a new page opens (the offloading traffic tests)."""

    name = "pinned"

    def __init__(self, budget, lead, tail):
        super().__init__(budget)
        self.lead, self.tail = lead, tail

    def _select(self, layer_idx, layer, query):
        n = layer.n_stored
        last = math.ceil(n / 16) - 1
        b, h = layer.positions.shape[:2]
        pages = torch.cat([torch.arange(self.lead), torch.arange(last - self.tail + 1, last + 1)])
        return pages_to_slots(pages.expand(b, h, -1), n, 16)


@torch.no_grad()
def decode(model, selector, ids, steps=12, offload=None, method=None, chunk_size=None, latency=0.0,
           layer_factory=None, offload_dir=None, cache=None):
    """Greedy decoding of `steps` tokens after prefilling ids (batch, n): (logits (steps, batch, vocab), tokens
    (steps, batch), the cache). `cache`: a cache built by the caller (the other cache arguments are then unused)."""
    if cache is None:
        cache = kq.CompressedCache(model, method, selector=selector, offload=offload, offload_latency=latency,
                                   layer_factory=layer_factory, offload_dir=offload_dir)
    logits = kq.prefill(model, cache, ids, chunk_size=chunk_size)
    out, toks = [], []
    tok = logits.argmax(-1, keepdim=True)
    for _ in range(steps):
        lg = model(input_ids=tok, **kv(cache), use_cache=True).logits[:, -1]
        out.append(lg)
        tok = lg.argmax(-1, keepdim=True)
        toks.append(tok[:, 0])
    return torch.stack(out), torch.stack(toks), cache
