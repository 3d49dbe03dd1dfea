"""`kvsqueeze recommend`: the configuration with the best measured score at a byte budget.

A short calibration sweep (generated tasks, a few samples, one shared prefill per sample, rows in a resumable
results store) over the candidates methods x compression_ratios x `--quant` schemes, then a pick:

1. **Target.** Either a compression factor (`--target 8x`: the configuration must hold at most 1/8 of the
   uncompressed 16-bit cache, i.e. `factor = sum(full_kv_bytes_16) / sum(kv_bytes_16) >= 8` over its rows, see
   `sizes.py`), or an absolute budget (`--max-bytes 2M`: its mean `kv_bytes_16` per sample, bytes of keys and
   values as a 16-bit deployment holds them, at most that many bytes on the calibration samples' length).
   `tolerance` (default 1%) lets a size that token rounding or quantization scales put just past the target
   count (factor >= target * (1 - tolerance); bytes <= max_bytes * (1 + tolerance)).
2. **Pruning.** Before anything runs, candidates whose optimistic factor bound (`factor_bound`: 1/(1-compression_ratio)
   for eviction, times 16/bits for the cheapest bit width of the scheme, ignoring scales and the 16-bit residual
   window) cannot reach the target are dropped. The others run on the first calibration sample; those whose
   measured size misses the target there are dropped too, and only the rest run on the remaining samples.
3. **Pick.** Among the configurations measured on every calibration task and meeting the target, the one with the
   best score: the mean over tasks of its per-task mean score (string match in [0, 1]); ties go to the smaller
   cache, then to the name. The runner-up and the best eviction-only configuration (full-precision storage) are
   reported beside it.

The pick is printed with a `kvsqueeze generate ...` line and can be written as a JSON file that
`kvsqueeze generate --config FILE` reads (`config_dict`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from ..errors import KVSqueezeError

DEFAULT_METHODS = "full,streaming_llm,h2o,snapkv,pyramidkv,tova,knorm"
DEFAULT_RATIOS = "0.5,0.75,0.875,0.9375"
DEFAULT_QUANTS = "none,kivi-4,kivi-2"
DEFAULT_TASKS = "passkey,niah_multikey,niah_multivalue,vt"

# the keys of a `--config` file that `kvsqueeze generate` reads (its option names, '-' as '_')
CONFIG_KEYS = ("model", "method", "compression_ratio", "budget", "exempt_layers", "compression_interval", "quant",
               "select", "select_budget", "query_aware", "chunk_size", "max_new_tokens")
CONFIG_INFO = "recommended"  # the key holding how the pick was measured (ignored by generate)


def parse_target(text: str) -> float:
    """'8x', '8', '8.5X' -> 8.0 (a compression factor > 1). KVSqueezeError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*[xX]?\s*", str(text))
    if not m or float(m.group(1)) < 1.0:
        raise KVSqueezeError(f"--target must be a compression factor >= 1 such as 8x, got {text!r}")
    return float(m.group(1))


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'1048576', '512K', '2M', '1.5GiB' -> bytes (K/M/G are binary: 1K = 1024). KVSqueezeError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise KVSqueezeError(f"--max-bytes must be a positive size such as 2M or 1048576, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def quant_bits(quant: str | None) -> int:
    """The fewest bits per element a --quant scheme stores tokens in (16 for full precision)."""
    if not quant:
        return 16
    nums = [int(x) for x in re.findall(r"\d+", quant)]
    return min(nums) if nums else 16


def factor_bound(compression_ratio: float, quant: str | None, budget: int | None = None) -> float:
    """An upper bound on the 16-bit compression factor of (method at `compression_ratio`, `quant` storage), before
    running.

    Eviction at compression_ratio r keeps at least a (1 - r) share of the tokens (factor <= 1/(1-r)); a scheme stores
    an element in at least `quant_bits` bits (factor <= 16/bits; scales, outliers and the full-precision residual
    window only lower it). MiKV / ZipCache keep every token (the evicted / non-salient ones at the low width), so
    their bound is 16/low bits whatever the compression_ratio. A method given an absolute `budget` has no bound
    without the length: +inf (never pruned here; the first sample decides)."""
    q = 16.0 / quant_bits(quant)
    if budget is not None:
        return math.inf
    if quant and quant.split("-")[0] in ("mikv", "zipcache"):
        return q
    return q / max(1e-12, 1.0 - compression_ratio) if compression_ratio < 1.0 else math.inf


def meets(factor: float, kv_bytes: float, target: float | None, max_bytes: float | None,
          tolerance: float = 0.01) -> bool:
    """True when a configuration of this factor and mean 16-bit kv bytes satisfies the target (see module)."""
    if target is not None and not (factor >= target * (1.0 - tolerance)):
        return False
    if max_bytes is not None and not (kv_bytes <= max_bytes * (1.0 + tolerance)):
        return False
    return True


def candidates(df):
    """One row per configuration (method, params_json, compression_ratio) of a results frame measured on every task of
    it: score (mean over tasks of the per-task mean), factor (byte sums), kv_bytes_16 (mean per row), n (fewest
    samples of a task), quant, label. `df`: rows of one model / seed / code version (ResultStore.frame()). Perplexity
    rows are left out (another scale)."""
    import numpy as np
    import pandas as pd

    from .frontier import _bytes
    from .report import _labels

    d = df[df.metric != "perplexity"].copy()
    d = d[d.score.notna()]
    if d.empty:
        return pd.DataFrame(columns=["method", "params_json", "compression_ratio", "label", "quant", "score", "factor",
                                     "kv_bytes_16", "full_kv_bytes_16", "n", "step"])
    d["_kv"], d["_full"] = _bytes(d)
    if "label" not in d:
        d["label"] = _labels(d)
    tasks = sorted(d.task.unique())
    rows = []
    for (method, pj, cr), g in d.groupby(["method", "params_json", "compression_ratio"], sort=False):
        if sorted(g.task.unique()) != tasks:
            continue
        per_task = g.groupby("task").score.mean()
        ns = g.groupby("task").sample_id.nunique()
        q = g.quant.dropna().iloc[0] if "quant" in g and g.quant.notna().any() else None
        rows.append({"method": method, "params_json": pj, "compression_ratio": float(cr), "label": g.label.iloc[0],
                     "quant": q, "score": float(per_task.mean()),
                     "factor": float(g._full.sum() / g._kv.sum()) if g._kv.sum() > 0 else np.nan,
                     "kv_bytes_16": float(g._kv.mean()), "full_kv_bytes_16": float(g._full.mean()),
                     "n": int(ns.min()), "step": max(1.0 / (len(tasks) * n) for n in ns)})
    return pd.DataFrame(rows)


@dataclass
class Recommendation:
    """The pick among the candidates meeting the target, the runner-up (None when it is alone), the best
    eviction-only one (full-precision storage; None when none meets the target) and every candidate (a
    DataFrame from `candidates`, with a `meets` column)."""

    best: dict
    runner_up: dict | None
    eviction_only: dict | None
    table: object


def pick(df, target: float | None = None, max_bytes: float | None = None, tolerance: float = 0.01,
         ) -> Recommendation:
    """The configuration with the best measured score among those meeting the target (pure: reads `df` only).

    `df`: results rows of one model (ResultStore.frame() or report.load_results), restricted to the calibration
    run; `target`: compression factor (>= 1) and/or `max_bytes` (mean kv_bytes_16). Ranking: score (higher
    first), then factor (larger first), then the label. KVSqueezeError when no configuration has results, or
    when none meets the target (the message names the largest factor / smallest bytes measured)."""
    if target is None and max_bytes is None:
        raise KVSqueezeError("give a target: --target FACTOR (e.g. 8x) or --max-bytes SIZE")
    t = candidates(df)
    if t.empty:
        raise KVSqueezeError("no scored calibration results to recommend from")
    t["meets"] = [meets(f, b, target, max_bytes, tolerance) for f, b in zip(t.factor, t.kv_bytes_16)]
    ok = t[t.meets].sort_values(["score", "factor", "label"], ascending=[False, False, True])
    if ok.empty:
        top = t.loc[t.factor.idxmax()]
        small = t.loc[t.kv_bytes_16.idxmin()]
        want = " and ".join(([f"target {target:g}x"] if target is not None else []) +
                            ([f"budget of at most {max_bytes:.0f} bytes"] if max_bytes is not None else []))
        raise KVSqueezeError(
            f"no candidate configuration meets the {want}: the largest factor available is {top.factor:.2f}x "
            f"({describe(top)}), the smallest cache {small.kv_bytes_16:.0f} bytes; add higher --compression-ratios or "
            f"lower-bit --quant schemes")
    rows = ok.to_dict("records")
    for r in rows:  # pandas turns a missing scheme into NaN
        r["quant"] = r["quant"] if isinstance(r["quant"], str) and r["quant"] else None
    evict = [r for r in rows if r["quant"] is None]
    return Recommendation(rows[0], rows[1] if len(rows) > 1 else None, evict[0] if evict else None, t)


def describe(row) -> str:
    """'snapkv @0.875 + kivi-4' for a candidate row."""
    from .frontier import config_name

    return config_name(row["label"], row["compression_ratio"])


def line(row) -> str:
    """One printed line for a candidate: name, factor, 16-bit KiB, score, n and what one sample moves."""
    return (f"{describe(row)}: factor {row['factor']:.2f}x, kv {row['kv_bytes_16'] / 2**10:.1f} KiB (16-bit) of "
            f"{row['full_kv_bytes_16'] / 2**10:.1f}, score {row['score']:.3f} (n={row['n']} per task; one sample "
            f"moves it by {row['step']:.3f})")


def config_dict(pair, model: str, row: dict | None = None, info: dict | None = None) -> dict:
    """The JSON `kvsqueeze generate --config FILE` reads for a sweep `Pair`: generate's options (the method as
    given, before the scheme wraps it), plus `recommended` (how it was measured) when `row` / `info` are given."""
    from ..methods import method_spec

    base = pair.base or pair.method
    cfg = {"model": model, "method": method_spec(base),  # name[:scorer][(tuned parameters)]: get_method reads it
           "compression_ratio": (0.0 if base.name == "full"
                                 else (base.compression_ratio if base.budget is None else 0.5)),
           "budget": base.budget,
           "exempt_layers": ",".join(str(i) for i in (getattr(base, "exempt_layers", None) or ())),
           "compression_interval": int(getattr(base, "compression_interval", 0) or 0), "quant": pair.quant or "none",
           "select": pair.select or "none", "select_budget": int(pair.select_budget or 512),
           "query_aware": bool(pair.query_aware)}
    if row is not None or info:
        meta = dict(info or {})
        if row is not None:
            meta.update({"configuration": describe(row), "factor": round(float(row["factor"]), 4),
                         "kv_bytes_16": int(row["kv_bytes_16"]), "full_kv_bytes_16": int(row["full_kv_bytes_16"]),
                         "score": round(float(row["score"]), 4), "n": int(row["n"])})
        cfg[CONFIG_INFO] = meta
    return cfg


def generate_line(cfg: dict) -> str:
    """The `kvsqueeze generate` command line equivalent to a config dict (defaults left out)."""
    import shlex

    parts = ["kvsqueeze generate", f"--model {cfg['model']}", f"--method {shlex.quote(cfg['method'])}"]
    if cfg.get("budget") is not None:
        parts.append(f"--budget {cfg['budget']}")
    elif cfg["method"] != "full":
        parts.append(f"--compression-ratio {cfg['compression_ratio']:g}")
    if cfg.get("exempt_layers"):
        parts.append(f"--exempt-layers {cfg['exempt_layers']}")
    if cfg.get("compression_interval"):
        parts.append(f"--compression-interval {cfg['compression_interval']}")
    if cfg.get("quant", "none") != "none":
        parts.append(f"--quant {cfg['quant']}")
    if cfg.get("select", "none") != "none":
        parts.append(f"--select {cfg['select']} --select-budget {cfg['select_budget']}")
    if cfg.get("query_aware"):
        parts.append("--query-aware")
    return " ".join(parts) + " --context-file FILE --question TEXT"


def read_config(path) -> dict:
    """A `--config` JSON file as {generate option: value}; KVSqueezeError when it is missing, not JSON, not an
    object, or names an option generate does not have (the `recommended` block is ignored; the old key `ratio`
    gets its own message: it is `compression_ratio` now)."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise KVSqueezeError(f"config file not found: {p}")
    try:
        cfg = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise KVSqueezeError(f"config file {p} is not JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise KVSqueezeError(f"config file {p} must hold a JSON object")
    cfg = {k: v for k, v in cfg.items() if k != CONFIG_INFO}
    if "ratio" in cfg:
        raise KVSqueezeError(f"config file {p}: the key `ratio` was renamed `compression_ratio` (the fraction of "
                             "tokens removed, kvpress's name)")
    bad = sorted(set(cfg) - set(CONFIG_KEYS))
    if bad:
        raise KVSqueezeError(f"config file {p}: unknown key(s) {', '.join(bad)}; known: {', '.join(CONFIG_KEYS)}")
    return cfg


def safe_name(model: str) -> str:
    """A file name for a model alias / hub id / directory: '/' and other odd characters become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model.strip("/")) or "model"


