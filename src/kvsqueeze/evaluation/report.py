"""`kvsqueeze report RESULTS -o report.html`: one static HTML page, readable without a server or a network.

Plots are matplotlib (Agg) PNGs embedded as base64 data URIs; tables are pandas HTML. For each model in the results:
the mean-score table, score vs compression_ratio (one panel per task, one line per method, the uncompressed reference
dashed), score vs KV bytes kept, the Pareto frontier of score vs 16-bit KV bytes (per task and overall, frontier
points labelled), and NIAH depth x length heatmaps for every method and compression_ratio. When a key was measured by
several code versions, the latest row is used. A small inline script records, once the page has loaded, how many
images decoded (`<body data-plots-decoded=... data-plots-total=...>`), which the headless-Chromium test reads.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path

from ..errors import KVSqueezeError

CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  imgs.forEach(function (i) { i.setAttribute('data-natural-width', i.naturalWidth); });
  document.body.setAttribute('data-plots-total', imgs.length);
  document.body.setAttribute('data-plots-decoded', ok.length);
  document.getElementById('plot-check').textContent = ok.length + ' of ' + imgs.length + ' plots rendered';
});
</script>"""

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1150px;
color:#222}h1{font-size:26px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:40px}
h3{margin-top:28px}img.plot{max-width:100%;border:1px solid #eee}table.scores{border-collapse:collapse;
font-size:12px}table.scores td,table.scores th{border:1px solid #ddd;padding:3px 6px;text-align:right}
table.scores th{background:#f5f5f5}.meta{color:#666;font-size:13px}#plot-check{color:#888;font-size:12px}"""


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def load_results(path: str | Path):
    """The rows of a results file, the latest row per key, with a readable `label` per method configuration."""
    from .store import KEY, ResultStore

    path = Path(path)
    if not path.is_file():
        raise KVSqueezeError(f"results file not found: {path}")
    store = ResultStore(path, create=False)
    try:
        df = store.frame()
    finally:
        store.close()
    if df.empty:
        raise KVSqueezeError(f"{path} holds no results yet")
    key = [k for k in KEY if k != "code_version"]
    df = df.sort_values("created_at").drop_duplicates(key, keep="last").reset_index(drop=True)
    df["label"] = _labels(df)
    kv = df["kv_bytes_16"].astype(float) if "kv_bytes_16" in df else df["kv_bytes"].astype(float) * float("nan")
    df["kv_mib"] = kv.fillna(df["kv_bytes"].astype(float)) / 2**20  # 16-bit scale where recorded (sizes.py)
    return df


STORAGE_KEYS = ("quant", "select", "select_budget")  # folded into params_json by sweeps over storage / selection


def _split_params(method: str, p: dict) -> tuple[dict, str]:
    """(the method's own parameters, the storage / selection suffix: " + kivi-4 + quest@256")."""
    p = dict(p)
    suffix = ""
    if p.get("quant"):
        suffix += f" + {p['quant']}"
    if p.get("select"):
        suffix += f" + {p['select']}@{p.get('select_budget')}"
    for k in STORAGE_KEYS:
        p.pop(k, None)
    inner = p.get("inner")
    if p.get("name") != method and isinstance(inner, dict) and inner.get("name") == method:
        # MiKV storage wraps the method: its own params
        p = {k: v for k, v in inner.items() if k != "compression_ratio"}
    return p, suffix


def _labels(df):
    """method name, plus the parameters that differ between configurations of the same method, plus the quant
    scheme and decode-time selector when set ("tova + kivi-4 + quest@256")."""
    labels = {}
    for method, group in df.groupby("method"):
        configs = sorted(group.params_json.unique())
        split = [_split_params(method, json.loads(c)) for c in configs]
        parsed = [p for p, _ in split]
        for c, (p, suffix) in zip(configs, split):
            diff = {k: v for k, v in p.items() if any(q.get(k) != v for q in parsed)}
            if not diff:
                labels[(method, c)] = method + suffix
                continue
            labels[(method, c)] = (method + " (" + ", ".join(f"{k}={v}" for k, v in sorted(diff.items())) + ")"
                                   + suffix)
    return [labels[(m, c)] for m, c in zip(df.method, df.params_json)]


MARKERS = "osD^v<>pXh*"


def _markers(labels):
    order = sorted(l for l in labels if l != "full")
    return {l: MARKERS[i % len(MARKERS)] for i, l in enumerate(order)}


def _legend(fig, handles):
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(5, len(handles)),
               bbox_to_anchor=(0.5, 1.0), frameon=False, fontsize=9)


def _colors(labels):
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    order = sorted(l for l in labels if l != "full")
    out = {l: cmap(i % 10) for i, l in enumerate(order)}
    out["full"] = (0.2, 0.2, 0.2, 1.0)
    return out


def _task_order(df):
    first = ["passkey", "niah", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe",
             "fwe", "ppl"]
    tasks = list(df.task.unique())
    return [t for t in first if t in tasks] + sorted(t for t in tasks if t not in first)


def _ylabel(metric: str) -> str:
    return "perplexity (lower is better)" if metric == "perplexity" else f"{metric} (higher is better)"


def _bytes_axes(ax, metric: str, top: float) -> None:
    """A score-vs-bytes panel's axes: bytes on a log x axis with plain ticks; perplexity on a log y axis, string
    match scores from 0 to `top`; a grid."""
    _plain_log(ax, "x")
    if metric == "perplexity":
        _plain_log(ax, "y")
    else:
        ax.set_ylim(-0.03, top)
    ax.grid(alpha=0.3, which="both")


def _plain_log(ax, which: str):
    """Log scale on axis `which` ("x" or "y") with plain tick labels (1, 2, 5, 10, 20, ...)."""
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(StrMethodFormatter("{x:g}"))
    axis.set_minor_formatter(NullFormatter())


def _grid(n, ncols=3, w=4.3, h=3.2):
    import matplotlib.pyplot as plt

    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def plot_score_vs_ratio(df) -> str:
    tasks = _task_order(df)
    colors = _colors(df.label.unique())
    markers = _markers(df.label.unique())
    comp_labels = sorted(l for l in df.label.unique() if l != "full")
    fig, axes = _grid(len(tasks))
    handles = {}
    for ax, task in zip(axes, tasks):
        d = df[df.task == task]
        metric = d.metric.iloc[0]
        full = d[d.method == "full"]
        if not full.empty:
            handles["full"] = ax.axhline(full.score.mean(), color=colors["full"], ls="--", lw=1.5, label="full")
        comp = d[(d.method != "full") & (d.compression_ratio >= 0)]
        for label, g in comp.groupby("label"):
            m = g.groupby("compression_ratio").score.mean()
            dodge = 0.006 * (comp_labels.index(label) - (len(comp_labels) - 1) / 2)  # overlapping lines stay visible
            (handles[label],) = ax.plot(m.index + dodge, m.values, marker=markers[label], color=colors[label],
                                        label=label, alpha=0.85)
        n = d.groupby(["label", "compression_ratio"]).size().max()
        ax.set_title(f"{task} (n={n})", fontsize=11)
        ax.set_xlabel("compression_ratio (fraction removed)")
        ax.set_ylabel(_ylabel(metric), fontsize=8)
        if metric == "perplexity":
            _plain_log(ax, "y")
        else:
            ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _legend(fig, handles)
    return _png(fig)


def plot_score_vs_bytes(df) -> str:
    tasks = _task_order(df)
    colors = _colors(df.label.unique())
    markers = _markers(df.label.unique())
    fig, axes = _grid(len(tasks))
    handles = {}
    for ax, task in zip(axes, tasks):
        d = df[df.task == task]
        metric = d.metric.iloc[0]
        for label, g in d.groupby("label"):
            m = g.groupby(["compression_ratio"]).agg(kv=("kv_mib", "mean"), score=("score", "mean")).sort_values("kv")
            style = dict(marker="*", ms=12, ls="none") if label == "full" else dict(marker=markers[label], alpha=0.85)
            (handles[label],) = ax.plot(m.kv, m.score, color=colors[label], label=label, **style)
        ax.set_title(task, fontsize=11)
        ax.set_xlabel("KV cache kept after compression (MiB, 16-bit)")
        ax.set_ylabel(_ylabel(metric), fontsize=8)
        _bytes_axes(ax, metric, top=1.03)
    fig.tight_layout()
    _legend(fig, handles)
    return _png(fig)


def plot_niah_heatmaps(df) -> str | None:
    """One depth x length heatmap per (method, compression_ratio) for the NIAH grid task: a row per method, a column per
    compression_ratio (the uncompressed reference alone in the first row)."""
    import matplotlib.pyplot as plt

    d = df[(df.task == "niah") & df.depth.notna() & df.length.notna()]
    if d.empty:
        return None
    labels = ["full"] * int((d.label == "full").any()) + sorted(l for l in d.label.unique() if l != "full")
    compression_ratios = sorted(r for r in d[d.method != "full"].compression_ratio.unique())
    ncols = max(1, len(compression_ratios))
    depths = sorted(d.depth.unique())
    lengths = sorted(d.length.unique())
    if len(lengths) == 1:
        return _niah_one_length(d, labels, compression_ratios, depths, lengths[0])
    cw = max(2.0, 0.5 * len(lengths) + 1.0)
    ch = max(1.5, 0.28 * len(depths) + 0.9)
    fig, axes = plt.subplots(len(labels), ncols, figsize=(cw * ncols + 2.6, ch * len(labels) + 0.6), squeeze=False,
                             constrained_layout=True)
    im = None
    for i, label in enumerate(labels):
        if label == "full":
            rows = [("full (no compression)", d[d.label == label])]
        else:
            rows = [(f"compression_ratio {r:g}", d[(d.label == label) & (d.compression_ratio == r)])
                    for r in compression_ratios]
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(rows) or rows[j][1].empty:
                ax.axis("off")
                continue
            title, g = rows[j]
            grid = g.pivot_table(index="depth", columns="length", values="score", aggfunc="mean")
            grid = grid.reindex(index=depths, columns=lengths)
            im = _heatmap(ax, grid.values, 7)
            ax.set_xticks(range(len(lengths)), [str(int(x)) for x in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{y:g}" for y in depths], fontsize=7)
            if i <= 1 or label == "full":
                ax.set_title(title, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{label}\nneedle depth", fontsize=8)
            if i == len(labels) - 1:
                ax.set_xlabel("length (tokens)", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.5, label="score", aspect=30)
    return _png(fig)


def _heatmap(ax, values, fontsize):
    """Scores in [0, 1] as a red-to-green image, each cell labelled with its value."""
    import numpy as np

    im = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for (y, x), v in np.ndenumerate(values):
        if not np.isnan(v):
            ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=fontsize)
    return im


def _niah_one_length(d, labels, compression_ratios, depths, length) -> str:
    """One length: a depth x method heatmap per compression_ratio (the full reference as the first column of each)."""
    import matplotlib.pyplot as plt

    compression_ratios = compression_ratios or [0.0]
    w = max(5.0, 0.7 * len(labels) + 2.0)
    n_rows = len(compression_ratios)
    fig, axes = plt.subplots(n_rows, 1, figsize=(w, (0.32 * len(depths) + 0.7) * n_rows + 1.4),
                             squeeze=False, constrained_layout=True, sharex=True)
    im = None
    for i, (ax, r) in enumerate(zip(axes[:, 0], compression_ratios)):
        g = d[(d.label == "full") | (d.compression_ratio == r)]
        grid = g.pivot_table(index="depth", columns="label", values="score", aggfunc="mean")
        grid = grid.reindex(index=depths, columns=labels)
        im = _heatmap(ax, grid.values, 8)
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=9)
        ax.set_yticks(range(len(depths)), [f"{y:g}" for y in depths], fontsize=8)
        ax.set_ylabel(f"compression_ratio {r:g}\nneedle depth", fontsize=9)
        if i == 0:
            ax.set_title(f"NIAH at {int(length)} tokens: mean score per needle depth (full = no compression)",
                         fontsize=10)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="score")
    return _png(fig)


def _cell_stats(df, bootstrap: int = 0, seed: int = 0):
    """Per (label, compression_ratio, task) cell: n, the one-sample step, and (bootstrap > 0) a 95% bootstrap
    interval."""
    from .frontier import bootstrap_ci, one_sample_step

    out = {}
    for (label, compression_ratio, task), g in df.groupby(["label", "compression_ratio", "task"]):
        metric = g.metric.iloc[0]
        st = {"n": int(g.sample_id.nunique()), "step": one_sample_step(g.score, metric)}
        if bootstrap:
            st["ci"] = bootstrap_ci(g.score, bootstrap, seed)
        out[(label, compression_ratio, task)] = st
    return out


def _step_text(df, task, stats) -> str:
    """The column header's error note: n and how much one sample moves a cell of that column."""
    cells = [v for (l, r, t), v in stats.items() if t == task]
    ns = sorted({v["n"] for v in cells})
    n_txt = str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    steps = [v["step"] for v in cells if v["step"] == v["step"]]
    if not steps:
        return f"n={n_txt}"
    if (df[df.task == task].metric == "perplexity").all():
        return f"n={n_txt}, 1 sample moves <={max(steps):.2g}"
    lo, hi = f"{min(steps):.2g}", f"{max(steps):.2g}"
    return f"n={n_txt}, 1 sample = {lo if lo == hi else lo + '-' + hi}"


def score_table(df, bootstrap: int = 0, seed: int = 0):
    """Mean score: a row per (method, compression_ratio), a column per task (the full reference first). Column headers
    give n and how much one sample moves a cell; with `bootstrap`, each cell is "mean [95% interval]"."""
    tasks = _task_order(df)
    t = df.pivot_table(index=["label", "compression_ratio"], columns="task", values="score", aggfunc="mean")[tasks]
    order = sorted(t.index, key=lambda ix: (ix[0] != "full", ix[0], ix[1]))
    t = t.loc[order]
    stats = _cell_stats(df, bootstrap, seed)
    if bootstrap:
        t = t.astype(object)
        for (label, compression_ratio), row in t.iterrows():
            for c in tasks:
                v = row[c]
                if v == v and (label, compression_ratio, c) in stats:
                    lo, hi = stats[(label, compression_ratio, c)]["ci"]
                    t.loc[(label, compression_ratio), c] = f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
    t.columns = [f"{c} ({df[df.task == c].metric.iloc[0].replace('string_match_', 'match ')}; "
                 f"{_step_text(df, c, stats)})" for c in t.columns]
    t.index.names = ["method", "compression_ratio"]
    return t


def markdown_table(df, model: str | None = None, bootstrap: int = 0, seed: int = 0) -> str:
    """Mean score per (method, compression_ratio) row and task column, as a Markdown table (the README's baseline
    table).

    String-match tasks in [0, 1]; `ppl` is the perplexity (lower is better); `QA mean` averages the string-match
    tasks; `KV kept` is the mean fraction of the full cache's KV bytes held after compression, on the 16-bit
    scale (evaluation/sizes.py; the measured bytes for rows older than that scale, which were never quantized).
    Each task header gives n and how much one sample moves a cell; `bootstrap` adds a 95% interval per cell."""
    import pandas as pd

    from .frontier import _bytes

    if model is not None:
        df = df[df.model == model]
    if df.empty:
        raise KVSqueezeError(f"no results for model {model!r}")
    if df.model.nunique() > 1:
        raise KVSqueezeError(f"results hold several models ({', '.join(sorted(df.model.unique()))}): pick one")
    tasks = _task_order(df)
    t = df.pivot_table(index=["label", "compression_ratio"], columns="task", values="score", aggfunc="mean")[tasks]
    qa = [x for x in tasks if (df[df.task == x].metric != "perplexity").all()]
    if qa:
        t["QA mean"] = t[qa].mean(axis=1)
    kv, full = _bytes(df)
    kept = df.assign(kept=kv / full).groupby(["label", "compression_ratio"]).kept.mean()
    t.insert(0, "KV kept", kept)
    order = sorted(t.index, key=lambda ix: (ix[0] != "full", ix[0], ix[1]))
    t = t.loc[order]
    stats = _cell_stats(df, bootstrap, seed)
    head = ["method", "compression_ratio", "KV kept"] + [f"{c} ({_step_text(df, c, stats)})" if c in tasks else c
                                             for c in t.columns[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (label, compression_ratio), row in t.iterrows():
        ref = label == "full" or label.startswith("full ")
        cells = [label, "-" if ref else ("budget" if compression_ratio < 0 else f"{compression_ratio:g}")]
        for c, v in row.items():
            if pd.isna(v):
                cells.append("")
            elif c == "KV kept":
                cells.append(f"{100 * v:.1f}%")
            else:
                cell = f"{v:.2f}"
                if bootstrap and (label, compression_ratio, c) in stats:
                    lo, hi = stats[(label, compression_ratio, c)]["ci"]
                    cell += f" [{lo:.2f}, {hi:.2f}]"
                cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_frontier(df) -> str:
    """Score vs KV bytes held (% of the full 16-bit cache, log) per task and overall: every configuration a
    dot, the Pareto frontier a line through its points, each frontier point labelled."""
    from .frontier import config_name, frontier

    pts = frontier(df)
    tasks = [t for t in ["overall"] + _task_order(df) if t in set(pts.task)]
    fig, axes = _grid(len(tasks), ncols=2, w=6.2, h=4.4)
    for ax, task in zip(axes, tasks):
        g = pts[pts.task == task]
        metric = g.metric.iloc[0]
        x = 100.0 / g.factor
        ax.scatter(x, g.score, s=18, color="#999", zorder=2, label="configuration")
        f = g[g.on_frontier].assign(x=100.0 / g[g.on_frontier].factor).sort_values("x")
        ax.plot(f.x, f.score, "-o", color="#d62728", ms=5, lw=1.5, zorder=3, label="Pareto frontier")
        for i, (xx, yy, lab, r) in enumerate(zip(f.x, f.score, f.label, f.compression_ratio)):
            ax.annotate(config_name(lab, r), (xx, yy), textcoords="offset points", fontsize=7,
                        xytext=(4, 6 if i % 2 == 0 else -10), color="#8b1a1a")
        n = int(g.n.max())
        ax.set_title(f"{task} (n={n}{'' if task == 'overall' else ', per configuration'})", fontsize=11)
        ax.set_xlabel("KV bytes held, % of the full 16-bit cache (log)")
        ax.set_ylabel(_ylabel(metric) if task != "overall" else "mean string-match score over tasks", fontsize=8)
        _bytes_axes(ax, metric, top=1.08)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def write_report(results: str | Path, output: str | Path, title: str = "kvsqueeze evaluation report",
                 bootstrap: int = 0) -> int:
    """Write the HTML report of `results` to `output`; returns the number of plots. `bootstrap` > 0 adds a 95%
    bootstrap interval (that many resamples of the samples, seeded) to every cell of the score table."""
    import matplotlib

    matplotlib.use("Agg")
    df = load_results(results)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    parts.append(
        f"<p class='meta'>{len(df)} results from <code>{html.escape(str(results))}</code>; code versions: "
        f"{html.escape(', '.join(sorted(df.code_version.unique())))}; generated "
        f"{time.strftime('%Y-%m-%d %H:%M')}. Scores are RULER's string match in [0, 1] (higher is better) except "
        "perplexity (lower is better). Ratio = fraction of the KV cache removed; KV bytes are measured right after "
        "compressing the context.</p>")
    n_plots = 0
    for model, d in df.groupby("model"):
        n = d.groupby("task").sample_id.nunique()
        parts.append(f"<h2>{html.escape(str(model))}</h2>")
        parts.append("<p class='meta'>samples per task: " + ", ".join(f"{t} {c}" for t, c in n.items())
                     + "; protocols: " + html.escape(", ".join(sorted(d.protocol.dropna().unique()))) + "</p>")
        parts.append("<h3>Mean score</h3>")
        parts.append("<p class='meta'>Each column header gives n (samples per cell) and how much one sample moves "
                     "a cell (string match: 1/n; perplexity: the largest change dropping one sample makes)"
                     + (f"; cells show a 95% bootstrap interval ({bootstrap} resamples of the samples)"
                        if bootstrap else "") + ".</p>")
        parts.append(score_table(d, bootstrap).to_html(float_format=lambda x: f"{x:.3f}", classes="scores",
                                                       border=0, na_rep=""))
        figs = [("Score vs compression_ratio", plot_score_vs_ratio(d)),
                ("Score vs KV bytes kept", plot_score_vs_bytes(d)),
                ("Pareto frontier: score vs KV bytes (16-bit-normalised)", plot_frontier(d)),
                ("Needle in a haystack: depth x length", plot_niah_heatmaps(d))]
        for head, png in figs:
            if png is None:
                continue
            n_plots += 1
            parts.append(f"<h3>{head}</h3><img class='plot' alt='{html.escape(head)} ({html.escape(str(model))})' "
                         f"src='data:image/png;base64,{png}'>")
    parts.append("<p id='plot-check'>plots not checked (scripts disabled)</p>")
    parts.append(CHECK_SCRIPT + "</body></html>")
    out = Path(output)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return n_plots
