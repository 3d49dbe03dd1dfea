"""`kvsqueeze recommend`: the pick among configurations meeting a byte target (pure function on a hand-made
store), the pruning bound, the CLI end to end on a tiny model (resumes, errors), and `generate --config`."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.evaluation import ResultStore
from kvsqueeze.evaluation.recommend import (candidates, factor_bound, parse_bytes, parse_target, pick,
                                            read_config)

FULL = 1000  # full 16-bit bytes per row of the hand-made store


def _rows(method, compression_ratio, quant, kv, scores, tasks=("passkey", "vt")):
    """Rows of one configuration: `scores[task]` = per-sample scores; every row holds `kv` of FULL bytes."""
    params = {"name": method, **({"quant": quant} if quant else {})}
    out = []
    for t in tasks:
        for i, s in enumerate(scores[t]):
            out.append({"model": "m", "method": method, "params_json": json.dumps(params, sort_keys=True),
                        "compression_ratio": compression_ratio, "task": t, "sample_id": str(i), "seed": 0, "code_version": "v",
                        "metric": "string_match_all", "score": s, "kv_bytes": 2 * kv, "full_kv_bytes": 2 * FULL,
                        "kv_bytes_16": kv, "full_kv_bytes_16": FULL, "quant": quant, "select": None,
                        "select_budget": None})
    return out


def _store_frame():
    rows = []
    rows += _rows("snapkv", 0.9, None, 100, {"passkey": [0.0, 1.0], "vt": [0.0, 0.0]})  # 10x, 0.25
    rows += _rows("knorm", 0.75, "kivi-4", 80, {"passkey": [1.0, 1.0], "vt": [1.0, 0.0]})  # 12.5x, 0.75
    rows += _rows("tova", 0.5, "kivi-2", 125, {"passkey": [1.0, 1.0], "vt": [0.0, 1.0]})  # 8x, 0.75 (tie)
    rows += _rows("tova", 0.75, None, 250, {"passkey": [1.0, 1.0], "vt": [1.0, 1.0]})  # 4x, 1.0: best, too large
    rows += _rows("h2o", 0.95, None, 50, {"passkey": [1.0, 1.0]}, tasks=("passkey",))  # 20x, 1.0 but one task only
    return pd.DataFrame(rows)


def test_pick_is_the_best_scorer_meeting_the_target():
    df = _store_frame()
    rec = pick(df, target=8)
    # tova @0.75 scores 1.0 but holds 1/4 (4x); h2o lacks a task; knorm + kivi-4 and tova + kivi-2 tie at 0.75,
    # the tie goes to the smaller cache (12.5x)
    assert (rec.best["method"], rec.best["quant"]) == ("knorm", "kivi-4")
    assert rec.best["factor"] == pytest.approx(12.5) and rec.best["score"] == pytest.approx(0.75)
    assert rec.best["n"] == 2 and rec.best["step"] == pytest.approx(0.25)
    assert (rec.runner_up["method"], rec.runner_up["quant"]) == ("tova", "kivi-2")
    assert rec.eviction_only["method"] == "snapkv" and rec.eviction_only["score"] == pytest.approx(0.25)
    assert set(candidates(df).method) == {"snapkv", "knorm", "tova"}  # h2o: not measured on every task
    # a looser target admits the 4x configuration, which scores best
    assert pick(df, target=4).best["compression_ratio"] == 0.75 and pick(df, target=4).best["method"] == "tova"
    # a byte budget instead of a factor: at most 100 bytes -> snapkv (100) or knorm (80); knorm scores better
    assert pick(df, max_bytes=100).best["method"] == "knorm"
    assert pick(df, max_bytes=90).runner_up is None
    # tolerance: 12.5x counts for a 12.6x target only with the slack
    assert pick(df, target=12.6).best["method"] == "knorm"
    with pytest.raises(KVSqueezeError, match=r"largest factor available is 12\.50x \(knorm @0\.75 \+ kivi-4\)"):
        pick(df, target=12.6, tolerance=0.0)


def test_no_candidate_meets_the_target_names_the_largest_factor():
    with pytest.raises(KVSqueezeError, match=r"meets the target 16x: the largest factor available is 12\.50x"):
        pick(_store_frame(), target=16)
    with pytest.raises(KVSqueezeError, match="give a target"):
        pick(_store_frame())


def test_parsers_and_the_pruning_bound():
    assert parse_target("8x") == 8 and parse_target("4.5X") == 4.5 and parse_target("16") == 16
    for bad in ("0.5x", "x8", "eight", ""):
        with pytest.raises(KVSqueezeError, match="--target"):
            parse_target(bad)
    assert parse_bytes("2M") == 2 * 2**20 and parse_bytes("512KiB") == 512 * 1024 and parse_bytes("100") == 100
    with pytest.raises(KVSqueezeError, match="--max-bytes"):
        parse_bytes("2 parsecs")
    assert factor_bound(0.875, None) == pytest.approx(8)
    assert factor_bound(0.5, "kivi-2") == pytest.approx(16)
    assert factor_bound(0.9, "mikv-8-2") == pytest.approx(8)  # MiKV keeps every token (evicted at 2 bits)
    assert factor_bound(0.0, None, budget=64) == float("inf")


def test_bound_is_an_upper_bound_of_measured_factors():
    """The analytic bound never prunes a configuration that would have met the target (tiny model, real caches)."""
    from conftest import kv, tiny_llama

    from kvsqueeze import CompressedCache
    from kvsqueeze.evaluation.sizes import bytes_16
    from kvsqueeze.evaluation.sweep import make_pairs

    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (1, 200))
    for p in make_pairs(["full", "knorm", "streaming_llm"], [0.5, 0.875], quants=["none", "kivi-4", "kivi-2",
                                                                                  "mikv-8-2"]):
        cache = CompressedCache(model, p.method, layer_factory=p.layer_factory)
        with torch.no_grad():
            model(input_ids=ids, **kv(cache))
        b, f = bytes_16(cache)
        assert f / b <= factor_bound(p.compression_ratio, p.quant) * 1.0001, p.label()


# --- CLI end to end ----------------------------------------------------------------------------------------------
def _invoke(args, monkeypatch, cache):
    from click.testing import CliRunner

    from kvsqueeze.cli import main

    monkeypatch.setenv("KVSQUEEZE_CACHE", str(cache))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return CliRunner().invoke(main, args)
    finally:
        torch.set_num_threads(threads)


def test_recommend_cli_end_to_end_resumes_and_writes_a_config_generate_reads(tiny_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cfg = tmp_path / "pick.json"
    args = ["recommend", "--model", str(tiny_dir), "--target", "3x", "--methods", "full,knorm,tova",
            "--compression-ratios", "0.5,0.75", "--quant", "none,kivi-4", "--tasks", "passkey", "--samples", "1",
            "--length", "256", "--code-version", "t", "--config", str(cfg), "--quiet"]
    r = _invoke(args, monkeypatch, cache)
    assert r.exit_code == 0, r.output
    out = r.output
    assert "pick:      " in out and "runner-up: " in out and "kvsqueeze generate --model" in out
    # default store under $KVSQUEEZE_CACHE/recommend/<model>.sqlite
    dbs = list((cache / "recommend").glob("*.sqlite"))
    assert len(dbs) == 1
    df = ResultStore(dbs[0]).frame()
    # pruned before running: full (1x), knorm / tova @0.5 (2x) cannot reach 3x; 7 candidates remain (full +
    # kivi-4, knorm / tova @0.5 + kivi-4, @0.75, @0.75 + kivi-4)
    assert len(df) == 7 and not ((df.compression_ratio == 0.5) & df.quant.isna()).any() and (df.method != "full").any()
    c = json.loads(cfg.read_text())
    assert c["model"] == str(tiny_dir) and c["method"] in ("full", "knorm", "tova")
    assert c["recommended"]["factor"] >= 3 * 0.99 and 0 <= c["recommended"]["score"] <= 1
    best = df[(df.method == c["method"]) & (df.compression_ratio == c["compression_ratio"])
              & (df.quant.fillna("none") == c["quant"])]
    assert len(best) == 1 and best.score.iloc[0] == df.score.max()  # the best scorer (all meet 3x here)
    assert out.count("\n") >= 4 and f"--method {c['method']}" in out

    # a rerun resumes: nothing new computed, same pick
    r2 = _invoke(args, monkeypatch, cache)
    assert r2.exit_code == 0, r2.output
    assert len(ResultStore(dbs[0]).frame()) == 7
    assert r2.output.splitlines()[1] == out.splitlines()[1]

    # checking the pick on fresh samples (another seed): the pick and the best eviction-only configuration
    r3 = _invoke(args + ["--verify-seed", "1", "--verify-samples", "1"], monkeypatch, cache)
    assert r3.exit_code == 0, r3.output
    assert "fresh samples (seed 1, 1 per task):" in r3.output and "  pick: " in r3.output, r3.output
    fresh = ResultStore(dbs[0]).frame()
    fresh = fresh[fresh.seed == 1]
    assert 1 <= len(fresh) <= 2 and (fresh.method == c["method"]).any()
    if len(fresh) == 2:
        assert "  eviction-only: " in r3.output and fresh.quant.isna().any()

    # the config round trip through generate, with an explicit flag overriding the file
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("The vault code is 4417. " + "Filler text here. " * 40)
    g = _invoke(["generate", "--config", str(cfg), "--context-file", str(ctx), "--question", "What is the code?",
                 "--max-new-tokens", "3"], monkeypatch, cache)
    assert g.exit_code == 0, g.output
    if c["method"] != "full":
        assert f"{c['method']}(compression_ratio={c['compression_ratio']}" in g.output or f"compression_ratio={c['compression_ratio']}" in g.output, g.output
    if c["quant"] != "none":
        assert f"quant: {c['quant']}" in g.output
    g2 = _invoke(["generate", "--config", str(cfg), "--method", "snapkv", "--quant", "none", "--context-file",
                  str(ctx), "--question", "What is the code?", "--max-new-tokens", "3"], monkeypatch, cache)
    assert g2.exit_code == 0, g2.output
    assert "snapkv" in g2.output and "quant:" not in g2.output


def test_recommend_cli_errors(tiny_dir, tmp_path, monkeypatch):
    base = ["recommend", "--model", str(tiny_dir), "--methods", "knorm", "--compression-ratios", "0.5", "--quant", "none",
            "--tasks", "passkey", "--samples", "1", "--length", "256", "--results", str(tmp_path / "r.sqlite"),
            "--quiet"]
    for extra, message in [
        (["--target", "16x"], "no candidate configuration can reach 16x: the largest factor available is at most "
                              "2.00x"),
        ([], "give a target"),
        (["--target", "8y"], "--target must be"),
        (["--target", "2x", "--tasks", "passkey,ppl"], "leave 'ppl' out"),
        (["--target", "2x", "--verify-seed", "0"], "--verify-seed must differ"),
    ]:
        r = _invoke(base + extra, monkeypatch, tmp_path / "cache")
        lines = [l for l in r.output.strip().splitlines() if l]
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], \
            r.output
    # measured, not bounded: a byte budget below every measured cache
    r = _invoke(base + ["--max-bytes", "10"], monkeypatch, tmp_path / "cache")
    lines = [l for l in r.output.strip().splitlines() if l]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert "budget of at most 10 bytes" in lines[0] and "largest factor available is 2.0" in lines[0], r.output


def test_generate_config_file_errors(tmp_path, monkeypatch):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("some context " * 20)
    for content, message in [("{not json", "is not JSON"), ('{"compression_ratio": 0.5, "colour": "red"}', "unknown key(s) colour"),
                             ('{"compression_ratio": 1.5}', "compression_ratio"), ("[1, 2]", "JSON object")]:
        p = tmp_path / "c.json"
        p.write_text(content)
        r = _invoke(["generate", "--config", str(p), "--context-file", str(ctx), "--question", "q"], monkeypatch,
                    tmp_path / "cache")
        lines = [l for l in r.output.strip().splitlines() if l]
        assert r.exit_code == 2 and len(lines) == 1 and message in lines[0], r.output
    with pytest.raises(KVSqueezeError, match="config file not found"):
        read_config(tmp_path / "missing.json")
