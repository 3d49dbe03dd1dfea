"""Q-Filters faithfulness check (issue 11 item 6): does <k, f> predict the attention a key receives?

    python bench/qfilters_check.py corr --essays /work/shared/data/paul_graham_essays [--seqs 3 --length 2048]
    python bench/qfilters_check.py retrieval --essays /work/shared/data/paul_graham_essays [--samples 8]

Essays are split by file: even-numbered files (sorted) calibrate, odd-numbered ones are the evaluation text, so
the filters never saw the haystack. Filter variants:

- `default`: what `kvsqueeze.load_model` calibrates with no cache present (the shipped calibration text);
- `essays`:  the paper's recipe (Godey et al. 2025, make_filters.py): 20 sequences x 2048 tokens of
  pretraining-like prose, 3000 sampled post-RoPE query vectors per head.

`corr` prints, per layer, the mean over kv heads of Spearman's rho between each key's score and the attention mass
that key receives from the last `--future` queries of the sequence (averaged over the kv head's query heads), for
+<k,f>, -<k,f> and -||k|| (KNorm) as a reference. `retrieval` runs niah_single / niah_multikey on the odd-file essay
haystack at compression_ratio 0.5 for qfilters (both filter sets, with and without a recent window), knorm, random and
snapkv.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

from kvsqueeze import load_model
from kvsqueeze.runtime.attention import record_queries
from kvsqueeze.runtime.routing import patched
from kvsqueeze.methods import qfilters as qf


def split_essays(essays: Path) -> tuple[list[Path], list[Path]]:
    files = sorted(essays.glob("*.txt"))
    return files[0::2], files[1::2]


def filter_sets(model, tok, essays: Path, store: Path | None = None, n_seq: int = 20) -> dict[str, torch.Tensor]:
    """{"default": ..., "essays": ...} filters (n_layers, kv_heads, head_dim); cached in `store` when given."""
    if store is not None and store.exists():
        return torch.load(store)
    calib, _ = split_essays(essays)
    texts = [p.read_text(errors="replace") for p in calib]
    out = {
        "default": qf.calibrate(model, tok, progress=False),
        "essays": qf.calibrate(model, tok, texts, n_seq=n_seq, seq_len=2048, n_vectors=3000),
    }
    if store is not None:
        store.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, store)
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@torch.no_grad()
def qk(model, ids: torch.Tensor):
    """Post-RoPE queries and keys per layer: lists of (hq, n, d) and (hkv, n, d)."""
    from transformers import DynamicCache
    qs: dict[int, torch.Tensor] = {}
    cache = DynamicCache()
    with patched(model), record_queries(lambda m, q: qs.__setitem__(m.layer_idx, q[0].float())):
        model(ids[None], past_key_values=cache, use_cache=True)
    keys = [layer.keys[0].float() for layer in cache.layers]
    return [qs[i] for i in sorted(qs)], keys


def cmd_corr(args) -> None:
    model, tok = load_model(args.model)
    filters = filter_sets(model, tok, args.essays, args.filters, args.calib_seqs)
    _, held = split_essays(args.essays)
    text = "\n\n".join(p.read_text(errors="replace") for p in held)
    ids_all = tok(text, return_tensors="pt").input_ids[0]
    rng = random.Random(0)
    n_layers = len(filters["default"])
    # rho[variant][layer] = list over (seq, kv head)
    variants = [f"{n}{s}" for n in filters for s in ("+", "-")] + ["knorm"]
    rho = {v: [[] for _ in range(n_layers)] for v in variants}
    for _ in range(args.seqs):
        s = rng.randrange(0, ids_all.numel() - args.length)
        ids = ids_all[s:s + args.length]
        queries, keys = qk(model, ids)
        n = ids.numel()
        past = n - args.future  # keys scored: [0, past); attention from queries [past, n)
        for li, (q, k) in enumerate(zip(queries, keys)):
            hkv, d = k.shape[0], k.shape[-1]
            rep = q.shape[0] // hkv
            att = torch.softmax(q[:, past:] @ k.repeat_interleave(rep, 0).transpose(1, 2) / d ** 0.5, dim=-1)
            mass = att[..., :past].sum(1).view(hkv, rep, past).mean(1)  # (hkv, past)
            kp = k[:, :past]
            for g in range(hkv):
                for name, f in filters.items():
                    proj = kp[g] @ f[li, g]
                    rho[f"{name}+"][li].append(spearman(proj, mass[g]))
                    rho[f"{name}-"][li].append(spearman(-proj, mass[g]))
                rho["knorm"][li].append(spearman(-kp[g].norm(dim=-1), mass[g]))
    print(f"Spearman rho(score, attention mass from the last {args.future} queries), {args.seqs} held-out "
          f"sequences x {args.length} tokens, mean over kv heads")
    print("layer " + " ".join(f"{v:>10}" for v in variants))
    for li in range(n_layers):
        print(f"{li:5d} " + " ".join(f"{sum(rho[v][li]) / len(rho[v][li]):10.3f}" for v in variants))
    print("mean  " + " ".join(f"{sum(sum(x) for x in rho[v]) / sum(len(x) for x in rho[v]):10.3f}" for v in variants))
    # Cosine between the two filter sets, per layer (mean over kv heads)
    a, b = filters["default"], filters["essays"]
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).mean(-1)
    print("cos(default, essays) per layer:", " ".join(f"{c:.2f}" for c in cos.tolist()))


def cmd_retrieval(args) -> None:
    from kvsqueeze.evaluation.sweep import make_pairs, run_sweep
    from kvsqueeze.methods import KNorm, QFilters, Random, SnapKV
    from kvsqueeze.evaluation.store import ResultStore
    from kvsqueeze.tasks import TaskConfig, build_samples

    model, tok = load_model(args.model)
    filters = filter_sets(model, tok, args.essays, args.filters, args.calib_seqs)
    _, held = split_essays(args.essays)
    with tempfile.TemporaryDirectory() as hay:
        for p in held:
            (Path(hay) / p.name).symlink_to(p.resolve())
        samples = build_samples(tok, ["niah_single", "niah_multikey"],
                              TaskConfig(length=args.length, samples=args.samples, haystack_dir=hay))
    methods = [QFilters(filters=filters["default"]), QFilters(filters=filters["essays"]),
               QFilters(filters=filters["essays"], window=64), QFilters(filters=-filters["essays"]),
               KNorm(), Random(), SnapKV()]
    labels = ["qfilters(default calib)", "qfilters(essay calib)", "qfilters(essay calib, window 64)",
              "qfilters(essay calib, sign flipped)", "knorm", "random", "snapkv"]
    pairs = make_pairs(methods, [args.compression_ratio])
    with ResultStore(args.results) as store:  # resumable: rerunning skips the rows already there
        run_sweep(model, tok, samples, pairs, store, model_name=args.model, progress=True)
        df = store.frame()
    by = {}
    for r in df.itertuples():
        by.setdefault((r.params_json, r.task), []).append(r.score)
    print(f"compression_ratio {args.compression_ratio}, {args.samples} samples per task, {args.length} tokens, "
          "essay haystack (held-out files)")
    for label, p in zip(labels, pairs):
        cells = []
        for task in ("niah_single", "niah_multikey"):
            sc = by.get((p.params_json, task), [])
            cells.append(f"{task} {sum(sc):.0f}/{len(sc)}")
        print(f"{label:38s} " + "  ".join(cells))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["corr", "retrieval"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--essays", type=Path, default=Path("/work/shared/data/paul_graham_essays"))
    ap.add_argument("--seqs", type=int, default=3)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--future", type=int, default=128)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--compression-ratio", "--ratio", type=float, default=0.5,
                    help="fraction of tokens removed (kvpress's compression_ratio)")
    ap.add_argument("--filters", type=Path, default=Path("results/qfilters_check_filters.pt"))
    ap.add_argument("--calib-seqs", type=int, default=20, help="windows of 2048 tokens for the essay filters")
    ap.add_argument("--results", type=Path, default=Path("results/qfilters_check.sqlite"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    {"corr": cmd_corr, "retrieval": cmd_retrieval}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
