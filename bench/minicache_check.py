"""Is MiniCache's failure on a small model the rule or a bug? Two checks on one real prompt.

    python bench/minicache_check.py --model smollm2-135m --seed 1

1. The premise (MiniCache, Liu et al., 2024, arXiv:2405.14366, Sec. 3 and Fig. 1-2: KV states of adjacent layers
   are highly similar from the middle depth on, which is what makes merging them nearly lossless): per adjacent
   layer pair (l, l+1) of the full cache after the context's prefill, the mean cosine similarity of the two layers'
   states of the same token and kv head (keys post-RoPE, as cached, and values), and the relative error
   ||x^ - x|| / ||x|| of MiniCache's restoration x^ = |x| * SLERP(direction_l, direction_l+1; t) without
   retention (the error every merged token carries).
2. The implementation: the cache compressed by `minicache` (compression_ratio 0) restores each merged token of its
   first pair as |x| * SLERP(...) of the full cache's states computed here independently (max absolute
   difference), and keeps the retained ones exact.

Prints one line per pair; no results store.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import kvsqueeze as kq  # noqa: E402
from kvsqueeze.runtime.generate import prefill, split_prompt  # noqa: E402
from kvsqueeze.tasks import TaskConfig, build_samples  # noqa: E402


def restore(xa: torch.Tensor, xb: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniCache's restoration of both layers' states from their SLERP-merged direction (Eq. 2-3), written out
    here independently of `kvsqueeze.storage.crosslayer`: xa, xb (..., d) float -> (x^a, x^b) (..., d)."""
    na, nb = xa.norm(dim=-1, keepdim=True), xb.norm(dim=-1, keepdim=True)
    ua, ub = xa / na, xb / nb
    w = torch.arccos((ua * ub).sum(-1, keepdim=True).clamp(-1, 1))
    e = (torch.sin((1 - t) * w) * ua + torch.sin(t * w) * ub) / torch.sin(w).clamp_min(1e-12)
    return na * e, nb * e


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="passkey")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--t", type=float, default=0.6)
    a = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    model, tok = kq.load_model(a.model)
    s = build_samples(tok, a.task, TaskConfig(length=a.length, samples=1, seed=a.seed))[0]
    ctx, _ = split_prompt(tok, s.context, s.question, s.answer_prefix)
    ids = torch.tensor([ctx])

    full = kq.CompressedCache(model, kq.get_method("full"))
    prefill(model, full, ids)
    n_layers = len(full.layers)
    kv = [layer.store.view() for layer in full.layers]
    print(f"{a.model}: {n_layers} layers, {ids.shape[1]} context tokens ({a.task}, seed {a.seed}); t = {a.t}")
    print("pair     cos(keys) cos(values)  rel.err keys  rel.err values   (mean over tokens and kv heads)")
    for lo in range(n_layers - 1):
        row = []
        for i in (0, 1):
            xa, xb = kv[lo][i].float(), kv[lo + 1][i].float()
            cos = torch.nn.functional.cosine_similarity(xa, xb, dim=-1).mean().item()
            ra, rb = restore(xa, xb, a.t)
            err = torch.cat([((ra - xa).norm(dim=-1) / xa.norm(dim=-1)).flatten(),
                             ((rb - xb).norm(dim=-1) / xb.norm(dim=-1)).flatten()]).mean().item()
            row.append((cos, err))
        mark = "  <- merged by default" if lo >= n_layers // 2 and (lo - n_layers // 2) % 2 == 0 else ""
        print(f"{lo:2d},{lo + 1:2d}   {row[0][0]:9.3f} {row[1][0]:11.3f}  {row[0][1]:12.3f} {row[1][1]:15.3f}{mark}")

    # the implementation: the first merged pair of a MiniCache cache against the restoration above
    m = kq.get_method("minicache", t=a.t)
    mc = kq.CompressedCache(model, m)
    prefill(model, mc, ids)
    lo = m.cross_layer_plan(n_layers).groups[0][0]
    worst, merged_share = 0.0, []
    for i, half in ((0, "keys"), (1, "values")):
        xa, xb = kv[lo][i].float(), kv[lo + 1][i].float()
        ra, rb = restore(xa, xb, a.t)
        for layer, ref, exact in ((mc.layers[lo], ra, xa), (mc.layers[lo + 1], rb, xb)):
            got = layer.store.view()[i].float()
            merged = layer.store.own[f"{half}_merged"]
            merged_share.append(merged.float().mean().item())
            worst = max(worst, (got[merged] - ref[merged]).abs().max().item(),
                        (got[~merged] - exact[~merged]).abs().max().item())
    st = mc.stats()
    print(f"implementation check, pair ({lo},{lo + 1}): merged share of slots {min(merged_share):.3f}; max |stored "
          f"restoration - formula| (merged) / |stored - exact| (retained) = {worst:.2e}; cache holds "
          f"{st.kv_bytes / st.full_kv_bytes:.1%} of the full bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
