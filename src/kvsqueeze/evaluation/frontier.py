"""The Pareto frontier of score against KV bytes over every configuration in a results store, with error bars.

A configuration is one (method + parameters, compression_ratio, quant scheme, selector + budget) of one model. Per
task, its score is the mean over the samples stored, and its compression factor is

    factor = sum(full_kv_bytes_16) / sum(kv_bytes_16)      over its rows (see sizes.py: 16-bit-normalised bytes)

(rows written before the 16-bit columns existed were never quantized, so full_kv_bytes / kv_bytes, measured in
one dtype, is the same factor). A configuration is on the frontier when no other one has a factor at least as
large and a score at least as good, one of them strictly (perplexity: lower is better). Ties are all kept.

Decode-time selection (Quest, AttentionPredictor) keeps the whole cache: its factor is that of its storage (the
selector saves bandwidth per step, not memory), so a selector configuration only reaches the frontier by scoring
at least as well as everything as small; the `attends` column shows its per-step token budget.

`overall`: per configuration, the mean over the string-match tasks of its per-task scores, over the
configurations measured on every one of those tasks (perplexity is on another scale and is left out); its factor
is the quotient of its byte sums over those tasks.

Error bars. A string-match score of a sample is in [0, 1], so one sample moves a mean over n samples by at most
1/n (`+-1 sample`); for `overall`, one sample of task t moves it by 1 / (T n_t), the largest of which is shown.
For perplexity no such bound exists: the column shows the largest change that dropping one sample makes.
`bootstrap=N` adds a 95% percentile interval from N resamples of the samples (seeded; overall: each task
resampled independently).
"""

from __future__ import annotations

import json

import numpy as np

from ..errors import KVSqueezeError

CONFIG = ["model", "label", "compression_ratio"]


def row_scores(df, metric: str | None = None):
    """The score per row: the primary metric, or `metric` from metrics_json where a row has it."""
    if metric is None:
        return df.score.astype(float), df.metric
    vals = []
    for mj in df.metrics_json:
        try:
            v = json.loads(mj or "{}").get(metric)
        except (TypeError, ValueError):
            v = None
        vals.append(np.nan if v is None else float(v))
    import pandas as pd

    s = pd.Series(vals, index=df.index, dtype=float)
    if s.isna().all():
        raise KVSqueezeError(f"no row has the metric {metric!r}")
    return s, pd.Series([metric] * len(df), index=df.index)


def _bytes(df):
    """(kv bytes, full bytes) per row on the 16-bit scale, falling back to the measured ones (old rows)."""
    kv16 = df.kv_bytes_16.astype(float) if "kv_bytes_16" in df else df.kv_bytes.astype(float) * np.nan
    full16 = df.full_kv_bytes_16.astype(float) if "full_kv_bytes_16" in df else kv16 * np.nan
    old = kv16.isna() | full16.isna()
    kv = kv16.where(~old, df.kv_bytes.astype(float))
    full = full16.where(~old, df.full_kv_bytes.astype(float))
    return kv, full


def one_sample_step(scores, metric: str) -> float:
    """How much one sample can move the mean of `scores`: 1/n for string match, else the largest change that
    dropping one sample makes (NaN with a single sample)."""
    x = np.asarray(scores, dtype=float)
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return float("nan")
    if metric != "perplexity":
        return 1.0 / n
    if n == 1:
        return float("nan")
    loo = (x.sum() - x) / (n - 1)
    return float(np.abs(loo - x.mean()).max())