def calibrate(model, tokenizer, samples, pairs, store, *, model_name: str, seed: int, code_version: str,
              target: float | None, max_bytes: float | None, tolerance: float = 0.01, progress: bool = True,
              batch_size: int = 8, log=None):
    """Run the calibration sweep in two stages and return (rows of this run, pairs kept after the first sample).

    Stage 1: every pair on `samples[0]`; pairs whose measured size there misses the target are dropped (their
    rows stay in the store). Stage 2: the kept pairs on all the samples. Both stages resume from `store` (one
    shared prefill per sample, rows committed one by one). `log`: a callable taking a line (progress notes)."""
    import numpy as np

    from .sweep import run_sweep

    log = log or (lambda s: None)
    kw = dict(model_name=model_name, seed=seed, code_version=code_version, progress=progress,
              batch_size=batch_size)
    r1 = run_sweep(model, tokenizer, samples[:1], pairs, store, **kw)
    df = _mine(store.frame(), pairs, samples[:1], model_name, seed, code_version)
    kept = []
    from .frontier import _bytes

    if not df.empty:
        kv, full = _bytes(df)
        df = df.assign(_kv=kv, _full=full)
    for p in pairs:
        g = df[(df.method == p.name) & (df.params_json == p.params_json)
               & (df.compression_ratio == p.compression_ratio)] if not df.empty else df
        if g.empty:
            continue
        f = float(g._full.sum() / g._kv.sum()) if g._kv.sum() > 0 else np.inf
        if meets(f, float(g._kv.mean()), target, max_bytes, tolerance):
            kept.append(p)
    log(f"first sample: {len(kept)} of {len(pairs)} configurations meet the target "
        f"({r1.added} rows computed, {r1.skipped} already stored)")
    r2 = None
    if kept and len(samples) > 1:
        r2 = run_sweep(model, tokenizer, samples, kept, store, **kw)
        log(f"all samples: {r2.added} rows computed, {r2.skipped} already stored; "
            f"{r1.prefills + r2.prefills} shared prefills")
    rows = _mine(store.frame(), kept or pairs, samples, model_name, seed, code_version)
    return rows, kept


def _mine(df, pairs, samples, model_name, seed, code_version):
    """The rows of `df` for these pairs, samples, model, seed and code version."""
    import numpy as np

    if df.empty:
        return df
    keys = {(p.name, p.params_json, float(p.compression_ratio)) for p in pairs}
    ids = {(s.task, s.sample_id) for s in samples}
    sel = np.array([(m, pj, float(r)) in keys and (t, i) in ids for m, pj, r, t, i in
                    zip(df.method, df.params_json, df.compression_ratio, df.task, df.sample_id)], dtype=bool)
    sel &= (df.model == model_name).to_numpy() & (df.code_version == code_version).to_numpy() \
        & (df.seed == seed).to_numpy()
    return df[sel].reset_index(drop=True)
