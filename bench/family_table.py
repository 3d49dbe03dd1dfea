"""Each method of a store against its closest base at equal bytes held (issue 14's evaluation table).

    python bench/family_table.py results/family.sqlite --pair kvmerger=h2o --pair d2o=h2o --pair ems=adakv:snapkv

For every configuration of a compared method (per task and overall = the mean of the tasks), the table prints its
score, its 16-bit KV bytes (`kv_bytes_16`: what a 16-bit deployment holds, quantized codes and scales included),
the bytes per context token, and the base's score AT THE SAME BYTES: the base's configurations with the same
storage (`--quant`) are read as a curve of score against log bytes and interpolated linearly at the method's
bytes (no extrapolation: more than 2% outside the base's range the cell says so). Equal compression_ratio does not mean equal
bytes for methods that share storage across layers (MiniCache, xKV) or change head-wise counts: the comparison is
at bytes, not at ratio. `+-1` is how much one sample moves a cell (the store's own granularity).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from kvsqueeze.errors import KVSqueezeError  # noqa: E402
from kvsqueeze.evaluation.report import load_results  # noqa: E402
from kvsqueeze.evaluation.store import distinguishing_params  # noqa: E402


def _strip(p, drop=("compression_ratio", "budget", "quant", "select", "select_budget"), top=True):
    """A method's parameters without the amount kept, its own name and the storage (they are columns of the
    table; a scorer keeps its name: "kvcrush (scorer=snapkv)"); a storage wrapper (MiKV's `inner`) is replaced by
    the method it wraps."""
    if isinstance(p, dict):
        if "inner" in p and p.get("name") == "mikv":
            return _strip(p["inner"], drop, top)
        out = {k: _strip(v, drop, False) for k, v in p.items() if k not in drop and not (top and k == "name")}
        if not top and "name" in out:  # a nested method (a scorer): its name stands for it
            return out["name"]
        return out
    return p


def default_params(method: str) -> str | None:
    """The stripped parameters (`_strip`, JSON) of `method` as `kvsqueeze.methods.get_method` builds it with no
    parameter given: the method's default (the paper's setting unless its docstring says otherwise); None for a
    name kvsqueeze does not know."""
    from kvsqueeze.evaluation.sweep import method_params

    try:
        from kvsqueeze.methods import get_method

        return json.dumps(_strip(method_params(get_method(method))), sort_keys=True)
    except KVSqueezeError:
        return None


def points(df):
    """One row per (task, method variant, storage, compression_ratio) and per (overall, ...): mean score over the
    samples (overall: the mean of the tasks' means, for configurations present on every task), mean 16-bit KV
    bytes, mean context tokens, and one sample's step. A method with several variants in the store is labelled by
    the parameters that tell them apart ("kvmerger (threshold=0.5)"), its default variant marked "[default]"."""
    import pandas as pd

    d = df.copy()
    d["quant"] = d["quant"].fillna("none") if "quant" in d else "none"
    kv16 = d["kv_bytes_16"].astype(float) if "kv_bytes_16" in d else d["kv_bytes"].astype(float) * np.nan
    d["_kv"] = kv16.fillna(d["kv_bytes"].astype(float))
    d["_params"] = [json.dumps(_strip(json.loads(p)), sort_keys=True) for p in d.params_json]
    names = {}
    for m, g in d.groupby("method"):
        variants = sorted(g._params.unique())
        for v, diff in distinguishing_params(variants).items():
            names[(m, v)] = m if diff is None else m + " (" + ", ".join(f"{k}={x}" for k, x in diff) + ")" + (
                " [default]" if v == default_params(m) else "")
    d["variant"] = [names[(m, v)] for m, v in zip(d.method, d._params)]
    rows = []
    keys = ["variant", "method", "quant", "compression_ratio"]
    for k, g in d.groupby(["task"] + keys):
        rows.append(dict(zip(["task"] + keys, k), score=float(g.score.mean()), n=g.sample_id.nunique(),
                         kv=float(g._kv.mean()), tokens=float(g.n_context_tokens.mean()),
                         step=1.0 / max(1, g.sample_id.nunique())))
    pts = pd.DataFrame(rows)
    tasks = sorted(d.task.unique())
    if len(tasks) > 1:
        over = []
        for k, g in pts.groupby(keys):
            if sorted(g.task) != tasks:
                continue
            over.append(dict(zip(keys, k), task="overall", score=float(g.score.mean()), n=int(g.n.min()),
                             kv=float(g.kv.mean()), tokens=float(g.tokens.mean()),
                             step=max(1.0 / (len(tasks) * n) for n in g.n)))
        pts = pd.concat([pts, pd.DataFrame(over)], ignore_index=True)
    return pts


TOLERANCE = math.log(1.02)  # bytes within 2% of the base's end points (rounding of per-layer budgets) count as them


def base_at(pts, base: str, quant: str, kv: float) -> float | None:
    """The base's score interpolated at `kv` bytes (linear in log bytes) among its configurations with storage
    `quant`, the full cache under that storage counted as its largest point; None outside their range."""
    g = pts[(pts.quant == quant) & pts.method.isin([base, "full"])].sort_values("kv")
    if g.empty or not kv > 0:
        return None
    xs, ys = np.log(g.kv.to_numpy(float)), g.score.to_numpy(float)
    x = math.log(kv)
    if x < xs[0] - TOLERANCE or x > xs[-1] + TOLERANCE:
        return None
    return float(np.interp(x, xs, ys))


def _cfg(r) -> str:
    return f"{r.variant} @{r.compression_ratio:g}" + ("" if r.quant == "none" else f" + {r.quant}")


def table(pts, pairs: dict[str, str]) -> list[str]:
    rows = [r for r in pts.sort_values(["task", "variant", "quant", "compression_ratio"]).itertuples()
            if r.method in pairs]
    w = max([40] + [len(_cfg(r)) for r in rows])
    lines = [f"{'task':<12} {'configuration':<{w}} {'score':>6} {'+-1':>6} {'KiB (16-bit)':>13} {'B/token':>8} "
             f"{'base':<14} {'base @ bytes':>12} {'diff':>7}"]
    for r in rows:
        base = pairs[r.method]
        b = base_at(pts[pts.task == r.task], base, r.quant, r.kv)
        lines.append(f"{r.task:<12} {_cfg(r):<{w}} {r.score:6.3f} {r.step:6.3f} {r.kv / 1024:13.1f} "
                     f"{r.kv / r.tokens:8.1f} {base:<14} {('%.3f' % b) if b is not None else 'out of range':>12} "
                     f"{('%+.3f' % (r.score - b)) if b is not None else '':>7}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="A kvsqueeze results store (sqlite).")
    ap.add_argument("--pair", action="append", default=[], metavar="METHOD=BASE",
                    help="A compared method and its base (repeatable).")
    args = ap.parse_args(argv)
    try:
        pairs = {}
        for p in args.pair:
            m, sep, b = p.partition("=")
            if not sep or not m or not b:
                raise KVSqueezeError(f"--pair takes METHOD=BASE, got {p!r}")
            pairs[m.strip()] = b.strip()
        if not pairs:
            raise KVSqueezeError("give at least one --pair METHOD=BASE")
        df = load_results(args.results)
        missing = [m for m in list(pairs) + list(pairs.values()) if m not in set(df.method)]
        if missing:
            raise KVSqueezeError(f"no rows for {', '.join(sorted(set(missing)))} in {args.results} "
                                 f"(methods there: {', '.join(sorted(set(df.method)))})")
        pts = points(df)
    except KVSqueezeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(table(pts, pairs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