def bootstrap_ci(scores, n_boot: int, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `scores` (samples resampled with replacement)."""
    x = np.asarray(scores, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def pareto_mask(factor, score, higher_is_better: bool = True) -> np.ndarray:
    """True for the points no other point dominates (factor and score both at least as good, one strictly)."""
    f = np.asarray(factor, dtype=float)
    s = np.asarray(score, dtype=float)
    if not higher_is_better:
        s = -s
    keep = np.ones(len(f), dtype=bool)
    for i in range(len(f)):
        if np.isnan(f[i]) or np.isnan(s[i]):
            keep[i] = False
            continue
        dom = (f >= f[i]) & (s >= s[i]) & ((f > f[i]) | (s > s[i]))
        keep[i] = not bool(dom.any())
    return keep


def config_points(df, metric: str | None = None, bootstrap: int = 0, seed: int = 0):
    """One row per (model, task, configuration): score, factor, kv bytes, n, one-sample step, attends, CI."""
    import pandas as pd

    d = df.copy()
    d["_score"], d["_metric"] = row_scores(d, metric)
    d = d[d._score.notna()]
    d["_kv"], d["_full"] = _bytes(d)
    rows = []
    for (model, task, label, cr), g in d.groupby(["model", "task", "label", "compression_ratio"], sort=False):
        m = g._metric.iloc[0]
        row = {"model": model, "task": task, "label": label, "compression_ratio": cr, "metric": m,
               "score": float(g._score.mean()), "n": int(g.sample_id.nunique()),
               "kv_bytes_16": float(g._kv.mean()), "full_kv_bytes_16": float(g._full.mean()),
               "factor": float(g._full.sum() / g._kv.sum()) if g._kv.sum() > 0 else np.nan,
               "step": one_sample_step(g._score, m),
               "attends": (int(g.select_budget.iloc[0]) if "select_budget" in g and g.select_budget.notna().any()
                           else None)}
        if bootstrap:
            row["ci_low"], row["ci_high"] = bootstrap_ci(g._score, bootstrap, seed)
        rows.append(row)
    return pd.DataFrame(rows)


def overall_points(df, metric: str | None = None, bootstrap: int = 0, seed: int = 0):
    """Per (model, configuration): the mean over the string-match tasks of its per-task scores, for the
    configurations present on every such task of that model."""
    import pandas as pd

    d = df.copy()
    d["_score"], d["_metric"] = row_scores(d, metric)
    d = d[d._score.notna() & (d._metric != "perplexity")]
    d["_kv"], d["_full"] = _bytes(d)
    rows = []
    for model, dm in d.groupby("model", sort=False):
        tasks = sorted(dm.task.unique())
        if not tasks:
            continue
        for (label, cr), g in dm.groupby(["label", "compression_ratio"], sort=False):
            if sorted(g.task.unique()) != tasks:
                continue
            per_task = {t: gt._score.to_numpy(float) for t, gt in g.groupby("task")}
            ns = {t: len(gt.sample_id.unique()) for t, gt in g.groupby("task")}
            row = {"model": model, "task": "overall", "label": label, "compression_ratio": cr, "metric": "mean of tasks",
                   "score": float(np.mean([v.mean() for v in per_task.values()])), "n": int(min(ns.values())),
                   "kv_bytes_16": float(g._kv.mean()), "full_kv_bytes_16": float(g._full.mean()),
                   "factor": float(g._full.sum() / g._kv.sum()) if g._kv.sum() > 0 else np.nan,
                   "step": max(1.0 / (len(tasks) * n) for n in ns.values()),
                   "attends": (int(g.select_budget.iloc[0]) if "select_budget" in g and g.select_budget.notna().any()
                               else None)}
            if bootstrap:
                rng = np.random.default_rng(seed)
                means = np.zeros(bootstrap)
                for v in per_task.values():
                    means += v[rng.integers(0, len(v), size=(bootstrap, len(v)))].mean(axis=1)
                means /= len(per_task)
                row["ci_low"], row["ci_high"] = float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))
            rows.append(row)
    return pd.DataFrame(rows)


def frontier(df, task: str | None = None, metric: str | None = None, bootstrap: int = 0, seed: int = 0):
    """Every configuration point (per task, plus `overall` when no task is given) with an `on_frontier` flag."""
    import pandas as pd

    if task is not None:
        if task not in set(df.task):
            raise KVSqueezeError(f"no results for task {task!r} (tasks: {', '.join(sorted(set(df.task)))})")
        df = df[df.task == task]
    pts = config_points(df, metric, bootstrap, seed)
    if task is None and df.task.nunique() > 1:
        ov = overall_points(df, metric, bootstrap, seed)
        if not ov.empty:
            pts = pd.concat([pts, ov], ignore_index=True)
    if pts.empty:
        raise KVSqueezeError("no scored results to build a frontier from")
    pts["on_frontier"] = False
    for _, g in pts.groupby(["model", "task"], sort=False):
        mask = pareto_mask(g.factor, g.score, g.metric.iloc[0] != "perplexity")
        pts.loc[g.index, "on_frontier"] = mask
    return pts


def config_name(label: str, compression_ratio: float) -> str:
    if label == "full" or label.startswith("full "):
        return label
    r = "budget" if compression_ratio < 0 else f"{compression_ratio:g}"
    head, sep, tail = label.partition(" + ")
    return f"{head} @{r}{sep}{tail}"


def frontier_tables(pts, all_points: bool = False) -> list[tuple[str, object]]:
    """(heading, DataFrame) per (model, task): the frontier points (`all_points`: every configuration, the
    frontier's marked with *), smallest cache first."""
    import pandas as pd

    out = []
    order = ["overall"] + [t for t in pts.task.unique() if t != "overall"]
    models = list(pts.model.unique())
    for model in models:
        for task in order:
            g = pts[(pts.model == model) & (pts.task == task) & (pts.on_frontier | all_points)]
            if g.empty:
                continue
            g = g.sort_values(["factor", "score"], ascending=[False, False])
            metric = g.metric.iloc[0]
            t = pd.DataFrame({
                "configuration": [("* " if all_points and f else "") + config_name(l, r)
                                  for l, r, f in zip(g.label, g.compression_ratio, g.on_frontier)],
                "factor": [f"{f:.2f}x" for f in g.factor],
                "kv MiB (16-bit)": [f"{b / 2**20:.2f}" for b in g.kv_bytes_16],
                "score": [f"{s:.3f}" for s in g.score],
                "n": g.n.to_numpy(),
                "+-1 sample": [f"{s:.3f}" if s == s else "-" for s in g.step],
                "attends": ["all" if a is None or a != a else str(int(a)) for a in g.attends],
            })
            if "ci_low" in g:
                t["95% bootstrap"] = [f"[{lo:.3f}, {hi:.3f}]" for lo, hi in zip(g.ci_low, g.ci_high)]
            n_all = int(((pts.model == model) & (pts.task == task)).sum())
            n_front = int(g.on_frontier.sum())
            head = (f"{model} / {task} ({metric}{', lower is better' if metric == 'perplexity' else ''}): "
                    f"{n_front} of {n_all} configurations on the frontier")
            out.append((head, t.reset_index(drop=True)))
    return out
