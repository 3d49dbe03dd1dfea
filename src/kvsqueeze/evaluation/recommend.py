"""`kvsqueeze recommend`: the configuration with the best measured score at a byte budget.

A short calibration sweep (generated tasks, a few samples, one shared prefill per sample, rows in a resumable
results store) over the candidates methods x ratios x `--quant` schemes, then a pick:

1. **Target.** Either a compression factor (`--target 8x`: the configuration must hold at most 1/8 of the
   uncompressed 16-bit cache, i.e. `factor = sum(full_kv_bytes_16) / sum(kv_bytes_16) >= 8` over its rows, see
   `sizes.py`), or an absolute budget (`--max-bytes 2M`: its mean `kv_bytes_16` per sample, bytes of keys and
   values as a 16-bit deployment holds them, at most that many bytes on the calibration samples' length).
   `tolerance` (default 1%) lets a size that token rounding or quantization scales put just past the target
   count (factor >= target * (1 - tolerance); bytes <= max_bytes * (1 + tolerance)).
2. **Pruning.** Before anything runs, candidates whose optimistic factor bound (`factor_bound`: 1/(1-ratio)
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
CONFIG_KEYS = ("model", "method", "ratio", "budget", "exempt_layers", "decode_every", "quant", "select",
               "select_budget", "query_aware", "chunk_size", "max_new_tokens")
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


def factor_bound(ratio: float, quant: str | None, budget: int | None = None) -> float:
    """An upper bound on the 16-bit compression factor of (method at `ratio`, `quant` storage), before running.

    Eviction at ratio r keeps at least a (1 - r) share of the tokens (factor <= 1/(1-r)); a scheme stores an
    element in at least `quant_bits` bits (factor <= 16/bits; scales, outliers and the full-precision residual
    window only lower it). MiKV / ZipCache keep every token (the evicted / non-salient ones at the low width), so
    their bound is 16/low bits whatever the ratio. A method given an absolute `budget` has no bound without the
    length: +inf (never pruned here; the first sample decides)."""
    q = 16.0 / quant_bits(quant)
    if budget is not None:
        return math.inf
    if quant and quant.split("-")[0] in ("mikv", "zipcache"):
        return q
    return q / max(1e-12, 1.0 - ratio) if ratio < 1.0 else math.inf


def meets(factor: float, kv_bytes: float, target: float | None, max_bytes: float | None,
          tolerance: float = 0.01) -> bool:
    """True when a configuration of this factor and mean 16-bit kv bytes satisfies the target (see module)."""
    if target is not None and not (factor >= target * (1.0 - tolerance)):
        return False
    if max_bytes is not None and not (kv_bytes <= max_bytes * (1.0 + tolerance)):
        return False
    return True


def candidates(df):
    """One row per configuration (method, params_json, ratio) of a results frame measured on every task of it:
    score (mean over tasks of the per-task mean), factor (byte sums), kv_bytes_16 (mean per row), n (fewest
    samples of a task), quant, label. `df`: rows of one model / seed / code version (ResultStore.frame()).
    Perplexity rows are left out (another scale)."""
    import numpy as np
    import pandas as pd

    from .frontier import _bytes
    from .report import _labels

    d = df[df.metric != "perplexity"].copy()
    d = d[d.score.notna()]
    if d.empty:
        return pd.DataFrame(columns=["method", "params_json", "ratio", "label", "quant", "score", "factor",
                                     "kv_bytes_16", "full_kv_bytes_16", "n", "step"])
    d["_kv"], d["_full"] = _bytes(d)
    if "label" not in d:
        d["label"] = _labels(d)
    tasks = sorted(d.task.unique())
    rows = []
    for (method, pj, ratio), g in d.groupby(["method", "params_json", "ratio"], sort=False):
        if sorted(g.task.unique()) != tasks:
            continue
        per_task = g.groupby("task").score.mean()
        ns = g.groupby("task").sample_id.nunique()
        q = g.quant.dropna().iloc[0] if "quant" in g and g.quant.notna().any() else None
        rows.append({"method": method, "params_json": pj, "ratio": float(ratio), "label": g.label.iloc[0],
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
            f"({describe(top)}), the smallest cache {small.kv_bytes_16:.0f} bytes; add higher --ratios or "
            f"lower-bit --quant schemes")
    rows = ok.to_dict("records")
    for r in rows:  # pandas turns a missing scheme into NaN
        r["quant"] = r["quant"] if isinstance(r["quant"], str) and r["quant"] else None
    evict = [r for r in rows if r["quant"] is None]
    return Recommendation(rows[0], rows[1] if len(rows) > 1 else None, evict[0] if evict else None, t)


def describe(row) -> str:
    """'snapkv @0.875 + kivi-4' for a candidate row."""
    from .frontier import config_name

    return config_name(row["label"], row["ratio"])


def line(row) -> str:
    """One printed line for a candidate: name, factor, 16-bit KiB, score, n and what one sample moves."""
    return (f"{describe(row)}: factor {row['factor']:.2f}x, kv {row['kv_bytes_16'] / 2**10:.1f} KiB (16-bit) of "
            f"{row['full_kv_bytes_16'] / 2**10:.1f}, score {row['score']:.3f} (n={row['n']} per task; one sample "
            f"moves it by {row['step']:.3f})")


def config_dict(pair, model: str, row: dict | None = None, info: dict | None = None) -> dict:
    """The JSON `kvsqueeze generate --config FILE` reads for a sweep `Pair`: generate's options (the method as
    given, before the scheme wraps it), plus `recommended` (how it was measured) when `row` / `info` are given."""
    base = pair.base or pair.method
    cfg = {"model": model, "method": base.name,
           "ratio": 0.0 if base.name == "full" else (base.ratio if base.budget is None else 0.5),
           "budget": base.budget,
           "exempt_layers": ",".join(str(i) for i in (getattr(base, "exempt_layers", None) or ())),
           "decode_every": int(getattr(base, "decode_every", 0) or 0), "quant": pair.quant or "none",
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
    parts = ["kvsqueeze generate", f"--model {cfg['model']}", f"--method {cfg['method']}"]
    if cfg.get("budget") is not None:
        parts.append(f"--budget {cfg['budget']}")
    elif cfg["method"] != "full":
        parts.append(f"--ratio {cfg['ratio']:g}")
    if cfg.get("exempt_layers"):
        parts.append(f"--exempt-layers {cfg['exempt_layers']}")
    if cfg.get("decode_every"):
        parts.append(f"--decode-every {cfg['decode_every']}")
    if cfg.get("quant", "none") != "none":
        parts.append(f"--quant {cfg['quant']}")
    if cfg.get("select", "none") != "none":
        parts.append(f"--select {cfg['select']} --select-budget {cfg['select_budget']}")
    if cfg.get("query_aware"):
        parts.append("--query-aware")
    return " ".join(parts) + " --context-file FILE --question TEXT"


def read_config(path) -> dict:
    """A `--config` JSON file as {generate option: value}; KVSqueezeError when it is missing, not JSON, not an
    object, or names an option generate does not have (the `recommended` block is ignored)."""
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
        g = df[(df.method == p.name) & (df.params_json == p.params_json) & (df.ratio == p.ratio)] \
            if not df.empty else df
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
    keys = {(p.name, p.params_json, float(p.ratio)) for p in pairs}
    ids = {(s.task, s.sample_id) for s in samples}
    sel = np.array([(m, pj, float(r)) in keys and (t, i) in ids for m, pj, r, t, i in
                    zip(df.method, df.params_json, df.ratio, df.task, df.sample_id)], dtype=bool)
    sel &= (df.model == model_name).to_numpy() & (df.code_version == code_version).to_numpy() \
        & (df.seed == seed).to_numpy()
    return df[sel].reset_index(drop=True)


# --- the command ------------------------------------------------------------------------------------------------
def register_recommend(main) -> None:
    """Add `kvsqueeze recommend` to the main command group."""
    import sys
    from pathlib import Path

    import click

    from ..models import DEFAULT_MODEL
    from ..options import _floats, _quants

    @click.command("recommend")
    @click.option("--model", default=DEFAULT_MODEL, show_default=True,
                  help="Model alias, HF hub id or local directory.")
    @click.option("--target", default=None,
                  help="Compression factor to reach: full 16-bit KV bytes / bytes held, e.g. 8x.")
    @click.option("--max-bytes", default=None,
                  help="Or: the most 16-bit KV bytes the cache may hold per calibration sample (512K, 2M, ...).")
    @click.option("--methods", default=DEFAULT_METHODS, show_default=True,
                  help="Candidate methods, comma-separated ('full' with --quant: quantization only).")
    @click.option("--ratios", default=DEFAULT_RATIOS, show_default=True, help="Candidate compression ratios.")
    @click.option("--quant", "quant", default=DEFAULT_QUANTS, show_default=True,
                  help="Candidate storage schemes, comma-separated ('none': full precision).")
    @click.option("--tasks", default=DEFAULT_TASKS, show_default=True,
                  help="Calibration tasks (generated ones; see `kvsqueeze sweep --help`).")
    @click.option("--length", type=click.IntRange(min=64), default=1024, show_default=True,
                  help="Tokens per calibration sample.")
    @click.option("--samples", type=click.IntRange(min=1), default=2, show_default=True,
                  help="Calibration samples per task.")
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration tasks.")
    @click.option("--tolerance", type=click.FloatRange(0.0, 0.5), default=0.01, show_default=True,
                  help="Relative slack on the target (rounding of kept tokens, quantization scales).")
    @click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="SQLite results file (default: $KVSQUEEZE_CACHE/recommend/<model>.sqlite; reruns resume).")
    @click.option("--config", "config_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Write the pick as JSON for `kvsqueeze generate --config FILE`.")
    @click.option("--verify-seed", type=int, default=None,
                  help="Then score the pick and the best eviction-only configuration on fresh samples of this "
                       "seed (same tasks and length; rows in the same store).")
    @click.option("--verify-samples", type=click.IntRange(min=1), default=5, show_default=True,
                  help="Samples per task for --verify-seed.")
    @click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                  help="Answers of one sample decoded for this many caches at once.")
    @click.option("--code-version", default=None, help="Override the code version in the result keys.")
    @click.option("--quiet", is_flag=True, help="No progress bar.")
    def recommend_cmd(model, target, max_bytes, methods, ratios, quant, tasks, length, samples, seed, tolerance,
                      results, config_out, verify_seed, verify_samples, batch_size, code_version, quiet):
        """Pick the configuration with the best measured score at a byte budget (short calibration sweep)."""
        from ..methods import METHODS
        from ..models import cache_dir, load_model
        from ..tasks import TaskConfig, build_samples, expand_tasks
        from .store import ResultStore, code_version as auto_version
        from .sweep import make_pairs

        if target is None and max_bytes is None:
            raise KVSqueezeError("give a target: --target FACTOR (e.g. 8x) or --max-bytes SIZE (e.g. 2M)")
        if verify_seed is not None and verify_seed == seed:
            raise KVSqueezeError(f"--verify-seed must differ from the calibration --seed ({seed})")
        tgt = parse_target(target) if target is not None else None
        mb = parse_bytes(max_bytes) if max_bytes is not None else None
        names = list(METHODS) if methods.strip() == "all" else [x.strip() for x in methods.split(",") if x.strip()]
        if not names:
            raise KVSqueezeError("--methods is empty")
        rs = _floats(ratios, "--ratios", 0.0, 1.0, True)
        quants = _quants(quant)
        task_names = expand_tasks(tasks)
        if "ppl" in task_names:
            raise KVSqueezeError("recommend ranks string-match tasks; leave 'ppl' out of --tasks")
        pairs = make_pairs(names, rs, quants=quants)
        if tgt is not None:  # analytic pruning: an optimistic bound below the target cannot meet it
            bounds = [factor_bound(p.ratio, p.quant, p.method.budget) for p in pairs]
            keep = [p for p, b in zip(pairs, bounds) if b >= tgt * (1.0 - tolerance)]
            if not keep:
                raise KVSqueezeError(f"no candidate configuration can reach {tgt:g}x: the largest factor available "
                                     f"is at most {max(bounds):.2f}x; add higher --ratios or lower-bit --quant "
                                     f"schemes")
            if not quiet:
                click.echo(f"{len(keep)} of {len(pairs)} candidates can reach {tgt:g}x (bound: 1/(1-ratio) x "
                           f"16/bits)", err=True)
            pairs = keep
        path = results or cache_dir() / "recommend" / f"{safe_name(model)}.sqlite"
        version = code_version or auto_version()
        try:
            store = ResultStore(path)
        except OSError as e:
            raise KVSqueezeError(f"cannot open results file {path}: {e}") from None
        mdl, tok = load_model(model)
        smp = build_samples(tok, task_names, TaskConfig(length=length, samples=samples, seed=seed))
        if not quiet:
            click.echo(f"calibration: {len(smp)} samples ({', '.join(task_names)}, {length} tokens, seed {seed}) x "
                       f"{len(pairs)} configurations on {model}; code {version}; results -> {path}", err=True)
        log = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
        try:
            rows, kept = calibrate(mdl, tok, smp, pairs, store, model_name=model, seed=seed, code_version=version,
                                   target=tgt, max_bytes=mb, tolerance=tolerance, progress=not quiet,
                                   batch_size=batch_size, log=log)
        except KeyboardInterrupt:
            click.echo(f"interrupted: {store.count()} rows are stored in {path}; run the same command to resume",
                       err=True)
            sys.exit(130)
        finally:
            store.close()
        rec = pick(rows, tgt, mb, tolerance)
        by_key = {(p.name, p.params_json, float(p.ratio)): p for p in pairs}
        want = " and ".join(([f"{tgt:g}x"] if tgt is not None else []) +
                            ([f"<= {mb} bytes"] if mb is not None else []))
        n_ok = int(rec.table.meets.sum())
        click.echo(f"target {want}: {n_ok} of {len(rec.table)} measured configurations meet it "
                   f"(score: mean over {len(task_names)} tasks of string match in [0, 1])")
        click.echo("pick:      " + line(rec.best))
        click.echo("runner-up: " + (line(rec.runner_up) if rec.runner_up is not None else "none"))
        if rec.eviction_only is not None and rec.eviction_only is not rec.best:
            click.echo("best eviction-only: " + line(rec.eviction_only))
        best_pair = by_key[(rec.best["method"], rec.best["params_json"], float(rec.best["ratio"]))]
        info = {"target": tgt, "max_bytes": mb, "tasks": task_names, "length": length, "samples": samples,
                "seed": seed, "code_version": version, "results": str(path)}
        if rec.runner_up is not None:
            info["runner_up"] = describe(rec.runner_up)
        cfg = config_dict(best_pair, model, rec.best, info)
        click.echo(generate_line(cfg))
        if verify_seed is not None:
            chosen = [best_pair]
            if rec.eviction_only is not None and rec.eviction_only is not rec.best:
                e = rec.eviction_only
                chosen.append(by_key[(e["method"], e["params_json"], float(e["ratio"]))])
            fresh = build_samples(tok, task_names, TaskConfig(length=length, samples=verify_samples,
                                                              seed=verify_seed))
            store = ResultStore(path)
            try:
                from .sweep import run_sweep

                run_sweep(mdl, tok, fresh, chosen, store, model_name=model, seed=verify_seed, code_version=version,
                          progress=not quiet, batch_size=batch_size)
                vrows = _mine(store.frame(), chosen, fresh, model, verify_seed, version)
            finally:
                store.close()
            vt = candidates(vrows)
            click.echo(f"fresh samples (seed {verify_seed}, {verify_samples} per task):")
            for who, p in zip(("pick", "eviction-only"), chosen):
                r = vt[(vt.method == p.name) & (vt.params_json == p.params_json) & (vt.ratio == float(p.ratio))]
                if not r.empty:
                    click.echo(f"  {who}: " + line(r.iloc[0].to_dict()))
            if len(chosen) == 1:
                click.echo("  (no eviction-only configuration meets the target)" if rec.eviction_only is None
                           else "  (the pick is eviction-only)")
        if config_out is not None:
            try:
                config_out.parent.mkdir(parents=True, exist_ok=True)
                config_out.write_text(json.dumps(cfg, indent=2) + "\n")
            except OSError as e:
                raise KVSqueezeError(f"cannot write {config_out}: {e}") from None
            click.echo(f"config written to {config_out} (kvsqueeze generate --config {config_out} ...)")

    main.add_command(recommend_cmd, "recommend")
