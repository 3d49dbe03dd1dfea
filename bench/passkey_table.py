"""Passkey accuracy of every method at several ratios, question-agnostic, one shared prefill per sample.

    .venv/bin/python bench/passkey_table.py --model smollm2-135m --length 2000 -n 10 --ratios 0.5,0.75,0.875

Prints a markdown table: hits / samples per (method, ratio) and the KV bytes kept relative to a full cache.
"""

import argparse
import time

import torch
from tqdm.auto import tqdm

import kvsqueeze as kq
from kvsqueeze.pipeline import _eos_ids, greedy_decode, record_prefill, split_prompt
from kvsqueeze.tasks.passkey import passkey_samples

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--length", type=int, default=2000)
ap.add_argument("-n", type=int, default=10)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--ratios", default="0.5,0.75,0.875")
ap.add_argument("--methods", default=",".join(kq.METHODS))
a = ap.parse_args()

model, tok = kq.load_model(a.model)
ratios = [float(r) for r in a.ratios.split(",")]
methods = [m for m in a.methods.split(",") if m]
samples = passkey_samples(tok, a.n, a.length, a.seed)
eos = _eos_ids(model, tok)
hits = {(m, r): 0 for m in methods for r in ratios}
kept = {}
t0 = time.time()
n_ctx = []
with torch.no_grad():
    for s in tqdm(samples, desc="samples"):
        ctx, q = split_prompt(tok, s.context, s.question)
        n_ctx.append(len(ctx))
        rec = record_prefill(model, torch.tensor([ctx]))
        for m in methods:
            for r in ratios[:1] if m == "full" else ratios:  # full ignores the ratio
                cache = rec.compress(model, kq.get_method(m, ratio=r))
                kept[(m, r)] = cache.stats().ratio
                logits = model(torch.tensor([q]), past_key_values=cache, logits_to_keep=1).logits[:, -1]
                answer = tok.decode(greedy_decode(model, cache, logits, s.max_new_tokens, eos), skip_special_tokens=True)
                hits[(m, r)] += s.answers[0] in answer
if "full" in methods:
    for r in ratios[1:]:
        hits[("full", r)], kept[("full", r)] = hits[("full", ratios[0])], kept[("full", ratios[0])]
print(f"\nmodel {a.model}, passkey, {len(samples)} samples, context {min(n_ctx)}-{max(n_ctx)} tokens, "
      f"question-agnostic, {time.time() - t0:.0f} s")
print("| method | " + " | ".join(f"ratio {r}" for r in ratios) + " |")
print("|---|" + "---|" * len(ratios))
for m in methods:
    print(f"| {m} | " + " | ".join(f"{hits[(m, r)]}/{len(samples)} (KV {100 * kept[(m, r)]:.1f}%)" for r in ratios) + " |")
