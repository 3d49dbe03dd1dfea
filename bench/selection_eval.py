"""Decode-time selection (issue 4): task score and attention recovery rate of AttentionPredictor, Quest and the
eviction baselines at equal token budgets, on ~4k-token tasks whose answers take many decoding steps.

    nice python bench/selection_eval.py --data-dir /work/shared/data/paul_graham_essays \
        --samples 8 --methods full,attention_predictor,quest,h2o,snapkv,streaming_llm --budgets 256,512,1024
    python bench/selection_eval.py --report

Every cell (sample, method, budget) is one JSON line appended to --out as soon as it is done; a rerun skips the
cells already there, so a killed run loses at most one cell and the work can be split with --methods / --budgets /
--samples. One uncompressed prefill per sample serves every cell (`record_prefill`): selectors attend to a subset
of the full cache; eviction methods get the cache their prefill would have produced (`PrefillRecord.compress`).

Protocol (question-agnostic, kvsqueeze's default): the context is prefilled (and, for eviction methods,
compressed to the budget), the question is appended, the answer is decoded greedily.
- Quest / AttentionPredictor: every decoding step of layers 2.. attends to at most `budget` tokens (the current
  token included); layers 0-1 dense.
- H2O: held at `budget` tokens at every decoding step (compression_interval=1). SnapKV, StreamingLLM: the context is
  compressed to `budget` tokens; the question and the answer tokens are appended on top (<= budget + ~110).
Recovery rate: the share of the current query's dense attention (over every token seen, layer's true keys) that
falls on the attended tokens, per layer, averaged over query heads and decoding steps. Selectors measure it
exactly (the full cache is there). For eviction methods the dense reference is the full prefill's context keys
plus the question/answer keys still held (tokens of the question that H2O evicted are missing from the
reference: a slight overestimate for H2O).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

SELECTORS = ("attention_predictor", "quest")
EVICTION = ("h2o", "snapkv", "streaming_llm")


COPY_QUESTION = ('Repeat word for word the three sentences of the text above that begin with "{start}". '
                 "Write only those three sentences.")


def copy_samples(tok, n: int, length: int, haystack, seed: int):
    """Long answers: repeat three consecutive sentences of the context, the answer primed with their first six words
    (score: ROUGE-L recall of the remaining words)."""
    import random

    from kvsqueeze.tasks.base import Sample, fit_sample

    out = []
    for i in range(n):
        rng = random.Random(f"copy-{seed}-{length}-{i}")
        depth = rng.uniform(0.1, 0.9)
        state = rng.getstate()

        def build(m, i=i, depth=depth, state=state):
            r = random.Random()
            r.setstate(state)
            sents = haystack.sentences(max(m, 4), r)
            at = int(depth * (len(sents) - 3))
            passage = " ".join(sents[at : at + 3])
            words = passage.split()
            start = " ".join(words[:6])
            # the answer starts with the passage's first words; the model continues it from the context
            return Sample(" ".join(sents), COPY_QUESTION.format(start=start), [" ".join(words[6:])], start, 64, "copy",
                          meta={"length": length, "depth": round(depth, 3)}, sample_id=f"L{length}-{i}")

        out.append(fit_sample(tok, build, length, "copy").finalize())
    return out


def rouge_l_recall(prediction: str, reference: str) -> float:
    """Longest common subsequence of words / words of the reference (lower case, punctuation stripped)."""
    import re

    words = lambda t: re.findall(r"[a-z0-9']+", t.lower())  # noqa: E731
    a, b = words(prediction), words(reference)
    if not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1] / len(b)


def task_score(sample, answer: str) -> float:
    from kvsqueeze.tasks.base import string_match_all

    if sample.task == "copy":
        return rouge_l_recall(answer, sample.answers[0])
    return string_match_all(answer, sample.answers)


def build_samples(tok, task: str, n: int, length: int, data_dir: str | None, seed: int):
    from kvsqueeze.tasks import ruler
    from kvsqueeze.tasks.haystack import make_haystack

    if task == "copy":
        return copy_samples(tok, n, length, make_haystack(data_dir, seed), seed)
    fn = {"niah_multivalue": ruler.niah_multivalue, "niah_multiquery": ruler.niah_multiquery,
          "vt": ruler.variable_tracking}[task]
    return fn(tok, n, length, seed=seed, haystack=make_haystack(data_dir, seed))


class EvictionProbe:
    """Recovery rate of an eviction cache: dense attention over (full context keys + the cache's newer keys)."""

    def __init__(self, full_cache, cache, n_ctx: int, dense_layers=()):
        self.full, self.cache, self.n_ctx = full_cache, cache, n_ctx
        self.sum, self.count = defaultdict(float), defaultdict(int)
        self.dense_layers = dense_layers

    def __call__(self, module, query):
        if query.shape[2] != 1:
            return
        from kvsqueeze.selection import attention_probs

        li = module.layer_idx
        layer = self.cache.layers[li]
        ctx_keys = self.full.layers[li].keys  # (1, hk, C, d)
        hk = ctx_keys.shape[1]
        g = query.shape[1] // hk
        rs = []
        for h in range(hk):
            pos = layer.positions[0, h]
            new = layer.keys[:, h : h + 1, pos >= self.n_ctx]
            keys = torch.cat([ctx_keys[:, h : h + 1], new], 2)
            p = attention_probs(query[:, h * g : (h + 1) * g], keys, module.scaling)[0, :, 0]  # (g, C + m)
            kept = torch.zeros(keys.shape[2], dtype=torch.bool)
            kept[pos[pos < self.n_ctx].long()] = True
            kept[self.n_ctx :] = True
            rs.append(p[:, kept].sum(-1) / p.sum(-1))
        self.sum[li] += float(torch.cat(rs).mean())
        self.count[li] += 1

    def by_layer(self):
        return {i: self.sum[i] / self.count[i] for i in sorted(self.sum)}


def run_cell(model, tok, sample, rec, ctx, q, method: str, budget: int, predictor_net):
    import kvsqueeze as kq
    from kvsqueeze.runtime.attention import record_queries
    from kvsqueeze.compat import cache_kwargs
    from kvsqueeze.runtime.generate import _eos_ids, greedy_decode
    from kvsqueeze.selection import AttentionPredictor, Quest
    probe = None
    sel = None
    if method == "full":
        cache = rec.compress(model, None)
    elif method in SELECTORS:
        cache = rec.compress(model, None)
        sel = (AttentionPredictor(budget, predictor=predictor_net, track_recovery=True) if method == SELECTORS[0]
               else Quest(budget, track_recovery=True))
        sel.setup(model)
        cache.selector = sel
        for li, layer in enumerate(cache.layers):  # what the prefill would have shown the selector
            sel.observe(li, layer, rec.queries[li])
    else:
        kw = {"compression_interval": 1} if method == "h2o" else {}
        cache = rec.compress(model, kq.get_method(method, budget=budget, **kw))
        probe = EvictionProbe(rec.cache, cache, len(ctx))
    t0 = time.perf_counter()
    with torch.no_grad(), record_queries(probe if probe is not None else (lambda m, x: None)):
        logits = model(input_ids=torch.tensor([q]), **cache_kwargs(model, cache), logits_to_keep=1).logits[:, -1]
        tokens = greedy_decode(model, cache, logits, sample.max_new_tokens, _eos_ids(model, tok))
    seconds = time.perf_counter() - t0
    answer = tok.decode(tokens, skip_special_tokens=True).strip()
    recovery = sel.recovery_by_layer() if sel is not None else (probe.by_layer() if probe is not None else {})
    return {"answer": answer, "score": task_score(sample, answer), "n_new": len(tokens),
            "recovery": {str(k): round(v, 5) for k, v in recovery.items()}, "decode_seconds": round(seconds, 2),
            "selector": sel.describe() if sel is not None else None}


def run(args):
    import kvsqueeze as kq
    from kvsqueeze.runtime.generate import record_prefill, split_prompt
    from kvsqueeze.selection import load_predictor, predictor_path

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = kq.load_model(args.model)
    predictor_net, meta = None, {}
    methods = args.methods.split(",")
    if "attention_predictor" in methods:
        from kvsqueeze.selection.attention_predictor import HistoryMean, LastRow

        heuristics = {"mean": HistoryMean, "last": LastRow}
        if args.predictor in heuristics:  # ablation: the selector's machinery with a fixed rule, no learning
            predictor_net, meta = heuristics[args.predictor](), {"heuristic": args.predictor}
        else:
            predictor_net, meta = load_predictor(args.predictor or predictor_path(model))
    budgets = [int(b) for b in args.budgets.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["sample_id"], r["method"], r["budget"]))
    tagged = lambda m: m + (args.tag if m == "attention_predictor" and args.tag else "")  # noqa: E731
    samples = build_samples(tok, args.task, args.samples, args.length, args.data_dir, args.seed)
    if args.max_new_tokens:
        for smp in samples:
            smp.max_new_tokens = args.max_new_tokens
    lo, hi = (int(x) for x in args.sample_range.split(":")) if args.sample_range else (0, len(samples))
    for si, sample in enumerate(samples[lo:hi], start=lo):
        cells = [(m, 0 if m == "full" else b) for m in methods for b in ([0] if m == "full" else budgets)]
        cells = [c for c in cells if (sample.sample_id, tagged(c[0]), c[1]) not in done]
        if not cells:
            continue
        ctx, q = split_prompt(tok, sample.context, sample.question, sample.answer_prefix)
        t0 = time.perf_counter()
        rec = record_prefill(model, torch.tensor([ctx]))
        t_prefill = time.perf_counter() - t0
        for method, budget in cells:
            res = run_cell(model, tok, sample, rec, ctx, q, method, budget, predictor_net)
            name = method + (args.tag if method == "attention_predictor" and args.tag else "")
            row = {"task": args.task, "sample": si, "sample_id": sample.sample_id, "method": name, "budget": budget,
                   "answers": sample.answers, "n_ctx": len(ctx), "n_q": len(q), "prefill_seconds": round(t_prefill, 1),
                   "predictor": meta.get("config") and {"val_recovery": meta.get("val_recovery"),
                                                        "best_epoch": meta.get("best_epoch")}, **res}
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rmean = statistics.mean(res["recovery"].values()) if res["recovery"] else float("nan")
            print(f"[{si}] {name:<20} B={budget:<5} score={res['score']:.2f} recovery={rmean:.3f} "
                  f"new={res['n_new']} {res['decode_seconds']:.0f}s | {res['answer'][:70]!r}", flush=True)
        del rec


