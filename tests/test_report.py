"""The HTML report: one static file, plots embedded (no server, no network), rendered by headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess

import pytest

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.evaluation import ResultStore
from kvsqueeze.evaluation.report import load_results, write_report

METHODS = {"snapkv": {"window": 64}, "knorm": {}}


def _fill(path):
    """A results file shaped like a real sweep: QA tasks, a NIAH grid, perplexity, a budget run, two versions."""
    import random

    rng = random.Random(0)
    st = ResultStore(path)
    n = 0
    for version in ("v1", "v2"):
        for method, extra in [("full", {}), *METHODS.items(), ("snapkv", {"window": 16})]:
            compression_ratios = [0.0] if method == "full" else [0.5, 0.75, 0.875]
            for compression_ratio in compression_ratios:
                params = json.dumps({"name": method, "budget": None, **extra}, sort_keys=True)
                rows = [("passkey", f"p{i}", None, 2048, "string_match_all") for i in range(3)]
                rows += [("niah", f"L{L}-d{d}", d, L, "string_match_all") for L in (1024, 2048) for d in (0, 0.5, 1)]
                rows += [("ppl", f"t{i}", None, 2048, "perplexity") for i in range(2)]
                for task, sid, depth, length, metric in rows:
                    value = rng.uniform(5, 30) if metric == "perplexity" else float(rng.random() > compression_ratio)
                    st.add({"model": "m", "method": method, "params_json": params, "compression_ratio": compression_ratio, "task": task,
                            "sample_id": sid, "seed": 0, "code_version": version, "metric": metric, "score": value,
                            "kv_bytes": int(1e6 * (1 - compression_ratio)), "total_bytes": int(1e6 * (1 - compression_ratio)) + 10,
                            "full_kv_bytes": 1_000_000, "length": length, "depth": depth, "protocol": "shared-prefill",
                            "prediction": "x", "seconds": 0.1})
                    n += 1
    st.add({"model": "m", "method": "knorm", "params_json": json.dumps({"name": "knorm", "budget": 128}),
            "compression_ratio": -1.0, "task": "passkey", "sample_id": "p0", "seed": 0, "code_version": "v2",
            "metric": "string_match_all", "score": 1.0, "kv_bytes": 50_000, "full_kv_bytes": 1_000_000,
            "protocol": "shared-prefill"})
    st.close()
    return n + 1


@pytest.fixture
def report(tmp_path):
    db = tmp_path / "r.sqlite"
    total = _fill(db)
    out = tmp_path / "report.html"
    n = write_report(db, out)
    return out, n, total, db


def test_latest_row_per_key_and_labels(report):
    _, _, total, db = report
    df = load_results(db)
    assert len(df) == (total - 1) // 2 + 1  # two code versions of each key: the latest only
    assert set(df.code_version) == {"v2"}
    labels = set(df.label)
    assert labels == {"full", "knorm (budget=None)", "knorm (budget=128)", "snapkv (window=16)", "snapkv (window=64)"}


def test_one_static_file_with_embedded_plots(report):
    out, n, _, _ = report
    html = out.read_text()
    assert n == 4  # score vs compression_ratio, score vs bytes, Pareto frontier, NIAH heatmaps
    srcs = re.findall(r"<img [^>]*src='([^']+)'", html)
    assert len(srcs) == n
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # nothing fetched from anywhere: no external scripts, styles or images
    assert not re.search(r"(src|href)=['\"](https?:)?//", html)
    assert "<table" in html and "passkey" in html and "Needle in a haystack" in html


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary found (CI installs Debian's chromium)")
def test_headless_chromium_renders_every_plot(report, tmp_path):
    out, n, _, _ = report
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(base + ["--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    assert f'data-plots-total="{n}"' in body and f'data-plots-decoded="{n}"' in body, body
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom.stdout)]
    assert len(widths) == n and min(widths) > 300
    assert f"{n} of {n} plots rendered" in dom.stdout
    png = tmp_path / "shot.png"
    shot = subprocess.run(base + [f"--screenshot={png}", "--window-size=1200,2000", out.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
    import matplotlib.image as mpimg

    img = mpimg.imread(png)
    assert img.shape[0] == 2000 and img.shape[1] == 1200
    assert img[..., :3].std() > 0.05  # not a blank page


def test_report_errors(tmp_path):
    with pytest.raises(KVSqueezeError, match="results file not found"):
        write_report(tmp_path / "none.sqlite", tmp_path / "r.html")


def test_report_command(report, tmp_path):
    from click.testing import CliRunner

    from kvsqueeze.cli import main

    _, _, _, db = report
    out = tmp_path / "sub" / "cli.html"
    r = CliRunner().invoke(main, ["report", str(db), "-o", str(out), "--title", "My sweep"])
    assert r.exit_code == 0, r.output
    assert "4 plots" in r.output and "<h1>My sweep</h1>" in out.read_text()


def test_markdown_table_matches_the_means(report):
    from kvsqueeze.evaluation.report import markdown_table

    _, _, _, db = report
    df = load_results(db)
    md = markdown_table(df).splitlines()
    head = [c.strip() for c in md[0].strip("|").split("|")]
    assert head[:3] == ["method", "compression_ratio", "KV kept"] and head[-1] == "QA mean"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md[2:]]
    assert rows[0][0] == "full" and len(rows) == df.groupby(["label", "compression_ratio"]).ngroups
    row = next(r for r in rows if r[0] == "snapkv (window=64)" and r[1] == "0.75")
    sel = df[(df.label == "snapkv (window=64)") & (df.compression_ratio == 0.75)]
    col = head.index("passkey (n=1-3, 1 sample = 0.33-1)")  # the budget run has one sample
    assert row[col] == f"{sel[sel.task == 'passkey'].score.mean():.2f}"
    assert row[2] == "25.0%"
    with pytest.raises(KVSqueezeError, match="no results for model"):
        markdown_table(df, "other")


def test_single_length_niah_gets_a_depth_by_method_heatmap(tmp_path):
    import sqlite3

    db = tmp_path / "one.sqlite"
    _fill(db)
    con = sqlite3.connect(db)
    con.execute("DELETE FROM results WHERE task = 'niah' AND length = 1024")
    con.commit()
    con.close()
    assert write_report(db, tmp_path / "one.html") == 4  # compression_ratio, bytes, frontier, NIAH
    assert "Needle in a haystack" in (tmp_path / "one.html").read_text()