def report(args):
    rows = [json.loads(line) for line in Path(args.out).read_text().splitlines()]
    rows = [r for r in rows if r["task"] == args.task]
    cells = defaultdict(list)
    for r in rows:
        cells[(r["method"], r["budget"])].append(r)
    order = ["full", "attention_predictor", "quest", "h2o", "snapkv", "streaming_llm"]
    extra = sorted({m for m, _ in cells if m not in order})
    order = order[:2] + extra + order[2:]
    budgets = sorted({b for _, b in cells if b})
    names = {"full": "Full cache", "attention_predictor": "AttentionPredictor", "quest": "Quest",
             "h2o": "H2O (decode)", "snapkv": "SnapKV", "streaming_llm": "StreamingLLM"}

    def rec_mean(rs, min_layer=2):
        per = [statistics.mean(v for k, v in r["recovery"].items() if int(k) >= min_layer) for r in rs if r["recovery"]]
        return statistics.mean(per) if per else None

    ns = {len(v) for v in cells.values()}
    metric = "ROUGE-L recall of the passage's words" if args.task == "copy" else "RULER string_match_all"
    print(f"task {args.task}: {min(ns)}-{max(ns)} samples per cell; score = {metric} (%); "
          f"recovery = attention recovery rate, mean of layers 2-29\n")
    head = "| method | " + " | ".join(f"B={b} score | B={b} recovery" for b in budgets) + " |"
    print(head)
    print("|" + "---|" * (1 + 2 * len(budgets)))
    for m in order:
        if m == "full" and ("full", 0) in cells:
            rs = cells[("full", 0)]
            sc = 100 * statistics.mean(r["score"] for r in rs)
            print(f"| {names[m]} (n={len(rs)}) | " + " | ".join(f"{sc:.1f} | 1.000" for _ in budgets) + " |")
            continue
        parts = []
        for b in budgets:
            rs = cells.get((m, b))
            if not rs:
                parts.append("- | -")
                continue
            rc = rec_mean(rs)
            parts.append(f"{100 * statistics.mean(r['score'] for r in rs):.1f} | "
                         + ("-" if rc is None else f"{rc:.3f}"))
        if any(p != "- | -" for p in parts):
            label = names.get(m) or (names["attention_predictor"] + m[len("attention_predictor"):])
            print(f"| {label} | " + " | ".join(parts) + " |")
    b = args.layer_budget
    print(f"\nper-layer recovery rate at B={b} (mean over samples and decoding steps):")
    layers = sorted({int(k) for r in rows for k in r["recovery"]})
    print("| layer | " + " | ".join(names.get(m, m) for m in order if (m, b) in cells) + " |")
    print("|" + "---|" * (1 + sum((m, b) in cells for m in order)))
    for li in layers:
        vals = []
        for m in order:
            if (m, b) not in cells:
                continue
            v = [r["recovery"][str(li)] for r in cells[(m, b)] if str(li) in r["recovery"]]
            vals.append(f"{statistics.mean(v):.3f}" if v else "dense")
        print(f"| {li} | " + " | ".join(vals) + " |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="niah_multivalue", choices=["niah_multivalue", "niah_multiquery", "vt", "copy"])
    p.add_argument("--data-dir", default=None, help="Haystack directory of .txt files (default: procedural text).")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--sample-range", default=None, help="Only samples lo:hi (of --samples).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="full,attention_predictor,quest,h2o,snapkv,streaming_llm")
    p.add_argument("--budgets", default="256,512,1024")
    p.add_argument("--predictor", default=None,
                   help="Checkpoint (default: the model's in $KVSQUEEZE_CACHE), or 'mean' / 'last' (heuristic ablations).")
    p.add_argument("--tag", default="", help="Suffix for the attention_predictor rows (e.g. ':mean' for an ablation).")
    p.add_argument("--out", default="bench/results/selection_eval.jsonl")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy machine).")
    p.add_argument("--max-new-tokens", type=int, default=None, help="Override the task's answer budget.")
    p.add_argument("--report", action="store_true", help="Print the tables from --out and exit.")
    p.add_argument("--layer-budget", type=int, default=512, help="Budget of the per-layer recovery table.")
    args = p.parse_args(argv)
    if args.report:
        report(args)
    else:
        run(args)


if __name__ == "__main__":
    sys.exit(main())
